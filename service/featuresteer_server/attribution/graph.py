"""Building an attribution graph: targets, the influence-ranked feature queue, packaging.

Owns: ``attribute`` (the public entry point), choosing logit targets, the order in which
feature rows are computed (circuit-tracer's: logit rows first, then features by estimated
influence, re-ranked every ``update_interval`` batches), progress reporting, cancellation
between batches (``check_cancel``, shared with ``ranking``), and the memory bound. Must not:
know about gRPC or catalog labels.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from .pruning import graph_scores, partial_influence, prune
from .replacement import (
    LinearReplacement,
    check_supported,
    check_transcoders,
    collect_features,
    demeaned_bias,
    demeaned_unembed,
    run_frozen_forward,
)
from .types import (
    AttributionBudgetExceeded,
    AttributionCancelled,
    AttributionError,
    AttributionGraph,
    Edge,
    Node,
    NodeKind,
    RawGraph,
)

ProgressFn = Callable[[str, float], None]

DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes for the row matrices (the dominant allocation)


def select_targets(
    logits: Tensor,
    target_token_ids: Sequence[int] | None,
    max_logit_targets: int,
    desired_logit_prob: float,
) -> tuple[Tensor, Tensor]:
    """(token ids [k], probabilities [k]): explicit ids, or the top logits covering
    ``desired_logit_prob`` (at most ``max_logit_targets``), as circuit-tracer picks them."""
    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    if target_token_ids:
        ids = torch.tensor(list(target_token_ids), dtype=torch.long)
        if bool(((ids < 0) | (ids >= logits.shape[0])).any()):
            raise AttributionError(
                f"target_token_ids must be in [0, {logits.shape[0]}): got {ids.tolist()}"
            )
        if len(set(ids.tolist())) != len(ids):
            raise AttributionError("target_token_ids has duplicates")
        return ids, probs[ids]
    if max_logit_targets < 1:
        raise AttributionError(f"max_logit_targets must be >= 1, got {max_logit_targets}")
    top_p, top_idx = torch.topk(probs, min(max_logit_targets, probs.shape[0]))
    cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), torch.tensor(desired_logit_prob))) + 1
    return top_idx[:cutoff], top_p[:cutoff]


def check_cancel(cancel: threading.Event | Callable[[], bool] | None) -> None:
    """Raise ``AttributionCancelled`` when ``cancel`` (an event or a callable) is set."""
    if cancel is None:
        return
    flag = cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())
    if flag:
        raise AttributionCancelled("attribution cancelled")


def attribute(
    model: Any,
    transcoders: Sequence[Any],
    token_ids: Sequence[int],
    *,
    target_token_ids: Sequence[int] | None = None,
    max_logit_targets: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int = 500,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    batch_size: int = 64,
    update_interval: int = 4,
    progress: ProgressFn | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    keep_raw: bool = True,
    dictionary_ids: Sequence[str] | None = None,
    model_lock: AbstractContextManager[Any] | None = None,
) -> AttributionGraph:
    """Attribution graph of the next-token prediction after ``token_ids``.

    Args:
        model: a HookedTransformer (Llama family, unfolded weights, float32 recommended).
        transcoders: one per layer, reading ``blocks.L.ln2.hook_normalized`` and writing
            ``blocks.L.hook_mlp_out`` (see ``TranscoderLike``).
        token_ids: the prompt, BOS included (BOS's position carries no feature/error nodes).
        target_token_ids: explicit logit targets; default: the top logits covering
            ``desired_logit_prob``, at most ``max_logit_targets``.
        max_feature_nodes: at most this many feature rows are computed (the graph's features).
        node_threshold, edge_threshold: cumulative-influence shares kept by pruning.
        batch_size: rows per backward pass.
        update_interval: batches between re-rankings of the feature queue.
        progress: called with (stage, fraction in [0, 1]); stages "forward", "logits",
            "features", "pruning", "done".
        cancel: a ``threading.Event`` (or a callable) checked between batches; when set the
            call raises ``AttributionCancelled``.
        memory_budget_bytes: bound on the row matrices; exceeding it raises
            ``AttributionBudgetExceeded`` before any backward pass.
        keep_raw: keep the unpruned matrix on the result (``AttributionGraph.raw``).
        dictionary_ids: ids of the transcoders, for the FEATURE nodes.
        model_lock: held only around the one forward pass, which installs temporary hooks
            on the shared model; the backward passes (nearly all the time) read frozen
            tensors and weights only, so other requests may use the model meanwhile.

    Returns:
        The pruned ``AttributionGraph`` (its ``raw`` holds the unpruned one).
    """
    say = progress or (lambda stage, fraction: None)
    if len(token_ids) < 2:
        raise AttributionError("token_ids needs at least 2 tokens (BOS and one more)")
    if batch_size < 1:
        raise AttributionError(f"batch_size must be >= 1, got {batch_size}")
    if max_feature_nodes < 0:
        raise AttributionError(f"max_feature_nodes must be >= 0, got {max_feature_nodes}")
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise AttributionError(f"{name} must be in [0, 1], got {value}")
    if not 0.0 < desired_logit_prob <= 1.0:
        raise AttributionError(f"desired_logit_prob must be in (0, 1], got {desired_logit_prob}")
    if update_interval < 1:
        raise AttributionError(f"update_interval must be >= 1, got {update_interval}")
    d_vocab = model.cfg.d_vocab
    if any(not 0 <= int(t) < d_vocab for t in token_ids):
        raise AttributionError(f"token_ids must be in [0, {d_vocab})")
    check_supported(model)
    check_transcoders(model, transcoders)
    stats: dict[str, float] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        say("forward", 0.0)
        with model_lock if model_lock is not None else nullcontext():
            fwd = run_frozen_forward(model, token_ids)
        feats = collect_features(fwd, transcoders)
        lin = LinearReplacement(model, fwd, feats, transcoders)
        stats["forward_s"] = time.perf_counter() - t0
        check_cancel(cancel)

        n_layers, n_pos, n_active = lin.n_layers, lin.n_pos, feats.n
        logit_ids, logit_probs = select_targets(
            fwd.logits, target_token_ids, max_logit_targets, desired_logit_prob
        )
        n_logits = int(logit_ids.shape[0])
        logit_vecs = demeaned_unembed(model, logit_ids)  # [k, d]
        logit_offset = n_active + (n_layers + 1) * n_pos
        total_nodes = logit_offset + n_logits
        n_feature_rows = min(max_feature_nodes, n_active)
        need = 4 * (n_feature_rows + n_logits) * total_nodes + 4 * batch_size * lin.row_size
        need += 4 * (n_feature_rows + n_layers * n_pos + n_pos + n_logits) ** 2 * 3  # pruning
        need += 4 * n_active * lin.d_model  # the decoder vectors, already held
        if need > memory_budget_bytes:
            raise AttributionBudgetExceeded(
                f"attribution of {n_pos} tokens with {n_active} active features and "
                f"{n_feature_rows} feature nodes needs about {need / 2**20:.0f} MiB, over the "
                f"budget of {memory_budget_bytes / 2**20:.0f} MiB: lower max_feature_nodes "
                "or shorten the prompt"
            )
        stats["n_active_features"] = float(n_active)

        # rows: logits first, then features in visiting order; columns: all nodes
        edge_rows = torch.zeros(n_feature_rows + n_logits, total_nodes)
        row_to_node = torch.zeros(n_feature_rows + n_logits, dtype=torch.long)
        say("logits", 0.0)
        t1 = time.perf_counter()
        logit_consts = torch.zeros(n_logits)
        for i in range(0, n_logits, batch_size):
            j = min(i + batch_size, n_logits)
            rows, consts = lin.rows(
                torch.full((j - i,), n_layers), torch.full((j - i,), n_pos - 1), logit_vecs[i:j]
            )
            edge_rows[i:j, :logit_offset] = rows
            logit_consts[i:j] = consts
            row_to_node[i:j] = torch.arange(i, j) + logit_offset
            check_cancel(cancel)
        logit_consts += demeaned_bias(model, logit_ids)
        logit_rows_full = edge_rows[:n_logits, :logit_offset].clone()
        stats["logit_rows_s"] = time.perf_counter() - t1

        say("features", 0.0)
        t2 = time.perf_counter()
        visited = torch.zeros(n_active, dtype=torch.bool)
        n_visited = 0
        filled = n_logits
        feat_layers, feat_pos = feats.index[:, 0], feats.index[:, 1]
        while n_visited < n_feature_rows:
            if n_feature_rows == n_active:
                pending = torch.arange(n_active)
            else:
                influence = partial_influence(edge_rows[:filled], logit_probs, row_to_node[:filled])
                rank = torch.argsort(influence[:n_active], descending=True)
                queue = min(update_interval * batch_size, n_feature_rows - n_visited)
                pending = rank[~visited[rank]][:queue]
            for k in range(0, int(pending.shape[0]), batch_size):
                idx = pending[k : k + batch_size]
                n_b = int(idx.shape[0])
                rows, _ = lin.rows(feat_layers[idx], feat_pos[idx], feats.encoders(idx))
                edge_rows[filled : filled + n_b, :logit_offset] = rows
                row_to_node[filled : filled + n_b] = idx
                visited[idx] = True
                filled += n_b
                n_visited += n_b
                say("features", n_visited / max(n_feature_rows, 1))
                check_cancel(cancel)
        stats["feature_rows_s"] = time.perf_counter() - t2

        # assemble the square matrix on [selected features | errors | embeddings | logits]
        say("pruning", 0.0)
        t3 = time.perf_counter()
        selected = torch.where(visited)[0]
        columns = torch.cat([selected, torch.arange(n_active, total_nodes)])
        n_nodes = int(columns.shape[0])
        adjacency = torch.zeros(n_nodes, n_nodes)
        node_of_row = row_to_node[:filled]
        # node id -> index in the square matrix
        position_of = torch.full((total_nodes,), -1, dtype=torch.long)
        position_of[columns] = torch.arange(n_nodes)
        adjacency[position_of[node_of_row]] = edge_rows[:filled][:, columns]
        del edge_rows

        logit_values = (fwd.logits[logit_ids] - fwd.logits.mean()).to(torch.float32)
        raw = RawGraph(
            token_ids=tuple(int(t) for t in token_ids),
            n_layers=n_layers,
            n_pos=n_pos,
            active_features=feats.index,
            activation_values=feats.values,
            selected=selected,
            adjacency=adjacency,
            logit_token_ids=logit_ids,
            logit_probabilities=logit_probs.to(torch.float32),
            logit_values=logit_values,
            logit_constants=logit_consts,
            logit_rows_full=logit_rows_full,
            dictionary_ids=tuple(dictionary_ids or ()),
        )
        pruned = prune(raw, node_threshold, edge_threshold)
        scores = graph_scores(raw)
        graph = package(raw, pruned, scores, node_threshold, edge_threshold, keep_raw)
        stats["pruning_s"] = time.perf_counter() - t3
        stats["total_s"] = time.perf_counter() - t0
        graph.stats.update(stats)
        say("done", 1.0)
        return graph


def package(
    raw: RawGraph,
    pruned: Any,
    scores: Any,
    node_threshold: float,
    edge_threshold: float,
    keep_raw: bool = True,
) -> AttributionGraph:
    """Turn masks over the raw matrix into the frozen node/edge lists."""
    keep = torch.where(pruned.node_mask)[0].tolist()
    new_index = {old: new for new, old in enumerate(keep)}
    influence = pruned.node_influence.tolist()
    cumulative = pruned.cumulative.tolist()
    active = raw.active_features.tolist()
    acts = raw.activation_values.tolist()
    selected = raw.selected.tolist()
    dict_ids = raw.dictionary_ids
    probs = raw.logit_probabilities.tolist()
    logit_ids = raw.logit_token_ids.tolist()
    logit_values = raw.logit_values.tolist()
    consts = raw.logit_constants.tolist()
    nodes: list[Node] = []
    for i in keep:
        common = {"influence": influence[i], "cumulative_influence": cumulative[i]}
        if i < raw.error_offset:
            layer, pos, feat = active[selected[i]]
            nodes.append(
                Node(
                    NodeKind.FEATURE,
                    layer,
                    pos,
                    feature=feat,
                    activation=acts[selected[i]],
                    dictionary_id=dict_ids[layer] if layer < len(dict_ids) else "",
                    **common,
                )
            )
        elif i < raw.embedding_offset:
            layer, pos = divmod(i - raw.error_offset, raw.n_pos)
            nodes.append(Node(NodeKind.ERROR, layer, pos, **common))
        elif i < raw.logit_offset:
            pos = i - raw.embedding_offset
            nodes.append(Node(NodeKind.EMBEDDING, -1, pos, token_id=raw.token_ids[pos], **common))
        else:
            k = i - raw.logit_offset
            nodes.append(
                Node(
                    NodeKind.LOGIT,
                    raw.n_layers,
                    raw.n_pos - 1,
                    token_id=logit_ids[k],
                    probability=probs[k],
                    constant=consts[k],
                    logit=logit_values[k],
                    influence=probs[k],
                    cumulative_influence=cumulative[i],
                )
            )
    targets, sources = torch.where(pruned.edge_mask)
    weights = raw.adjacency[targets, sources].tolist()
    edges = tuple(
        Edge(new_index[s], new_index[t], w)
        for t, s, w in zip(targets.tolist(), sources.tolist(), weights, strict=True)
        if s in new_index and t in new_index
    )
    return AttributionGraph(
        token_ids=raw.token_ids,
        nodes=tuple(nodes),
        edges=edges,
        scores=scores,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
        n_active_features=int(raw.active_features.shape[0]),
        stats={},
        raw=raw if keep_raw else None,
    )
