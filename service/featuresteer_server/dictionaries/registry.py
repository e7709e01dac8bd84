"""Registries: architecture string -> class, and dictionary id -> loaded dictionary.

Owns: ``ARCHITECTURES`` (keyed by SAELens's ``architecture`` string, so a cfg.json written
by SAELens or by our tooling picks its class the same way) and ``DictionaryRegistry``, the
set of dictionaries a server holds, looked up by id with fingerprint pinning.

Must not: read files (``files.py``) or know about requests.
"""

from __future__ import annotations

from collections.abc import Iterator

from .base import Dictionary
from .errors import DictionaryLoadError, DictionaryNotFound, FingerprintMismatch
from .info import DictionaryInfo
from .jumprelu import JumpReLUSAE
from .jumprelu_skip_transcoder import JumpReLUSkipTranscoder
from .jumprelu_transcoder import JumpReLUTranscoder
from .skip_transcoder import SkipTranscoder
from .standard import StandardSAE
from .topk import TopKSAE
from .transcoder import Transcoder

ARCHITECTURES: dict[str, type[Dictionary]] = {
    cls.architecture: cls
    for cls in (
        StandardSAE,
        TopKSAE,
        JumpReLUSAE,
        Transcoder,
        SkipTranscoder,
        JumpReLUTranscoder,
        JumpReLUSkipTranscoder,
    )
}


def architecture_class(architecture: str, *, name: str = "dictionary") -> type[Dictionary]:
    """The class for a SAELens architecture string, or DictionaryLoadError naming ``name``."""
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise DictionaryLoadError(
            f"{name}: unsupported architecture {architecture!r} "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        ) from None


class DictionaryRegistry:
    """The dictionaries a server has loaded, by id (insertion order kept)."""

    def __init__(self, dictionaries: list[Dictionary] | None = None) -> None:
        self._by_id: dict[str, Dictionary] = {}
        self._defaults: list[str] = []
        for dictionary in dictionaries or []:
            self.add(dictionary)

    def add(self, dictionary: Dictionary, *, default: bool = False) -> None:
        """Register a loaded dictionary; a second one with the same id is refused."""
        if dictionary.id in self._by_id:
            raise DictionaryLoadError(
                f"dictionary id {dictionary.id!r} is loaded twice "
                f"({self._by_id[dictionary.id].source} and {dictionary.source})"
            )
        self._by_id[dictionary.id] = dictionary
        if default:
            self._defaults.append(dictionary.id)

    def get(self, dictionary_id: str) -> Dictionary:
        """The dictionary with this id, or DictionaryNotFound."""
        try:
            return self._by_id[dictionary_id]
        except KeyError:
            raise DictionaryNotFound(dictionary_id, list(self._by_id)) from None

    def check_fingerprint(self, dictionary_id: str, fingerprint: str | None) -> Dictionary:
        """The dictionary, after checking a pinned fingerprint (None or "" pins nothing)."""
        dictionary = self.get(dictionary_id)
        if fingerprint and fingerprint != dictionary.fingerprint:
            raise FingerprintMismatch(dictionary_id, fingerprint, dictionary.fingerprint)
        return dictionary

    def at_hook(self, hook_name: str) -> list[Dictionary]:
        """Dictionaries whose input hook is ``hook_name``."""
        return [d for d in self._by_id.values() if d.hook_name == hook_name]

    def default_ids(self) -> list[str]:
        """Ids marked default in the catalog (the first loaded one if none is marked)."""
        if self._defaults:
            return list(self._defaults)
        return list(self._by_id)[:1]

    def ids(self) -> list[str]:
        return list(self._by_id)

    def infos(self) -> list[DictionaryInfo]:
        """Torch-free summaries, in load order."""
        return [d.info() for d in self._by_id.values()]

    def __contains__(self, dictionary_id: object) -> bool:
        return dictionary_id in self._by_id

    def __iter__(self) -> Iterator[Dictionary]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)
