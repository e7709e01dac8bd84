"""``DictionaryInfo``: the torch-free summary of a loaded dictionary.

Owns: the one record the servicer converts into ``featuresteer.v1.DictionaryInfo`` and
``GetInfo.dictionaries``. Must not: import torch (the servicer imports this module).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DictionaryInfo:
    """What ListDictionaries reports for one dictionary (quality figures None when unknown)."""

    id: str
    version: str
    fingerprint: str
    architecture: str
    hook_name: str
    hook_name_out: str
    d_in: int
    d_sae: int
    d_out: int
    source: str
    is_transcoder: bool
    k: int | None
    per_token_normalization: bool
    description: str
    l0: float | None = None
    fvu: float | None = None
    dead_fraction: float | None = None
    ce_loss_delta: float | None = None
