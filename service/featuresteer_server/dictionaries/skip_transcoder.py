"""SAELens ``skip_transcoder``: a ReLU transcoder plus a linear skip path x @ W_skip.T.

``W_skip`` is [d_out, d_in] as SAELens stores it. ``decode`` leaves the skip term out (it
needs x); ``reconstruct`` and ``skip`` include it. Feature edits never touch it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .transcoder import Transcoder


class SkipTranscoder(Transcoder):
    """ReLU transcoder with a skip connection (SAELens ``SkipTranscoder``)."""

    architecture = "skip_transcoder"
    has_skip = True
    extra_parameters = {"W_skip": "d_out,d_in"}
    W_skip: nn.Parameter  # [d_out, d_in]

    def skip(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., d_out]: x @ W_skip.T."""
        return x.to(torch.float32) @ self.W_skip.T
