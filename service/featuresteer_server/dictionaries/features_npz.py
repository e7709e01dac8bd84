"""The feature metadata file, ``features.npz``: its format, its writer and its reader.

One file per dictionary, beside its weights (or where the catalog entry's ``metadata`` points),
written offline by the dictionaries tooling (``featuresteer_dicts.metadata``) and read by the
server's feature catalog (GetFeature / SearchFeatures). ``np.savez_compressed`` output: plain
arrays, no pickles. F = d_sae, N = stored examples per feature, W = tokens per context slice.

- ``density`` [F] float32: fraction of scanned tokens (BOS excluded) where the feature is > 0.
- ``max_activation`` [F] float32, ``n_tokens_scanned`` [] int64.
- ``top_tokens`` [F, N, W] uint16 token ids, ``top_acts`` [F, N, W] float16 per-token
  activations of that feature, ``top_len`` [F, N] uint8 valid tokens (0 = no example),
  ``top_max`` [F, N] float32 (the example's max activation, sorted descending),
  ``top_window`` [F, N] int32 index of the window in the corpus ``train`` split,
  ``top_start`` [F, N] int16 position in that window of the slice's first token,
  ``top_argmax`` [F, N] int16 position in the window of the max-activating token.
  Activations were computed with the whole window as context (BOS + up to 127 tokens), so
  replay needs the window prefix: ``train[top_window][: top_argmax + 1]``.
- ``logit_top_ids``/``logit_bottom_ids`` [F, L] int32 and ``..._vals`` [F, L] float32:
  the decoder row times ``ln_final.w`` through ``W_U`` (direct effect on the logits).
- ``labels`` [F] unicode: most common max-activating tokens + top promoted tokens; no
  semantics are invented.

Must not: import torch (the catalog reads these files without it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

FILENAME = "features.npz"

# name -> (dtype, rank); every array but the scalar n_tokens_scanned has F rows. "U" is any
# unicode width. Written in this order.
FIELDS: dict[str, tuple[str, int]] = {
    "density": ("float32", 1),
    "max_activation": ("float32", 1),
    "n_tokens_scanned": ("int64", 0),
    "top_tokens": ("uint16", 3),
    "top_acts": ("float16", 3),
    "top_len": ("uint8", 2),
    "top_max": ("float32", 2),
    "top_window": ("int32", 2),
    "top_start": ("int16", 2),
    "top_argmax": ("int16", 2),
    "logit_top_ids": ("int32", 2),
    "logit_top_vals": ("float32", 2),
    "logit_bottom_ids": ("int32", 2),
    "logit_bottom_vals": ("float32", 2),
    "labels": ("U", 1),
}

# what GetFeature / SearchFeatures read (the rest is for replay and provenance)
SERVED = (
    "density",
    "max_activation",
    "top_tokens",
    "top_acts",
    "top_len",
    "logit_top_ids",
    "logit_top_vals",
    "logit_bottom_ids",
    "logit_bottom_vals",
    "labels",
)


def _check(arrays: Mapping[str, np.ndarray], n_features: int | None, where: str) -> int:
    """Ranks, dtypes and a common feature count; returns the feature count."""
    for name, array in arrays.items():
        dtype, rank = FIELDS[name]
        if array.ndim != rank:
            raise ValueError(f"{where}: {name} has rank {array.ndim}, expected {rank}")
        kind_ok = array.dtype.kind == "U" if dtype == "U" else array.dtype == np.dtype(dtype)
        if not kind_ok:
            raise ValueError(f"{where}: {name} has dtype {array.dtype}, expected {dtype}")
    n = n_features
    for name, array in arrays.items():
        if array.ndim == 0:
            continue
        if n is None:
            n = int(array.shape[0])
        elif array.shape[0] != n:
            what = "features, the dictionary has" if name == "density" else "rows, expected"
            raise ValueError(f"{where}: {name} has {array.shape[0]} {what} {n}")
    return n or 0


def write(path: Path, arrays: Mapping[str, Any]) -> Path:
    """Save every array of the format (values cast to its dtype) as ``path``.

    Raises:
        ValueError: an array is missing or unknown, or the shapes disagree.
    """
    missing = sorted(set(FIELDS) - set(arrays))
    extra = sorted(set(arrays) - set(FIELDS))
    if missing or extra:
        raise ValueError(f"{path}: missing arrays {missing}, unknown arrays {extra}")
    typed = {
        name: np.asarray(arrays[name]) if dtype == "U" else np.asarray(arrays[name], dtype=dtype)
        for name, (dtype, _) in FIELDS.items()
    }
    _check(typed, None, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **typed)  # type: ignore[arg-type]
    return path


def read(path: Path, d_sae: int, names: Iterable[str] = SERVED) -> dict[str, np.ndarray]:
    """The arrays ``names`` of ``path``, checked against the format and the dictionary's d_sae.

    Raises:
        ValueError: an array is missing, or its dtype, rank or feature count is wrong.
        OSError: the file cannot be read.
    """
    wanted = list(names)
    unknown = sorted(set(wanted) - set(FIELDS))
    if unknown:
        raise ValueError(f"{path}: {unknown} are not arrays of the features.npz format")
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in wanted if k not in npz.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}")
        out = {k: npz[k] for k in wanted}
    _check(out, d_sae, str(path))
    return out
