"""Domain exceptions, each of one ``ErrorKind``, and ``kind_of`` (which also classifies the
dictionary runtime's and the attribution package's own exceptions). Free of gRPC: the error
interceptor (``interceptors.py``) is the one place a kind becomes a status code (the kinds are
named after gRPC's codes). Nothing else picks status codes.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Protocol, TypeVar

# at most this many characters of a user-supplied value go into an error message (a 16 KB
# dictionary id echoed back turned NOT_FOUND into a client-side RESOURCE_EXHAUSTED)
SHOWN_CHARS = 200


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message, a long string cut to ``limit`` characters (with
    its full length). Every message that echoes what a client sent goes through this."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}… ({len(value)} {unit})"
    text = repr(value)
    return text if len(text) <= limit + 2 else f"{text[:limit]}…"


def bounded_message(message: str, limit: int = 1024) -> str:
    """The last guard on any status message: at most ``limit`` characters."""
    return message if len(message) <= limit else f"{message[:limit]}… (message truncated)"


class ErrorKind(Enum):
    """What went wrong, in the vocabulary of the API's status codes (same names)."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"


class FeatureSteerError(Exception):
    """Base of every error the service reports on purpose."""

    kind: ErrorKind = ErrorKind.INTERNAL


class InvalidArgument(FeatureSteerError):
    """A request field is malformed or out of range; the message names the field."""

    kind = ErrorKind.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(FeatureSteerError):
    """Unknown dictionary, feature, preset or job."""

    kind = ErrorKind.NOT_FOUND


class FailedPrecondition(FeatureSteerError):
    """The request pinned a state the server no longer has (e.g. a stale fingerprint)."""

    kind = ErrorKind.FAILED_PRECONDITION


class ResourceExhausted(FeatureSteerError):
    """Queue full or memory budget exceeded."""

    kind = ErrorKind.RESOURCE_EXHAUSTED


class Unavailable(FeatureSteerError):
    """The model is loading, the server is draining, or a backing store is down."""

    kind = ErrorKind.UNAVAILABLE


class Unauthenticated(FeatureSteerError):
    kind = ErrorKind.UNAUTHENTICATED


class PermissionDenied(FeatureSteerError):
    kind = ErrorKind.PERMISSION_DENIED


class DeadlineExceeded(FeatureSteerError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class Cancelled(FeatureSteerError):
    kind = ErrorKind.CANCELLED


def kind_of(exc: BaseException) -> ErrorKind:
    """The kind of an exception: ours carry one; the dictionary runtime's and attribution's
    (which stay free of this module) are classified here; anything else is INTERNAL."""
    from featuresteer_server.attribution import types as attr
    from featuresteer_server.dictionaries import errors as dict_errors

    if isinstance(exc, FeatureSteerError):
        return exc.kind
    table: tuple[tuple[type[BaseException], ErrorKind], ...] = (
        (dict_errors.DictionaryNotFound, ErrorKind.NOT_FOUND),
        (dict_errors.FingerprintMismatch, ErrorKind.FAILED_PRECONDITION),
        (dict_errors.FeatureEditRefused, ErrorKind.INVALID_ARGUMENT),
        (attr.AttributionCancelled, ErrorKind.CANCELLED),
        (attr.AttributionBudgetExceeded, ErrorKind.RESOURCE_EXHAUSTED),
        (attr.AttributionError, ErrorKind.INVALID_ARGUMENT),
        (TimeoutError, ErrorKind.DEADLINE_EXCEEDED),
    )
    for cls, kind in table:
        if isinstance(exc, cls):
            return kind
    return ErrorKind.INTERNAL


class Unimplemented(FeatureSteerError):
    """An RPC of the contract that this server version does not serve yet."""

    kind = ErrorKind.UNIMPLEMENTED


class _Pinned(Protocol):
    @property
    def fingerprint(self) -> str: ...

    @property
    def d_sae(self) -> int: ...


D = TypeVar("D", bound=_Pinned)


def pinned_dictionary(
    table: Mapping[str, D], dictionary_id: str, field: str, fingerprint: str | None = None
) -> D:
    """``table[dictionary_id]``, NOT_FOUND when absent, FAILED_PRECONDITION when a given
    fingerprint is not the loaded one (the engine's dictionaries and the catalog's records
    share this lookup, so clients see one message)."""
    d = table.get(dictionary_id)
    if d is None:
        raise NotFound(f"{field}: unknown dictionary {shown(dictionary_id)}")
    if fingerprint and fingerprint != d.fingerprint:
        raise FailedPrecondition(
            f"{field}: fingerprint {shown(fingerprint)} does not match the loaded dictionary "
            f"{dictionary_id!r} ({d.fingerprint}); it was retrained or replaced"
        )
    return d


def feature_dictionary(
    table: Mapping[str, D], dictionary_id: str, index: int, fingerprint: str | None, field: str
) -> D:
    """The dictionary of feature ``index`` (``pinned_dictionary`` on ``{field}.dictionary_id``),
    INVALID_ARGUMENT on ``{field}.index`` when it is out of range."""
    d = pinned_dictionary(table, dictionary_id, f"{field}.dictionary_id", fingerprint)
    if not 0 <= index < d.d_sae:
        raise InvalidArgument(f"{field}.index", f"{index} outside [0, {d.d_sae})")
    return d
