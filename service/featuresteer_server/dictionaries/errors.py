"""Exceptions raised by the dictionary runtime.

Owns: the error types of this package. They subclass builtins so the package stays free of
the service's error hierarchy; ``errors.py`` of the server maps them to status codes
(DictionaryLoadError → INVALID_ARGUMENT at load / UNAVAILABLE at start-up, DictionaryNotFound
→ NOT_FOUND, FingerprintMismatch → FAILED_PRECONDITION, FeatureEditRefused → INVALID_ARGUMENT).

Must not: import torch (the servicer may import these).
"""

from __future__ import annotations


class DictionaryLoadError(ValueError):
    """A dictionary (or catalog) on disk is malformed or does not fit the model."""


class DictionaryNotFound(KeyError):
    """No loaded dictionary has the requested id."""

    def __init__(self, dictionary_id: str, known: list[str] | None = None) -> None:
        self.dictionary_id = dictionary_id
        self.known = list(known or [])
        super().__init__(dictionary_id)

    def __str__(self) -> str:  # KeyError would quote the whole message
        known = ", ".join(self.known) if self.known else "none"
        return f"unknown dictionary {self.dictionary_id!r} (loaded: {known})"


class FingerprintMismatch(ValueError):
    """A caller pinned a fingerprint that differs from the loaded dictionary's."""

    def __init__(self, dictionary_id: str, expected: str, actual: str) -> None:
        self.dictionary_id = dictionary_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"dictionary {dictionary_id!r} has fingerprint {actual}, but the request pinned "
            f"{expected}: the dictionary changed since the reference was made"
        )


class FeatureEditRefused(ValueError):
    """A feature-space edit was asked of a dictionary whose math cannot support it."""
