"""Feature metadata: density, max activation, top contexts, output tokens, an evidence label.

The file, ``features.npz`` (one per dictionary), has its format, writer and reader in the
server's ``featuresteer_server.dictionaries.features_npz``; this module computes what goes in
it: top examples are slices of WIDTH tokens with LEAD tokens before the max-activating one,
and N_LOGITS promoted / suppressed tokens per feature.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from featuresteer_server.dictionaries import features_npz

WIDTH = 16  # tokens per stored context slice
LEAD = 12  # tokens before the max-activating one
N_LOGITS = 10


class FeatureStats:
    """Streaming per-feature statistics over [B, T, F] activations (T = positions 1..CTX-1)."""

    def __init__(self, d_sae: int, n_top: int) -> None:
        self.n_top = n_top
        self.count = torch.zeros(d_sae, dtype=torch.long)
        self.max = torch.zeros(d_sae)
        self.n_tokens = 0
        self.best_val = torch.full((n_top, d_sae), -1.0)
        self.best_win = torch.full((n_top, d_sae), -1, dtype=torch.long)
        self.best_pos = torch.zeros((n_top, d_sae), dtype=torch.long)
        self.best_slice = torch.zeros((n_top, WIDTH, d_sae))

    def update(self, acts: Tensor, window_ids: Tensor) -> None:
        """acts [B, T, F] float32 of windows ``window_ids`` [B]."""
        b, t, f = acts.shape
        self.n_tokens += b * t
        self.count += (acts > 0).sum((0, 1))
        vmax, amax = acts.max(dim=1)  # [B, F]
        self.max = torch.maximum(self.max, vmax.max(0).values)
        offs = torch.arange(WIDTH) - LEAD
        idx = amax[:, None, :] + offs[None, :, None]  # [B, W, F]
        valid = (idx >= 0) & (idx < t)
        sl = acts.gather(1, idx.clamp(0, t - 1)) * valid
        vals = torch.cat([self.best_val, torch.where(vmax > 0, vmax, -1.0)])
        wins = torch.cat([self.best_win, window_ids[:, None].expand(b, f)])
        poss = torch.cat([self.best_pos, amax])
        slices = torch.cat([self.best_slice, sl])
        top = vals.topk(self.n_top, dim=0).indices  # [N, F]
        self.best_val = vals.gather(0, top)
        self.best_win = wins.gather(0, top)
        self.best_pos = poss.gather(0, top)
        self.best_slice = slices.gather(0, top[:, None, :].expand(-1, WIDTH, -1))


def output_tokens(w_dec: Tensor, ln_w: Tensor, w_u: Tensor) -> tuple[Tensor, ...]:
    """Top/bottom promoted tokens of each decoder row through the final norm and unembedding."""
    tops, topv, bots, botv = [], [], [], []
    for chunk in w_dec.split(512):
        logits = (chunk * ln_w) @ w_u  # [c, vocab]
        v, i = logits.topk(N_LOGITS, dim=-1)
        tops.append(i)
        topv.append(v)
        v, i = (-logits).topk(N_LOGITS, dim=-1)
        bots.append(i)
        botv.append(-v)
    return torch.cat(tops), torch.cat(topv), torch.cat(bots), torch.cat(botv)


def _label(tok: Any, ctx_ids: list[int], out_ids: list[int], density: float) -> str:
    if not ctx_ids:
        return "dead: no activation in the scanned tokens"
    common = [tok.decode([i]) for i, _ in Counter(ctx_ids).most_common(3)]
    outs = [tok.decode([i]) for i in out_ids[:3]]
    return f"fires on {common!r}; promotes {outs!r}; density {density:.2e}"


def write_metadata(
    out: Path, stats: FeatureStats, windows: np.ndarray, w_dec: Tensor, model: Any, tok: Any
) -> dict[str, float]:
    """Assemble and save ``features.npz``; returns summary numbers for the README."""
    n, f = stats.best_val.shape
    ctx = windows.shape[1]
    has = stats.best_val > 0  # [N, F]
    start = (stats.best_pos + 1 - LEAD).clamp_min(1)  # window positions; acts t -> pos t + 1
    top_tokens = np.zeros((f, n, WIDTH), dtype=np.uint16)
    top_len = np.zeros((f, n), dtype=np.uint8)
    top_acts = np.zeros((f, n, WIDTH), dtype=np.float16)
    wins = stats.best_win.numpy()
    pos = stats.best_pos.numpy()
    centre_tokens: list[list[int]] = [[] for _ in range(f)]
    sl = stats.best_slice.numpy()  # [N, W, F], slot j <-> window pos (pos + 1 - LEAD + j)
    for j in range(n):
        for i in np.nonzero(has[j].numpy())[0]:
            w, p = int(wins[j, i]), int(pos[j, i]) + 1
            lo = max(1, p - LEAD)
            hi = min(ctx, p - LEAD + WIDTH)
            toks = windows[w, lo:hi]
            first = lo - (p - LEAD)
            top_tokens[i, j, : hi - lo] = toks
            top_acts[i, j, : hi - lo] = sl[j, first : first + hi - lo, i]
            top_len[i, j] = hi - lo
            centre_tokens[i].append(int(windows[w, p]))
    ln_w = model.ln_final.w.detach().float()
    w_u = model.W_U.detach().float()
    ti, tv, bi, bv = output_tokens(w_dec.float(), ln_w, w_u)
    density = (stats.count.float() / max(stats.n_tokens, 1)).numpy()
    labels = [_label(tok, centre_tokens[i], ti[i].tolist(), float(density[i])) for i in range(f)]
    arrays = {
        "density": density,
        "max_activation": stats.max.numpy(),
        "n_tokens_scanned": np.int64(stats.n_tokens),
        "top_tokens": top_tokens,
        "top_acts": top_acts,
        "top_len": top_len,
        "top_max": stats.best_val.clamp_min(0).t().contiguous().numpy(),
        "top_window": np.where(has.t().numpy(), wins.T, -1),
        "top_start": np.where(has.t().numpy(), start.t().numpy(), -1),
        "top_argmax": np.where(has.t().numpy(), pos.T + 1, -1),
        "logit_top_ids": ti.numpy(),
        "logit_top_vals": tv.numpy(),
        "logit_bottom_ids": bi.numpy(),
        "logit_bottom_vals": bv.numpy(),
        "labels": np.array(labels),
    }
    features_npz.write(out, arrays)
    full = int((top_len > 0).sum(1).__ge__(n).sum())
    return {"features_with_full_examples": full / f, "bytes": out.stat().st_size}
