"""Training runs: residual SAEs from the activation cache, transcoders streamed from forwards.

Both runs checkpoint to ``~/.cache/featuresteer/train/`` at least every ``CKPT_SECONDS`` and
resume from the checkpoint when started again (data order is a pure function of the seed and
the step, so a resumed run sees the same batches as an uninterrupted one).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from featuresteer_dicts.common import (
    CTX,
    D_MODEL,
    N_LAYERS,
    SAE_K,
    SAE_LAYERS,
    SAE_VERSION,
    SAE_WIDTH,
    SEED,
    TC_K,
    TC_VERSION,
    TC_WIDTH,
    Progress,
    sae_hook,
    tc_hooks,
    train_dir,
)

CKPT_SECONDS = 480
SAE_BATCH = 1016  # 8 windows of 127 tokens
SAE_CHUNK = 40  # windows shuffled together; 7880 = 197 chunks
TC_WINDOWS_PER_FORWARD = 8
TC_MINIBATCHES = 1
TC_DEFAULT_TOKENS = 1_000_000


def _save(path: Path, state: dict[str, Any]) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def sae_config() -> Any:
    from featuresteer_dicts.train import CoderConfig

    return CoderConfig(
        d_in=D_MODEL, d_sae=SAE_WIDTH, d_out=D_MODEL, k=SAE_K, lr=1e-3, dead_tokens=100_000
    )


def tc_config() -> Any:
    from featuresteer_dicts.train import CoderConfig

    return CoderConfig(
        d_in=D_MODEL,
        d_sae=TC_WIDTH,
        d_out=D_MODEL,
        k=TC_K,
        batch_topk=True,
        lr=1e-3,
        dead_tokens=50_000,
        row_cap=4 * TC_K,
        fused_adam=True,
        sparse_backward=True,
    )


def _stem(kind: str) -> str:
    """``sae-<SAE_VERSION>`` / ``tc-<TC_VERSION>``: cache files are named by version so a
    retrain never reuses another run's weights or checkpoint."""
    return f"{kind}-{SAE_VERSION if kind == 'sae' else TC_VERSION}"


def final_path(kind: str, layer: int) -> Path:
    """Trained float32 weights of one layer."""
    return train_dir() / f"{_stem(kind)}_L{layer}_final.pt"


def ckpt_path(kind: str) -> Path:
    return train_dir() / f"{_stem(kind)}_ckpt.pt"


def train_saes(
    progress: Progress,
    windows: int | None = None,
    epochs: int = 1,
    deadline: float | None = None,
) -> list[Path]:
    """``epochs`` passes over the first ``windows`` cached windows, all SAE layers in step,
    following the cache writer.

    The corpus windows are already shuffled, so reading the cache in order (shuffled within
    chunks of SAE_CHUNK windows) trains while the cache is still being written. ``windows``
    below the full cache (a compute cut-off) is recorded in the artifact's training_tokens;
    past ``deadline`` (unix time) training stops early and the fraction of epochs done is kept.
    """
    import torch

    from featuresteer_dicts.activations import SAE_TRAIN_WINDOWS, acts_dir, cached_windows
    from featuresteer_dicts.train import CoderTrainer

    outs = [final_path("sae", layer) for layer in SAE_LAYERS]
    if all(p.is_file() for p in outs):
        progress("SAEs already trained")
        return outs
    data_chunks = (windows or SAE_TRAIN_WINDOWS) // SAE_CHUNK
    n_chunks = data_chunks * epochs
    per_chunk = SAE_CHUNK * (CTX - 1) // SAE_BATCH
    steps = n_chunks * per_chunk
    torch.manual_seed(SEED)
    trainers = [CoderTrainer(sae_config(), steps, SEED + layer) for layer in SAE_LAYERS]
    ckpt = ckpt_path("sae")
    chunk = 0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        for tr, st in zip(trainers, state["trainers"], strict=True):
            tr.load_state_dict(st)
            tr.total_steps = steps
        chunk = int(state["next_chunk"])
        progress(f"SAEs: resumed at chunk {chunk} of {n_chunks}")
    maps = [np.load(acts_dir() / f"{sae_hook(layer)}.npy", mmap_mode="r") for layer in SAE_LAYERS]
    last, t0, c0 = time.time(), time.time(), chunk
    while chunk < n_chunks:
        if deadline is not None and time.time() > deadline:
            progress(f"SAEs: deadline reached at chunk {chunk} of {n_chunks}")
            _save(ckpt, {"trainers": [t.state_dict() for t in trainers], "next_chunk": chunk})
            break
        data = chunk % data_chunks
        hi = (data + 1) * SAE_CHUNK
        while cached_windows() < hi:
            time.sleep(5)
        rows = slice(data * SAE_CHUNK * (CTX - 1), hi * (CTX - 1))
        order = np.random.default_rng([SEED, chunk]).permutation(rows.stop - rows.start)
        for tr, mm in zip(trainers, maps, strict=True):
            block = torch.from_numpy(np.asarray(mm[rows], dtype=np.float32)[order])
            for b in range(per_chunk):
                x = block[b * SAE_BATCH : (b + 1) * SAE_BATCH]
                stats = tr.train_step(x, x)
            if chunk % 5 == 0 or chunk == n_chunks - 1:
                rate = (chunk + 1 - c0) * SAE_CHUNK * (CTX - 1) / max(time.time() - t0, 1e-6)
                progress(
                    f"SAE step {tr.step}/{steps} chunk {chunk + 1}/{n_chunks} "
                    f"{json.dumps(stats)} ({rate:.0f} tok/s per layer)"
                )
        chunk += 1
        if time.time() - last > CKPT_SECONDS or chunk == n_chunks:
            _save(ckpt, {"trainers": [t.state_dict() for t in trainers], "next_chunk": chunk})
            last = time.time()
    for layer, tr, out in zip(SAE_LAYERS, trainers, outs, strict=True):
        _save(
            out,
            {
                "weights": tr.coder.export(),
                "cfg": tr.coder.cfg.__dict__,
                "layer": layer,
                "train_tokens": data_chunks * per_chunk * SAE_BATCH,
                "epochs": round(chunk / data_chunks, 3),
            },
        )
    return outs


def train_transcoders(progress: Progress, tokens: int = TC_DEFAULT_TOKENS) -> list[Path]:
    """All 30 transcoders at once, each forward pass feeding every layer's pair."""
    import torch

    from featuresteer_dicts.activations import iter_mlp_pairs, load_hf_model
    from featuresteer_dicts.train import CoderTrainer

    outs = [final_path("tc", layer) for layer in range(N_LAYERS)]
    if all(p.is_file() for p in outs):
        progress("transcoders already trained")
        return outs
    n_windows = -(-tokens // (CTX - 1))
    per_fwd = TC_WINDOWS_PER_FORWARD
    steps = n_windows // per_fwd * TC_MINIBATCHES
    torch.manual_seed(SEED)
    trainers = [CoderTrainer(tc_config(), steps, SEED + 100 + layer) for layer in range(N_LAYERS)]
    ckpt = ckpt_path("tc")
    start = 0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        for tr, st in zip(trainers, state["trainers"], strict=True):
            tr.load_state_dict(st)
        start = int(state["next_window"])
        progress(f"transcoders: resumed at window {start}")
    hf = load_hf_model(torch.get_num_threads())
    stop = n_windows // per_fwd * per_fwd
    last, t0 = time.time(), time.time()
    for i, (nxt, acts) in enumerate(iter_mlp_pairs(hf, "train", start, stop, per_fwd)):
        fvus, l0s, deads = [], [], []
        for layer, tr in enumerate(trainers):
            h_in, h_out = tc_hooks(layer)
            xs = acts[h_in].chunk(TC_MINIBATCHES)
            ys = acts[h_out].chunk(TC_MINIBATCHES)
            for x, y in zip(xs, ys, strict=True):
                stats = tr.train_step(x, y)
            fvus.append(stats["fvu"])
            l0s.append(stats["l0"])
            deads.append(stats["dead"])
        if i % 5 == 0 or nxt == stop:
            rate = (nxt - start) * (CTX - 1) / max(time.time() - t0, 1e-6)
            progress(
                f"transcoders window {nxt}/{stop} ({rate:.0f} tok/s) fvu "
                + " ".join(f"{v:.2f}" for v in fvus)
                + f" | l0 mean {np.mean(l0s):.1f} dead max {max(deads):.2f}"
            )
        if time.time() - last > CKPT_SECONDS or nxt == stop:
            _save(ckpt, {"trainers": [t.state_dict() for t in trainers], "next_window": nxt})
            last = time.time()
            progress(f"checkpoint at window {nxt}")
    for layer, tr in enumerate(trainers):
        _save(
            outs[layer],
            {
                "weights": tr.coder.export(),
                "cfg": tr.coder.cfg.__dict__,
                "train_tokens": stop * (CTX - 1),
            },
        )
    return outs
