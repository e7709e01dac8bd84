"""SAELens ``topk``: keep the k largest pre-activations per token (then ReLU), zero the rest.

``topk_activation`` is the one definition of TopK encoding (selection + ReLU): the runtime
class below, the dictionaries tooling's trainer and its quick-fit all call it, so a dictionary
trains, is measured and is served with the same rule.

With ``rescale_acts_by_decoder_norm`` the selection ranks pre-activations multiplied by each
feature's decoder norm ‖W_dec[i]‖, and the decoder divides the activations by that norm again,
so feature i contributes v·W_dec[i]/‖W_dec[i]‖ (SAELens ``act_times_W_dec``); ``contrib``
and ``decoder_direction`` honour this. Ties at the k-th value may resolve differently across
kernels (DESIGN.md). A feature outside the top k has activation 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Dictionary


def topk_select(hidden_pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row, unsorted: ([..., k] values, [..., k] indices)."""
    values, indices = torch.topk(hidden_pre, k=k, dim=-1, sorted=False)
    return values, indices


def topk_activation(hidden_pre: Tensor, k: int) -> Tensor:
    """TopK encoding: [..., d_sae] pre-activations -> [..., d_sae] with the k largest of each
    row kept (after a ReLU) and every other entry 0. Differentiable (training uses it)."""
    values, indices = topk_select(hidden_pre, k)
    return torch.zeros_like(hidden_pre).scatter_(-1, indices, values.relu())


class TopKSAE(Dictionary):
    """TopK SAE (SAELens ``TopKSAE``)."""

    architecture = "topk"

    def _post_init(self) -> None:
        if self.k is None or not 0 < self.k <= self.d_sae:
            raise ValueError(f"topk dictionary {self.id!r} needs 0 < k <= d_sae, got k={self.k}")
        # [d_sae]; clamped as SAELens's get_W_dec_norm does, so a zero row cannot give NaN
        self._dec_norm: Tensor | None
        self.register_buffer(
            "_dec_norm",
            self.W_dec.norm(dim=-1).clamp_min(1e-8)
            if self.cfg.rescale_acts_by_decoder_norm
            else None,
            persistent=False,
        )

    def _activate(self, hidden_pre: Tensor) -> Tensor:
        if self._dec_norm is not None:
            hidden_pre = hidden_pre * self._dec_norm
        assert self.k is not None
        return topk_activation(hidden_pre, self.k)  # [..., d_sae]

    def _feature_scale(self) -> Tensor | None:
        return None if self._dec_norm is None else 1.0 / self._dec_norm
