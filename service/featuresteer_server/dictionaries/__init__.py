"""The dictionary runtime: sparse dictionaries (SAEs and transcoders) in SAELens's format.

Owns: ``base`` (the ``Dictionary`` API every engine and the intervention math code against),
one module per SAELens architecture (``standard``, ``topk``, ``jumprelu``, ``transcoder``,
``skip_transcoder``, ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``), ``registry``
(architecture -> class; id -> loaded dictionary), ``loading`` (files, checks against the
model, fingerprint, catalog), ``info`` and ``errors`` (torch-free).

Names are resolved lazily so importing ``DictionaryInfo`` or the errors does not import torch.
Must not: import gRPC or protobuf.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Dictionary": "base",
    "DictionaryConfig": "base",
    "DictionaryInfo": "info",
    "DictionaryLoadError": "errors",
    "DictionaryNotFound": "errors",
    "FingerprintMismatch": "errors",
    "FeatureEditRefused": "errors",
    "ARCHITECTURES": "registry",
    "DictionaryRegistry": "registry",
    "CatalogEntry": "loading",
    "fingerprint": "loading",
    "load_catalog": "loading",
    "load_catalog_dictionaries": "loading",
    "load_catalog_entry": "loading",
    "load_dictionary": "loading",
    "write_dictionary": "loading",
}

__all__ = [
    "ARCHITECTURES",
    "CatalogEntry",
    "Dictionary",
    "DictionaryConfig",
    "DictionaryInfo",
    "DictionaryLoadError",
    "DictionaryNotFound",
    "DictionaryRegistry",
    "FeatureEditRefused",
    "FingerprintMismatch",
    "fingerprint",
    "load_catalog",
    "load_catalog_dictionaries",
    "load_catalog_entry",
    "load_dictionary",
    "write_dictionary",
]

if TYPE_CHECKING:
    from .base import Dictionary, DictionaryConfig
    from .errors import (
        DictionaryLoadError,
        DictionaryNotFound,
        FeatureEditRefused,
        FingerprintMismatch,
    )
    from .info import DictionaryInfo
    from .loading import (
        CatalogEntry,
        fingerprint,
        load_catalog,
        load_catalog_dictionaries,
        load_catalog_entry,
        load_dictionary,
        write_dictionary,
    )
    from .registry import ARCHITECTURES, DictionaryRegistry


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
