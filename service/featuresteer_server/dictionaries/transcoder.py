"""SAELens ``transcoder``: a ReLU dictionary that reads the MLP input and writes the MLP output.

Input hook ``blocks.L.ln2.hook_normalized`` (d_in), output hook ``blocks.L.hook_mlp_out``
(d_out); b_dec is [d_out] and is never subtracted from the input (SAELens refuses
``apply_b_dec_to_input`` for transcoders, and so do we at load). The reconstruction target of
``error_stats`` is the MLP output. Steering adds δ at the output hook; see DESIGN.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Dictionary


class Transcoder(Dictionary):
    """ReLU transcoder (SAELens ``Transcoder``)."""

    architecture = "transcoder"
    is_transcoder = True

    def _activate(self, hidden_pre: Tensor) -> Tensor:
        return torch.relu(hidden_pre)  # [..., d_sae]
