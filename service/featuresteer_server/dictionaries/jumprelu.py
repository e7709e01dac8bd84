"""SAELens ``jumprelu``: acts = relu(h)·[h > threshold], h = x' @ W_enc + b_enc.

The threshold test runs in float32 (bf16 flips it; DESIGN.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Dictionary


def jumprelu(hidden_pre: Tensor, threshold: Tensor) -> Tensor:
    """[..., d_sae] pre-activations, [d_sae] thresholds -> [..., d_sae] (SAELens's order)."""
    return torch.relu(hidden_pre) * (hidden_pre > threshold).to(hidden_pre.dtype)


class JumpReLUSAE(Dictionary):
    """JumpReLU SAE (SAELens ``JumpReLUSAE``)."""

    architecture = "jumprelu"
    extra_parameters = {"threshold": "d_sae"}
    threshold: nn.Parameter  # [d_sae]

    def _activate(self, hidden_pre: Tensor) -> Tensor:
        return jumprelu(hidden_pre, self.threshold)
