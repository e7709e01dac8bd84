"""A Generate request planned for either engine: the run plans (prompt ids, compiled
steering, sampling, the per-token trace) both generation engines execute. The hooked engine's
``plan_generate`` builds them today; the vLLM engine runs the same plans.

Must not: run a model, import an engine, parse protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from featuresteer_server.interventions import SteeringSpec


@dataclass(frozen=True)
class TracePlan:
    """What to report per generated token: ``top_k`` of ``dictionary`` and/or ``features``."""

    dictionary: Any
    top_k: int
    features: tuple[int, ...] = ()

    def report(self, acts: Tensor) -> list[tuple[tuple[int, float], ...]]:
        """[n, d_sae] float32 -> per row (index, activation) pairs: the top-k active features
        (activation > 0), then the chosen features not already listed (even at 0)."""
        out: list[tuple[tuple[int, float], ...]] = []
        top_v = top_i = None
        if self.top_k > 0:
            top_v, top_i = torch.topk(acts, min(self.top_k, acts.shape[-1]), dim=-1)
        for r in range(acts.shape[0]):
            pairs: list[tuple[int, float]] = []
            if top_v is not None and top_i is not None:
                pairs = [
                    (int(i), float(v))
                    for i, v in zip(top_i[r].tolist(), top_v[r].tolist(), strict=True)
                    if v > 0
                ]
            have = {i for i, _ in pairs}
            pairs += [(i, float(acts[r, i])) for i in self.features if i not in have]
            out.append(tuple(pairs))
        return out


@dataclass
class RunPlan:
    """One generation run (the steered one, or the baseline with an empty spec)."""

    prompt_ids: list[int]
    spec: SteeringSpec
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    trace: TracePlan | None = None
    baseline: bool = False
