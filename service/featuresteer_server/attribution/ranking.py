"""LOGIT_RANKING: activation × gradient of a target logit for one dictionary's features.

Owns: ``logit_ranking``. One forward and one backward pass with attention patterns and
norm scales frozen (stop-gradient on ``hook_pattern`` and ``*.hook_scale``); MLPs stay
live. The ranked quantity for feature i at position p is a_i(p) · (d_i · ∇ℓ) where ∇ℓ is
the gradient of the demeaned target logit (logit − mean logit, as in the graph) at the
site the dictionary writes to (``hook_name_out``: the MLP output for a transcoder, the
hook itself for an SAE). Cancellation is checked before the forward pass, at every layer
of it, and before the backward pass and the scoring (the graph path's ``check_cancel``).
Must not: build graphs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .graph import check_cancel
from .replacement import BOS_POSITIONS, decoder_rows
from .types import AttributionError


def logit_ranking(
    model: Any,
    dictionary: Any,
    token_ids: Sequence[int],
    target_token_id: int,
    *,
    limit: int | None = 100,
    include_bos: bool = False,
    cancel: threading.Event | Callable[[], bool] | None = None,
) -> list[tuple[int, int, float]]:
    """Rank the dictionary's active features by their attribution to one logit.

    Args:
        model: a HookedTransformer.
        dictionary: an SAE or transcoder (``encode``, ``W_dec``, ``hook_name``,
            ``hook_name_out``).
        token_ids: the prompt (BOS included); the logit is read at the last position.
        target_token_id: the token whose logit is explained.
        limit: keep the ``limit`` largest |attribution| (None: all active features).
        include_bos: also rank features at position 0 (off by default; DESIGN.md).
        cancel: a ``threading.Event`` (or a callable) checked between the steps; when set
            the call raises ``AttributionCancelled``.

    Returns:
        [(feature index, position, attribution)] sorted by |attribution|, largest first.
    """
    d_vocab = model.cfg.d_vocab
    if not 0 <= int(target_token_id) < d_vocab:
        raise AttributionError(f"target_token_id must be in [0, {d_vocab}), got {target_token_id}")
    if len(token_ids) < 1:
        raise AttributionError("token_ids is empty")
    if getattr(dictionary, "per_token_normalization", False):
        raise AttributionError(
            f"dictionary {getattr(dictionary, 'id', '?')!r} normalises each token; its "
            "features have no fixed decoder direction to attribute through"
        )
    hook_in = dictionary.hook_name
    hook_out = getattr(dictionary, "hook_name_out", hook_in) or hook_in
    if hook_in not in model.hook_dict or hook_out not in model.hook_dict:
        raise AttributionError(f"the model has no hook {hook_in!r} / {hook_out!r}")
    check_cancel(cancel)
    captured: dict[str, torch.Tensor] = {}

    def cancel_point(act: torch.Tensor, hook: Any) -> torch.Tensor:
        check_cancel(cancel)  # once per layer of the forward pass
        return act

    def stop_gradient(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return act.detach()

    def read_input(act: torch.Tensor, hook: Any) -> torch.Tensor:
        captured["x"] = act.detach()
        return act

    def leaf_output(act: torch.Tensor, hook: Any) -> torch.Tensor:
        # a leaf here: the backward pass stops at the site the features write to
        leaf = act.detach().requires_grad_(True)
        captured["y"] = leaf
        return leaf

    hooks: list[tuple[Any, Any]] = [
        (lambda n: n.endswith("hook_pattern") or n.endswith("hook_scale"), stop_gradient),
        (hook_in, read_input),
    ]
    hooks.append((hook_out, leaf_output))
    if cancel is not None:
        hooks.append((lambda n: n.endswith("hook_resid_pre"), cancel_point))
    tokens = torch.tensor([list(token_ids)])
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")[0, -1]
        objective = logits[int(target_token_id)] - logits.mean()
        check_cancel(cancel)
        (grad,) = torch.autograd.grad(objective, captured["y"])
    check_cancel(cancel)
    grad = grad[0].to(torch.float32)  # [P, d_out]
    with torch.no_grad():
        acts = dictionary.encode(captured["x"][0]).to(torch.float32)  # [P, d_sae]
    if not include_bos:
        acts[:BOS_POSITIONS] = 0
    pos, feat = acts.nonzero(as_tuple=True)
    if pos.numel() == 0:
        return []
    direction = decoder_rows(dictionary, feat)  # [n, d_out]
    scores = acts[pos, feat] * (direction * grad[pos]).sum(dim=-1)
    order = torch.argsort(scores.abs(), descending=True)
    if limit is not None:
        order = order[:limit]
    return [(int(feat[i]), int(pos[i]), float(scores[i])) for i in order.tolist()]
