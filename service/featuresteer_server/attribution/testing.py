"""Test and benchmark fixtures: tiny random Llama models and random per-layer transcoders.

Owns: ``RandomTranscoder`` (a ReLU transcoder, optionally with a skip path, exposing the
dictionaries runtime's attribute names) and builders used by unit tests, e2e tests, the
reference parity script and the benchmark. Must not: be imported by serving code.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn


class RandomTranscoder(nn.Module):
    """A ReLU (optionally skip) transcoder with SAELens names, float32, frozen.

    Pre-activations of ``x @ W_enc`` are about N(0, 1) for RMS-normalised inputs, so
    ``b_enc = -z`` makes a feature fire on about P(N(0,1) > z) of tokens.
    """

    is_transcoder = True
    architecture = "transcoder"

    def __init__(
        self,
        layer: int,
        d_model: int,
        d_sae: int,
        *,
        density: float = 0.02,
        skip: bool = False,
        decoder_scale: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1000 * seed + layer)
        z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - density)))
        w_enc = torch.randn(d_model, d_sae, generator=g) / d_model**0.5
        self.W_enc = nn.Parameter(w_enc, requires_grad=False)
        self.b_enc = nn.Parameter(-z + 0.1 * torch.randn(d_sae, generator=g), requires_grad=False)
        self.W_dec = nn.Parameter(
            decoder_scale * torch.randn(d_sae, d_model, generator=g), requires_grad=False
        )
        self.b_dec = nn.Parameter(0.05 * torch.randn(d_model, generator=g), requires_grad=False)
        self.has_skip = skip
        self.W_skip: nn.Parameter | None
        if skip:
            self.W_skip = nn.Parameter(
                0.05 * torch.randn(d_model, d_model, generator=g) / d_model**0.5,
                requires_grad=False,
            )
        else:
            self.W_skip = None
        self.hook_name = f"blocks.{layer}.ln2.hook_normalized"
        self.hook_name_out = f"blocks.{layer}.hook_mlp_out"
        self.d_in = self.d_out = d_model
        self.d_sae = d_sae
        self.id = f"random/transcoder-{d_sae}/{self.hook_name}@seed{seed}"
        h = hashlib.sha256()
        for t in (self.W_enc, self.b_enc, self.W_dec, self.b_dec):
            h.update(t.detach().numpy().tobytes())
        self.fingerprint = h.hexdigest()[:16]

    def pre_activations(self, x: Tensor) -> Tensor:
        return x.to(torch.float32) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_activations(x))

    def decode(self, acts: Tensor, x: Tensor | None = None) -> Tensor:
        return acts.to(torch.float32) @ self.W_dec + self.b_dec

    def skip(self, x: Tensor) -> Tensor:
        if self.W_skip is None:
            return torch.zeros_like(x, dtype=torch.float32)
        return x.to(torch.float32) @ self.W_skip.T

    def reconstruct(self, x: Tensor) -> Tensor:
        x = x.to(torch.float32)
        return self.decode(self.encode(x)) + self.skip(x)


def random_transcoders(
    n_layers: int,
    d_model: int,
    d_sae: int,
    *,
    density: float = 0.02,
    skip: bool = False,
    seed: int = 0,
) -> list[RandomTranscoder]:
    return [
        RandomTranscoder(i, d_model, d_sae, density=density, skip=skip, seed=seed)
        for i in range(n_layers)
    ]


def tiny_llama(
    *,
    n_layers: int = 3,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    vocab: int = 97,
    seed: int = 0,
) -> tuple[Any, Any]:
    """(HF LlamaForCausalLM, HookedTransformer) with the same random float32 weights.

    Weights are drawn with a larger std than HF's default so that attention patterns and
    logits are far from uniform (a test on flat softmaxes proves little).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from featuresteer_server.models import build_hooked

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    hf = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    hooked = build_hooked(hf, None, torch.float32)
    return hf, hooked
