"""SAELens ``standard``: a ReLU sparse autoencoder. acts = relu(x' @ W_enc + b_enc)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Dictionary


class StandardSAE(Dictionary):
    """ReLU SAE (SAELens ``StandardSAE``)."""

    architecture = "standard"

    def _activate(self, hidden_pre: Tensor) -> Tensor:
        return torch.relu(hidden_pre)  # [..., d_sae]
