"""Synthetic ``features.npz`` files for catalog tests: ``featuresteer_server.testing``'s
writer (through the format's one writer, ``featuresteer_server.dictionaries.features_npz``),
re-exported under the name these tests import."""

from __future__ import annotations

from featuresteer_server.testing import write_features_npz

__all__ = ["write_features_npz"]
