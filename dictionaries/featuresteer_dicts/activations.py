"""Activation extraction through the serving engine's HookedTransformer.

Residual SAEs train from an on-disk float16 cache (one forward to the deepest SAE layer gives
all four layers). Transcoders cannot be cached (30 layers x 2 hooks ~ 70 kB per token), so
``iter_mlp_pairs`` streams them from forward passes instead: there the plain transformers
model runs with forward hooks at the modules the tap table names (``featuresteer_server.taps``;
about 1.5x the HookedTransformer's tokens/s on this CPU) and recomputes TransformerLens's
``ln2.hook_normalized`` with the table's helper (normalised, before the weight); an e2e test
checks both captures agree. BOS (position 0) is always dropped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featuresteer_dicts.common import (
    CORPUS_VERSION,
    CTX,
    D_MODEL,
    Progress,
    cache_root,
    write_json_atomic,
)
from featuresteer_dicts.corpus import load_split

SAE_TRAIN_WINDOWS = 7880  # x 127 = 1.0M training tokens per SAE layer


def acts_dir() -> Path:
    path = cache_root() / "acts" / CORPUS_VERSION
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_hooks(model: Any, windows: np.ndarray, hooks: Sequence[str]) -> dict[str, Any]:
    """{hook: [batch, CTX - 1, d] float32} for token windows, stopping after the last hook."""
    import torch

    layers = [int(h.split(".")[1]) for h in hooks]
    stop = max(layers) + 1  # exclusive; n_layers skips only ln_final and the unembedding
    toks = torch.as_tensor(np.array(windows), dtype=torch.long)
    wanted = set(hooks)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            toks, names_filter=lambda n: n in wanted, stop_at_layer=stop
        )
    return {h: cache[h][:, 1:, :] for h in hooks}


def cache_resid(
    model: Any, hooks: Sequence[str], progress: Progress, batch: int = 16, limit: int | None = None
) -> Path:
    """Fill ``acts/<corpus version>/<hook>.npy`` ([SAE_TRAIN_WINDOWS * (CTX-1), d] fp16) up to
    ``limit`` windows; resumable."""
    out = acts_dir()
    state_path = out / "resid_state.json"
    n_tok = SAE_TRAIN_WINDOWS * (CTX - 1)
    done = json.loads(state_path.read_text())["windows"] if state_path.is_file() else 0
    mode = "r+" if done else "w+"
    maps = {
        h: np.lib.format.open_memmap(
            out / f"{h}.npy", mode=mode, dtype=np.float16, shape=(n_tok, D_MODEL)
        )
        for h in hooks
    }
    train = load_split("train")
    t0, start = time.time(), done
    target = min(limit or SAE_TRAIN_WINDOWS, SAE_TRAIN_WINDOWS)
    while done < target:
        stop = min(done + batch, target)
        acts = run_hooks(model, train[done:stop], hooks)
        lo, hi = done * (CTX - 1), stop * (CTX - 1)
        for h in hooks:
            maps[h][lo:hi] = acts[h].reshape(-1, D_MODEL).numpy().astype(np.float16)
            maps[h].flush()
        done = stop
        write_json_atomic(state_path, {"windows": done})
        rate = (done - start) * (CTX - 1) / max(time.time() - t0, 1e-6)
        progress(f"resid cache {done}/{SAE_TRAIN_WINDOWS} windows ({rate:.0f} tok/s)")
    return out


def cached_windows() -> int:
    """How many windows the residual cache holds so far (written after each flush)."""
    path = acts_dir() / "resid_state.json"
    return int(json.loads(path.read_text())["windows"]) if path.is_file() else 0


def load_hf_model(n_threads: int = 1) -> Any:
    """The default model as plain transformers float32 (the model the hooked engine wraps)."""
    import torch

    from featuresteer_server.models import load_hf, prepare_default_model

    torch.set_num_threads(n_threads)
    hf, _ = load_hf(prepare_default_model(), torch.float32)
    return hf


def mlp_pairs(hf: Any, windows: np.ndarray) -> dict[str, Any]:
    """{``blocks.L.ln2.hook_normalized`` / ``blocks.L.hook_mlp_out``: [n*(CTX-1), d] float32}
    for every layer, from one plain-transformers forward (BOS dropped)."""
    import torch

    from featuresteer_dicts.common import tc_hooks
    from featuresteer_server import taps

    fam = taps.hf_family(hf)
    out: dict[str, Any] = {}
    handles = []
    for layer in range(fam.n_layers(hf)):
        h_in, h_out = tc_hooks(layer)
        norm, _ = fam.module(hf, h_in)  # the MLP's norm: its input, normalised (no weight)
        mlp, _ = fam.module(hf, h_out)

        def take_in(mod: Any, args: Any, name: str = h_in) -> None:
            out[name] = fam.normalized(mod, args[0])

        def take_out(mod: Any, args: Any, result: Any, name: str = h_out) -> None:
            out[name] = result

        handles.append(norm.register_forward_pre_hook(take_in))
        handles.append(mlp.register_forward_hook(take_out))
    try:
        toks = torch.as_tensor(np.array(windows), dtype=torch.long)
        with torch.no_grad():
            hf.model(input_ids=toks, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: v[:, 1:, :].reshape(-1, v.shape[-1]) for k, v in out.items()}


def iter_mlp_pairs(
    hf: Any, split: str, start: int, stop: int, batch: int
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (next window index, ``mlp_pairs``) over windows [start, stop) of a split."""
    windows = load_split(split)
    i = start
    while i < stop:
        j = min(i + batch, stop)
        yield j, mlp_pairs(hf, windows[i:j])
        i = j
