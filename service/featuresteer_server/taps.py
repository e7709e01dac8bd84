"""The tap table: where each TransformerLens hook name lives in a model family's modules, and
how to read and write it there. The HF hook session (``generation.py``), the vLLM worker
(``engines/vllm/worker.py``) and the dictionaries tooling's plain-transformers taps all look
hooks up here; adding an architecture family means adding its ``Family`` (module paths and
one row per hook kind) and its tiny random-model test, nothing else.

A row says which module of a block carries the hook's value, whether it is seen before
(``PRE``: the module's first input) or after (``POST``: its output, the first element when a
tuple) the module runs, and how the value is formed there:
    INPUT / OUTPUT   the tensor itself
    NORMALIZED       ``normalized(family.norm, x, eps)`` of the module's input: the norm's
                     output BEFORE its weight (and bias), as TransformerLens's
                     ``ln2.hook_normalized``; written back through the module's output as
                     ``affine(module, n')``
    SUM              (vLLM only) the sum of the module's two inputs ``(hidden, residual)``:
                     vLLM's fused add+norm layers carry the residual stream as a pair;
                     ``OUTPUT`` rows of a module returning such a pair are likewise the sum
``write_via`` names the hook whose value an edit is written through when the hook itself has
no module of its own to write (``hook_resid_mid`` = resid_pre + attn_out: δ is added to
attn_out, so the residual carried past the block's add sees it).

The families here share the pre-norm residual block (attention then MLP, each reading a
normed copy of the stream and adding its output back): Llama and GPT-2 (a tiny random GPT-2
checks the rows, tests/unit/test_taps.py). A family whose norms sit elsewhere (Gemma-2's
sandwich norms) points its rows at those modules instead.

Must not: hold model weights or state, import transformers or vLLM (modules are reached by
attribute path on the objects the engines pass in).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor

# a block hook: blocks.{layer}.{kind}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


class Phase(StrEnum):
    PRE = "pre"  # a forward pre-hook: the module's inputs
    POST = "post"  # a forward hook: the module's output


class Read(StrEnum):
    INPUT = "input"
    OUTPUT = "output"
    NORMALIZED = "normalized"
    SUM = "sum"


class Norm(StrEnum):
    RMS = "rms"  # x / sqrt(mean(x²) + eps)
    LAYER = "layer"  # (x − mean) / sqrt(var + eps)


@dataclass(frozen=True)
class Tap:
    """Where one hook kind's value is seen inside a block (module docstring)."""

    module: str  # attribute path inside the block; "" = the block itself
    phase: Phase
    read: Read
    write_via: str | None = None  # hook kind an edit of this hook is written through


@dataclass(frozen=True)
class Family:
    """One architecture family as one runtime builds it.

    Attributes:
        name: e.g. "llama" (transformers) or "vllm-llama" (vLLM's own modules).
        model_types: the HF ``config.model_type`` values it serves.
        blocks: attribute path from the causal-LM module to the list of blocks.
        embed: path to the token embedding (its pre-hook sees the input ids).
        final_norm: path to the norm before the unembedding.
        norm: the kind of every norm in the family.
        eps_attr: the attribute of a norm module holding its epsilon.
        taps: hook kind (the part after ``blocks.{L}.``) -> where it lives.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    embed: str
    final_norm: str
    norm: Norm
    eps_attr: str
    taps: dict[str, Tap] = field(default_factory=dict)

    def kinds(self) -> tuple[str, ...]:
        """The hook kinds this family can tap, in forward order within a block."""
        return tuple(self.taps)

    def block(self, model: Any, layer: int) -> Any:
        return _path(model, self.blocks)[layer]

    def embed_module(self, model: Any) -> Any:
        return _path(model, self.embed)

    def final_norm_module(self, model: Any) -> Any:
        return _path(model, self.final_norm)

    def n_layers(self, model: Any) -> int:
        return len(_path(model, self.blocks))

    def tap(self, hook_name: str) -> tuple[int, str, Tap]:
        """(layer, kind, row) of a ``blocks.{L}.{kind}`` hook; ValueError if not tapped."""
        m = _BLOCK.match(hook_name)
        if m is None or m.group(2) not in self.taps:
            raise ValueError(f"{self.name} has no tap for hook {hook_name!r}")
        return int(m.group(1)), m.group(2), self.taps[m.group(2)]

    def module(self, model: Any, hook_name: str) -> tuple[Any, Tap]:
        """The module carrying ``hook_name`` and its row."""
        layer, _, tap = self.tap(hook_name)
        return _path(self.block(model, layer), tap.module), tap

    def eps(self, norm_module: Any) -> float:
        return float(getattr(norm_module, self.eps_attr))

    def normalized(self, norm_module: Any, x: Tensor) -> Tensor:
        """``x`` [..., d] through ``norm_module``'s normalisation, before its weight/bias, in
        float32 (as transformers computes RMSNorm's statistics)."""
        return normalized(self.norm, x, self.eps(norm_module))


def normalized(norm: Norm, x: Tensor, eps: float) -> Tensor:
    """[..., d] -> [..., d] float32: RMS- or Layer-normalised, no affine."""
    xf = x.to(torch.float32)
    if norm is Norm.LAYER:
        xf = xf - xf.mean(-1, keepdim=True)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def affine(norm_module: Any, n: Tensor) -> Tensor:
    """A normalised ``n`` through the norm's weight (and bias, when it has one)."""
    out: Tensor = n * norm_module.weight
    bias = getattr(norm_module, "bias", None)
    return out + bias if isinstance(bias, Tensor) else out


def _path(obj: Any, path: str) -> Any:
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def _pre_norm_rows(attn: str, ln2: str, mlp: str) -> dict[str, Tap]:
    """The rows of a transformers pre-norm block (forward order)."""
    return {
        "hook_resid_pre": Tap("", Phase.PRE, Read.INPUT),
        "hook_attn_out": Tap(attn, Phase.POST, Read.OUTPUT),
        "hook_resid_mid": Tap(ln2, Phase.PRE, Read.INPUT, write_via="hook_attn_out"),
        "ln2.hook_normalized": Tap(ln2, Phase.PRE, Read.NORMALIZED),
        "hook_mlp_out": Tap(mlp, Phase.POST, Read.OUTPUT),
        "hook_resid_post": Tap("", Phase.POST, Read.OUTPUT),
    }


LLAMA = Family(
    name="llama",
    model_types=("llama",),
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    norm=Norm.RMS,
    eps_attr="variance_epsilon",
    taps=_pre_norm_rows("self_attn", "post_attention_layernorm", "mlp"),
)

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    blocks="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    norm=Norm.LAYER,
    eps_attr="eps",
    taps=_pre_norm_rows("attn", "ln_2", "mlp"),
)

# vLLM's Llama: a block takes and returns (hidden, residual) whose sum is the residual stream,
# and post_attention_layernorm is a fused add+norm called as (attn_out, resid_pre)
VLLM_LLAMA = Family(
    name="vllm-llama",
    model_types=LLAMA.model_types,
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    norm=Norm.RMS,
    eps_attr="variance_epsilon",
    taps={
        "hook_resid_pre": Tap("", Phase.PRE, Read.SUM),
        "hook_attn_out": Tap("post_attention_layernorm", Phase.PRE, Read.INPUT),
        "hook_resid_mid": Tap("post_attention_layernorm", Phase.PRE, Read.SUM),
        "ln2.hook_normalized": Tap("post_attention_layernorm", Phase.PRE, Read.NORMALIZED),
        "hook_mlp_out": Tap("mlp", Phase.POST, Read.OUTPUT),
        "hook_resid_post": Tap("", Phase.POST, Read.SUM),
    },
)

# the attention module of a vLLM Llama block (the isolation guard reads its input)
VLLM_LLAMA_ATTN = "self_attn"

HF_FAMILIES = (LLAMA, GPT2)


def hf_family(model: Any) -> Family:
    """The transformers family of a causal-LM module, from ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in HF_FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise ValueError(f"no tap table for model_type {model_type!r} (taps.py lists the families)")
