"""Influence, pruning and graph scores, with circuit-tracer's definitions.

Owns: the row-normalised |A| matrix, total influence B = (I − A)⁻¹ − I weighted by the
logit probabilities (computed as a nilpotent power series: the graph is a DAG), node and
edge pruning at cumulative-influence thresholds, and the replacement / completeness
scores. Must not: run the model.

Node layout is ``RawGraph``'s: [features | errors | embeddings | logits].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .types import GraphScores, RawGraph


def normalize_rows(matrix: Tensor, eps: float = 1e-10) -> Tensor:
    """|A| with each row divided by its sum (rows summing to 0 stay 0)."""
    a = matrix.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=eps)


def total_influence(normalized: Tensor, weights: Tensor, max_iter: int = 1000) -> Tensor:
    """weights @ (A + A² + …) for a nilpotent A (a DAG's adjacency): [n]."""
    current = weights @ normalized
    influence = current.clone()
    for _ in range(max_iter):
        if not bool(current.any()):
            return influence
        current = current @ normalized
        influence += current
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def partial_influence(
    rows: Tensor, logit_probs: Tensor, row_to_node: Tensor, max_iter: int = 128
) -> Tensor:
    """Influence of every node estimated from the rows computed so far (the queue's ranking).

    Args:
        rows: [k, n_nodes] direct-effect rows computed so far (logits first, then features).
        logit_probs: [n_logits], the weights of the logit nodes (the last n_logits nodes).
        row_to_node: [k] long, the node each row belongs to.
    """
    normalized = rows.abs()
    normalized /= normalized.sum(dim=1, keepdim=True).clamp(min=1e-8)
    n_nodes = rows.shape[1]
    influence = torch.zeros(n_nodes)
    prod = torch.zeros(n_nodes)
    prod[n_nodes - logit_probs.shape[0] :] = logit_probs
    for _ in range(max_iter):
        prod = prod[row_to_node] @ normalized
        if not bool(prod.any()):
            return influence
        influence += prod
    raise RuntimeError("partial influence did not converge")


def _logit_weights(raw: RawGraph) -> Tensor:
    w = torch.zeros(raw.adjacency.shape[0])
    w[raw.logit_offset :] = raw.logit_probabilities
    return w


def _threshold_value(scores: Tensor, threshold: float) -> Tensor:
    """The score at which the sorted scores' cumulative share first reaches ``threshold``."""
    ordered = torch.sort(scores, descending=True).values
    cumulative = torch.cumsum(ordered, dim=0) / ordered.sum()
    index = int(torch.searchsorted(cumulative, torch.tensor(threshold)).item())
    return ordered[min(index, ordered.shape[0] - 1)]


@dataclass(frozen=True)
class PruneResult:
    node_mask: Tensor  # [n] bool
    edge_mask: Tensor  # [n, n] bool (target, source)
    node_influence: Tensor  # [n] logit-weighted influence (logits: 0 here, see Node)
    cumulative: Tensor  # [n] cumulative influence share of each node's rank


def prune(raw: RawGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Keep the nodes, then the edges, that carry the given shares of logit influence.

    Embeddings and logits are always kept; feature and error nodes left without outgoing
    edges, and features without incoming edges, are dropped until nothing changes. An edge
    is kept only if its score is positive (so never a zero-weight edge, a self-loop or an
    edge out of a logit, even at threshold 1.0, which keeps every edge that carries any
    influence).
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    adjacency = raw.adjacency
    weights = _logit_weights(raw)
    n_keep_tail = raw.n_logits + raw.n_pos  # embeddings and logits
    n_feat = raw.n_selected

    node_influence = total_influence(normalize_rows(adjacency), weights)
    node_mask = node_influence >= _threshold_value(node_influence, node_threshold)
    node_mask[-n_keep_tail:] = True

    pruned = adjacency.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalize_rows(pruned)
    pruned_influence = total_influence(normalized, weights) + weights
    edge_scores = normalized * pruned_influence[:, None]
    edge_mask = edge_scores >= _threshold_value(edge_scores.flatten(), edge_threshold)
    # An edge must carry influence. At edge_threshold 1.0 the cut-off is the smallest score,
    # 0, which admitted all n² pairs: zero-weight edges, self-loops, edges out of logits.
    # Below 1.0 the cut-off is positive and this changes nothing (circuit-tracer's result).
    edge_mask &= edge_scores > 0
    edge_mask.fill_diagonal_(False)
    edge_mask[:, raw.logit_offset :] = False  # logits are sinks

    old = node_mask.clone()
    node_mask[:-n_keep_tail] &= edge_mask[:, :-n_keep_tail].any(0)
    node_mask[:n_feat] &= edge_mask[:n_feat].any(1)
    while not torch.equal(node_mask, old):
        old.copy_(node_mask)
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:-n_keep_tail] &= edge_mask[:, :-n_keep_tail].any(0)
        node_mask[:n_feat] &= edge_mask[:n_feat].any(1)
    edge_mask &= node_mask[:, None] & node_mask[None, :]

    ordered, order = torch.sort(node_influence, descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order] = torch.cumsum(ordered, dim=0) / ordered.sum()
    return PruneResult(node_mask, edge_mask, node_influence, cumulative)


def graph_scores(raw: RawGraph) -> GraphScores:
    """circuit-tracer's replacement and completeness scores of the unpruned graph."""
    weights = _logit_weights(raw)
    normalized = normalize_rows(raw.adjacency)
    influence = total_influence(normalized, weights)
    err = slice(raw.error_offset, raw.embedding_offset)
    emb = slice(raw.embedding_offset, raw.logit_offset)
    token_influence = influence[emb].sum()
    error_influence = influence[err].sum()
    replacement = token_influence / (token_influence + error_influence)
    non_error = 1 - normalized[:, err].sum(dim=-1)
    output_influence = influence + weights
    completeness = (non_error * output_influence).sum() / output_influence.sum()
    return GraphScores(replacement=float(replacement), completeness=float(completeness))
