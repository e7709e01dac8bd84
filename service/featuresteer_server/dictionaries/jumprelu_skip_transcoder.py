"""SAELens ``jumprelu_skip_transcoder``: JumpReLU activations plus the skip path x @ W_skip.T."""

from __future__ import annotations

from torch import Tensor, nn

from .jumprelu import jumprelu
from .skip_transcoder import SkipTranscoder


class JumpReLUSkipTranscoder(SkipTranscoder):
    """JumpReLU transcoder with a skip connection (SAELens ``JumpReLUSkipTranscoder``)."""

    architecture = "jumprelu_skip_transcoder"
    extra_parameters = {"threshold": "d_sae", "W_skip": "d_out,d_in"}
    threshold: nn.Parameter  # [d_sae]

    def _activate(self, hidden_pre: Tensor) -> Tensor:
        return jumprelu(hidden_pre, self.threshold)
