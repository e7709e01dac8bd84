"""Synthetic ``features.npz`` files in exactly the format of
``dictionaries/featuresteer_dicts/metadata.py`` (its module docstring), for catalog tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_TOP = 4  # examples per feature
WIDTH = 16  # tokens per stored slice (metadata.WIDTH)
N_LOGITS = 10


def write_features_npz(
    path: Path,
    d_sae: int,
    *,
    seed: int = 0,
    vocab: int = 49152,
    labels: dict[int, str] | None = None,
    tokens: dict[int, list[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Write a random but well-formed ``features.npz``; returns the arrays written.

    ``labels`` overrides labels per feature; ``tokens`` sets feature i's first example's
    tokens (activation 1.0 on each, the feature's max activation).
    """
    rng = np.random.default_rng(seed)
    top_len = rng.integers(1, WIDTH + 1, size=(d_sae, N_TOP)).astype(np.uint8)
    top_len[0, 2:] = 0  # feature 0 has only two examples
    top_tokens = rng.integers(1000, 2000, size=(d_sae, N_TOP, WIDTH)).astype(np.uint16)
    top_acts = rng.uniform(0, 1, size=(d_sae, N_TOP, WIDTH)).astype(np.float16)
    pad = np.arange(WIDTH)[None, None, :] >= top_len[:, :, None]
    top_tokens[pad] = 0
    top_acts[pad] = 0
    if d_sae > 1:  # a dead feature: no examples, density 0
        top_len[d_sae - 1] = 0
        top_tokens[d_sae - 1] = 0
        top_acts[d_sae - 1] = 0
    for i, ids in (tokens or {}).items():
        top_len[i, 0] = len(ids)
        top_tokens[i, 0, :] = 0
        top_tokens[i, 0, : len(ids)] = ids
        top_acts[i, 0, :] = 0
        top_acts[i, 0, : len(ids)] = 5.0
    top_max = top_acts.astype(np.float32).max(-1)  # [F, N]
    order = np.argsort(-top_max, axis=1, kind="stable")
    top_max = np.take_along_axis(top_max, order, 1)
    top_len = np.take_along_axis(top_len, order, 1)
    top_tokens = np.take_along_axis(top_tokens, order[:, :, None], 1)
    top_acts = np.take_along_axis(top_acts, order[:, :, None], 1)
    has = top_len > 0
    max_activation = top_max.max(1).astype(np.float32)
    density = np.where(has.any(1), rng.uniform(1e-4, 0.1, size=d_sae), 0).astype(np.float32)
    logit_top_ids = rng.integers(0, vocab, size=(d_sae, N_LOGITS)).astype(np.int32)
    logit_bottom_ids = rng.integers(0, vocab, size=(d_sae, N_LOGITS)).astype(np.int32)
    logit_top_vals = -np.sort(-rng.uniform(0, 5, size=(d_sae, N_LOGITS)), 1).astype(np.float32)
    logit_bottom_vals = np.sort(-rng.uniform(0, 5, size=(d_sae, N_LOGITS)), 1).astype(np.float32)
    label_list = [
        f"fires on ['tok{i}']; promotes ['out{i}']; density {density[i]:.2e}"
        if has[i].any()
        else "dead: no activation in the scanned tokens"
        for i in range(d_sae)
    ]
    for i, text in (labels or {}).items():
        label_list[i] = text
    arrays = dict(
        density=density,
        max_activation=max_activation,
        n_tokens_scanned=np.int64(100_000),
        top_tokens=top_tokens,
        top_acts=top_acts,
        top_len=top_len,
        top_max=top_max.astype(np.float32),
        top_window=np.where(has, rng.integers(0, 800, size=(d_sae, N_TOP)), -1).astype(np.int32),
        top_start=np.where(has, 1, -1).astype(np.int16),
        top_argmax=np.where(has, 5, -1).astype(np.int16),
        logit_top_ids=logit_top_ids,
        logit_top_vals=logit_top_vals,
        logit_bottom_ids=logit_bottom_ids,
        logit_bottom_vals=logit_bottom_vals,
        labels=np.array(label_list),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
    return arrays
