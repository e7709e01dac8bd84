"""Independent checks of an attribution graph against forward passes of the real model.

Owns: completeness on the unpruned logit rows, error vectors recomputed from a plain
forward pass, and intervention agreement: removing one source node's output in a forward
pass of the HookedTransformer whose attention patterns, norm scales and MLP outputs are
frozen at their clean values (a skip transcoder's skip term stays live, as in the
replacement model) changes each target by exactly minus its edge weight. These use
forward passes only, so they do not share code paths with the backward passes that built
the graph. Must not: be on the serving hot path unless a caller asks for verification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .replacement import BOS_POSITIONS, skip_weight
from .types import RawGraph


def completeness_errors(raw: RawGraph) -> Tensor:
    """[n_logits] |features + errors + embeddings + constant − demeaned logit| (unpruned rows)."""
    total = raw.logit_rows_full.sum(dim=1) + raw.logit_constants
    return (total - raw.logit_values).abs()


@dataclass
class CleanRun:
    """The clean forward pass's values at every frozen hook."""

    cache: dict[str, Tensor]
    demeaned_logits: Tensor  # [d_vocab] at the last position


def clean_run(model: Any, token_ids: Sequence[int]) -> CleanRun:
    """A plain forward pass caching patterns, norm scales, MLP inputs and outputs."""
    wanted = ("hook_pattern", "hook_scale", "ln2.hook_normalized", "hook_mlp_out", "hook_embed")
    cache: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> Tensor:
        cache[hook.name] = act.detach().clone()
        return act

    tokens = torch.tensor([list(token_ids)])
    with torch.no_grad():
        logits = model.run_with_hooks(
            tokens, fwd_hooks=[(lambda n: n.endswith(wanted), keep)], return_type="logits"
        )[0, -1].to(torch.float32)
    return CleanRun(cache, logits - logits.mean())


def error_vectors(model: Any, transcoders: Sequence[Any], token_ids: Sequence[int]) -> Tensor:
    """[L, P, d] MLP output − transcoder reconstruction (``reconstruct``), zero at BOS."""
    run = clean_run(model, token_ids)
    out = []
    for layer, tc in enumerate(transcoders):
        x = run.cache[f"blocks.{layer}.ln2.hook_normalized"][0]
        y = run.cache[f"blocks.{layer}.hook_mlp_out"][0].to(torch.float32)
        with torch.no_grad():
            err = y - tc.reconstruct(x).to(torch.float32)
        err[:BOS_POSITIONS] = 0
        out.append(err)
    return torch.stack(out)


def frozen_forward(
    model: Any,
    transcoders: Sequence[Any],
    token_ids: Sequence[int],
    clean: CleanRun,
    *,
    remove_at_embed: tuple[int, Tensor] | None = None,
    remove_at_mlp_out: tuple[int, int, Tensor] | None = None,
    read_features: Sequence[tuple[int, int, int]] = (),
) -> tuple[Tensor, Tensor]:
    """A forward pass of the local replacement model with one source's output removed.

    Args:
        remove_at_embed: (pos, vector) subtracted from ``hook_embed``.
        remove_at_mlp_out: (layer, pos, vector) subtracted from ``blocks.L.hook_mlp_out``.
        read_features: (layer, pos, feature) whose pre-activations to return.

    Returns:
        (demeaned logits [d_vocab] at the last position, pre-activations [len(read_features)]).
    """
    live_in: dict[int, Tensor] = {}
    wanted: dict[int, list[tuple[int, int, int]]] = {}
    for k, (layer, pos, feat) in enumerate(read_features):
        wanted.setdefault(layer, []).append((k, pos, feat))
    pre_values = torch.zeros(len(read_features))

    def freeze(act: Tensor, hook: Any) -> Tensor:
        return clean.cache[hook.name]

    def embed(act: Tensor, hook: Any) -> Tensor:
        if remove_at_embed is None:
            return act
        act = act.clone()
        act[0, remove_at_embed[0]] -= remove_at_embed[1].to(act.dtype)
        return act

    def mlp_in(act: Tensor, hook: Any) -> Tensor:
        layer = int(hook.name.split(".")[1])
        live_in[layer] = act
        tc = transcoders[layer]
        for k, pos, feat in wanted.get(layer, []):
            pre_values[k] = (
                act[0, pos].to(torch.float32) @ tc.W_enc[:, feat].to(torch.float32) + tc.b_enc[feat]
            )
        return act

    def mlp_out(act: Tensor, hook: Any) -> Tensor:
        layer = int(hook.name.split(".")[1])
        out = clean.cache[hook.name].clone().to(torch.float32)
        w_skip = skip_weight(transcoders[layer])
        if w_skip is not None:
            x_clean = clean.cache[f"blocks.{layer}.ln2.hook_normalized"]
            out = out + (live_in[layer].to(torch.float32) - x_clean.to(torch.float32)) @ w_skip.T
        if remove_at_mlp_out is not None and remove_at_mlp_out[0] == layer:
            out[0, remove_at_mlp_out[1]] -= remove_at_mlp_out[2]
        return out.to(act.dtype)

    hooks = [
        (lambda n: n.endswith("hook_pattern") or n.endswith("hook_scale"), freeze),
        ("hook_embed", embed),
        (lambda n: n.endswith("ln2.hook_normalized"), mlp_in),
        (lambda n: n.endswith("hook_mlp_out"), mlp_out),
    ]
    with torch.no_grad():
        logits = model.run_with_hooks(
            torch.tensor([list(token_ids)]), fwd_hooks=hooks, return_type="logits"
        )[0, -1].to(torch.float32)
    return logits - logits.mean(), pre_values
