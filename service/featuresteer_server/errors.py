"""Domain exceptions and the one mapping from them to gRPC status codes.

Engines, the dictionary runtime and converters raise these; only the error interceptor
(``interceptors.py``) turns them into statuses. Nothing else picks status codes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, TypeVar

import grpc

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


class FeatureSteerError(Exception):
    """Base of every error the service reports on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(FeatureSteerError):
    """A request field is malformed or out of range; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(FeatureSteerError):
    """Unknown dictionary, feature, preset or job."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(FeatureSteerError):
    """The request pinned a state the server no longer has (e.g. a stale fingerprint)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(FeatureSteerError):
    """Queue full or memory budget exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(FeatureSteerError):
    """The model is loading, the server is draining, or a backing store is down."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(FeatureSteerError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FeatureSteerError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(FeatureSteerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(FeatureSteerError):
    code = grpc.StatusCode.CANCELLED


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception: ours carry one, the dictionary runtime's (which
    stays free of gRPC) are mapped here, anything else is INTERNAL."""
    from featuresteer_server.dictionaries import errors as dict_errors

    if isinstance(exc, FeatureSteerError):
        return exc.code
    if isinstance(exc, dict_errors.DictionaryNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, dict_errors.FingerprintMismatch):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, dict_errors.FeatureEditRefused):
        return grpc.StatusCode.INVALID_ARGUMENT
    if type(exc).__module__.startswith("featuresteer_server.attribution"):
        from featuresteer_server.attribution import types as attr

        if isinstance(exc, attr.AttributionCancelled):
            return grpc.StatusCode.CANCELLED
        if isinstance(exc, attr.AttributionBudgetExceeded):
            return grpc.StatusCode.RESOURCE_EXHAUSTED
        if isinstance(exc, attr.AttributionError):
            return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL


class Unimplemented(FeatureSteerError):
    """An RPC of the contract that this server version does not serve yet."""

    code = grpc.StatusCode.UNIMPLEMENTED


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
