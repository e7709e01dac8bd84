"""Quality figures on the held-out split: L0, FVU, dead fraction, CE loss increase.

Definitions (DESIGN.md): BOS (position 0) is excluded everywhere. FVU aggregates over tokens:
sum ||y - y_hat||^2 / sum ||y - mu||^2 with mu the dataset mean stored with the dictionary
(y is the SAE input, or the MLP output for transcoders). L0 is the mean count of non-zero
features per token. Dead fraction is the share of features never active on the eval tokens.
The CE increase splices the reconstruction into the forward pass at every non-BOS position
(transcoders replace ``hook_mlp_out`` with their output from ``ln2.hook_normalized``) and
averages next-token loss over predictions made at positions 1..CTX-2.

Every figure encodes and decodes with the server's dictionary runtime (``Dictionary``), so it
measures exactly what is served.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from featuresteer_server.dictionaries import Dictionary


@dataclass
class Accumulator:
    """Running sums for one dictionary."""

    d_sae: int
    sq_err: float = 0.0
    sq_dev: float = 0.0
    l0_sum: float = 0.0
    n: int = 0
    fired: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    def __post_init__(self) -> None:
        self.fired = torch.zeros(self.d_sae, dtype=torch.bool)

    def add(self, acts: Tensor, y: Tensor, y_hat: Tensor, mean: Tensor) -> None:
        """acts [n, d_sae], y/y_hat [n, d_out] (non-BOS tokens only)."""
        self.sq_err += float((y - y_hat).pow(2).sum())
        self.sq_dev += float((y - mean).pow(2).sum())
        self.l0_sum += float((acts > 0).sum())
        self.n += y.shape[0]
        self.fired |= (acts > 0).any(0)

    def result(self) -> dict[str, float]:
        return {
            "l0": self.l0_sum / max(self.n, 1),
            "fvu": self.sq_err / max(self.sq_dev, 1e-12),
            "dead_fraction": float((~self.fired).float().mean()),
            "n_eval_tokens": self.n,
        }


def dataset_mean(d: Dictionary) -> Tensor:
    """[d_out] the FVU centre stored with the dictionary (0 when none is)."""
    return d.dataset_mean if d.dataset_mean is not None else torch.zeros(d.d_out)


def reconstruction_metrics(
    dicts: dict[str, Dictionary], batches: list[dict[str, Tensor]]
) -> dict[str, dict[str, float]]:
    """L0 / FVU / dead fraction from precomputed activations ({hook: [n, d]} per batch)."""
    accs = {name: Accumulator(d.d_sae) for name, d in dicts.items()}
    with torch.no_grad():
        for acts in batches:
            for name, d in dicts.items():
                x = acts[d.hook_name].float()
                y = acts[d.hook_name_out].float()
                a = d.encode(x)
                accs[name].add(a, y, d.reconstruct_from(a, x), dataset_mean(d))
    return {name: acc.result() for name, acc in accs.items()}


def run_eval_hooks(
    model: Any, windows: np.ndarray, hooks: list[str], batch: int = 16
) -> Iterator[dict[str, Tensor]]:
    """Yield {hook: [b*(CTX-1), d]} for eval windows (BOS dropped)."""
    from featuresteer_dicts.activations import run_hooks

    for i in range(0, windows.shape[0], batch):
        acts = run_hooks(model, windows[i : i + batch], hooks)
        yield {h: a.reshape(-1, a.shape[-1]) for h, a in acts.items()}


def _token_loss(logits: Tensor, toks: Tensor) -> Tensor:
    """Mean next-token loss over predictions made at positions 1..T-2 (BOS row excluded)."""
    logp = torch.log_softmax(logits[:, 1:-1].float(), dim=-1)
    target = toks[:, 2:]
    return -logp.gather(-1, target[..., None]).squeeze(-1).mean()


def ce_delta(model: Any, dicts: dict[str, Dictionary], windows: np.ndarray) -> dict[str, float]:
    """Spliced minus clean next-token loss per dictionary on ``windows``."""
    toks = torch.as_tensor(np.array(windows), dtype=torch.long)
    with torch.no_grad():
        clean = float(_token_loss(model(toks), toks))
        out: dict[str, float] = {}
        for name, d in dicts.items():
            stash: dict[str, Tensor] = {}

            def keep(act: Tensor, hook: Any, stash: dict[str, Tensor] = stash) -> Tensor:
                stash["x"] = act
                return act

            def splice(
                act: Tensor, hook: Any, d: Dictionary = d, stash: dict[str, Tensor] = stash
            ) -> Tensor:
                x = stash.get("x", act)  # [b, T, d_in]
                new = act.clone()
                flat = x[:, 1:].reshape(-1, x.shape[-1])
                rec = d.reconstruct(flat).view(act.shape[0], -1, act.shape[-1])
                new[:, 1:] = rec.to(act.dtype)
                return new

            hooks: list[tuple[str, Callable[..., Tensor]]] = [(d.hook_name_out, splice)]
            if d.hook_name != d.hook_name_out:
                hooks.insert(0, (d.hook_name, keep))
            logits = model.run_with_hooks(toks, fwd_hooks=hooks)
            out[name] = float(_token_loss(logits, toks)) - clean
    out["__clean__"] = clean
    return out
