"""SAELens ``jumprelu_transcoder``: a transcoder with JumpReLU activations (threshold [d_sae])."""

from __future__ import annotations

from torch import Tensor, nn

from .jumprelu import jumprelu
from .transcoder import Transcoder


class JumpReLUTranscoder(Transcoder):
    """JumpReLU transcoder (SAELens ``JumpReLUTranscoder``)."""

    architecture = "jumprelu_transcoder"
    extra_parameters = {"threshold": "d_sae"}
    threshold: nn.Parameter  # [d_sae]

    def _activate(self, hidden_pre: Tensor) -> Tensor:
        return jumprelu(hidden_pre, self.threshold)
