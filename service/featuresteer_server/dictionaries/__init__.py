"""The dictionary runtime: sparse dictionaries (SAEs and transcoders) in SAELens's format.

Owns: ``base`` (the ``Dictionary`` API every engine and the intervention math code against),
one module per SAELens architecture (``standard``, ``topk``, ``jumprelu``, ``transcoder``,
``skip_transcoder``, ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``), ``registry``
(architecture -> class; id -> loaded dictionary), ``cfg`` (cfg.json parsing and checks
against the model), ``files`` (the SAELens directory: read, write, fingerprint),
``catalog_file`` (catalog.json), ``features_npz`` (the feature metadata file), ``info`` and
``errors`` (torch-free, as is ``features_npz``).

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
    "CatalogEntry": "catalog_file",
    "dictionary_from_tensors": "files",
    "fingerprint": "files",
    "load_catalog": "catalog_file",
    "load_catalog_dictionaries": "catalog_file",
    "load_catalog_entry": "catalog_file",
    "load_dictionary": "files",
    "parse_config": "cfg",
    "write_dictionary": "files",
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
    "dictionary_from_tensors",
    "fingerprint",
    "load_catalog",
    "load_catalog_dictionaries",
    "load_catalog_entry",
    "load_dictionary",
    "parse_config",
    "write_dictionary",
]

if TYPE_CHECKING:
    from .base import Dictionary, DictionaryConfig
    from .catalog_file import (
        CatalogEntry,
        load_catalog,
        load_catalog_dictionaries,
        load_catalog_entry,
    )
    from .cfg import parse_config
    from .errors import (
        DictionaryLoadError,
        DictionaryNotFound,
        FeatureEditRefused,
        FingerprintMismatch,
    )
    from .files import dictionary_from_tensors, fingerprint, load_dictionary, write_dictionary
    from .info import DictionaryInfo
    from .registry import ARCHITECTURES, DictionaryRegistry


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
