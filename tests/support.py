"""Test helpers: a tiny random Llama with the real tokenizer, random dictionaries on disk,
engines built from them, synthetic feature metadata.

Defined once in ``featuresteer_server.testing`` (the benchmarks use them too, and import no
test module); re-exported here so tests import them as ``tests.support``."""

from __future__ import annotations

from featuresteer_server.testing import (
    ISSUE_PROMPTS,
    TINY,
    default_hf_tokenizer,
    random_weights,
    tiny_engine,
    tiny_hf_model,
    write_features_npz,
    write_random_dictionary,
)

__all__ = [
    "ISSUE_PROMPTS",
    "TINY",
    "default_hf_tokenizer",
    "random_weights",
    "tiny_engine",
    "tiny_hf_model",
    "write_features_npz",
    "write_random_dictionary",
]
