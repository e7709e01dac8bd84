"""The attribution package's data types: graph nodes, edges, scores and the unpruned matrix.

Owns: the frozen result dataclasses that the engine hands to the servicer's converter, the
``TranscoderLike`` protocol the replacement model codes against, and this package's domain
exceptions. Must not: import gRPC or protobuf, or hold a reference to the model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch stays a lazy import for the servicer side
    from torch import Tensor


class AttributionError(Exception):
    """Base class of this package's errors (map to INVALID_ARGUMENT unless a subclass says)."""


class AttributionCancelled(AttributionError):
    """The caller's cancellation event was set; the work was dropped (CANCELLED)."""


class AttributionBudgetExceeded(AttributionError):
    """The request would exceed the configured memory bound (RESOURCE_EXHAUSTED)."""


@runtime_checkable
class TranscoderLike(Protocol):
    """What the replacement model needs from one per-layer transcoder.

    SAELens names and orientation (the dictionaries runtime's ``Dictionary``):
    ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``,
    optional ``W_skip [d_out, d_in]`` (skip term ``x @ W_skip.T``). ``encode(x)`` returns the
    float32 activations; the pre-activation must be affine in ``x`` (no per-token input
    normalisation), so that ``W_enc[:, i]`` is feature ``i``'s encoder direction.
    """

    W_enc: Any
    b_enc: Any
    W_dec: Any
    b_dec: Any
    hook_name: str
    hook_name_out: str

    def encode(self, x: Any) -> Any: ...


class NodeKind(enum.Enum):
    """Kinds of graph node (the wire enum's value names end in these)."""

    EMBEDDING = "EMBEDDING"
    FEATURE = "FEATURE"
    ERROR = "ERROR"
    LOGIT = "LOGIT"


@dataclass(frozen=True)
class Node:
    """One node of a pruned attribution graph.

    Attributes:
        kind: EMBEDDING, FEATURE, ERROR or LOGIT.
        layer: transformer layer (FEATURE/ERROR); -1 for EMBEDDING, n_layers for LOGIT.
        position: token position (LOGIT: the last position, the one predicted from).
        feature: feature index within the layer's transcoder (FEATURE), else -1.
        activation: feature activation (FEATURE), else 0.
        influence: logit-probability-weighted total influence on the logits through the
            row-normalised |A| (circuit-tracer's node influence; LOGIT: its probability).
        cumulative_influence: fraction of all nodes' influence held by nodes at least as
            influential as this one (what circuit-tracer's viewer JSON calls influence).
        token_id: the input token (EMBEDDING) or the predicted token (LOGIT), else -1.
        probability: softmax probability of the predicted token (LOGIT), else 0.
        constant: LOGIT only: the part of the demeaned logit no node carries (bias terms,
            everything the model does at position 0), so that features + errors +
            embeddings + constant equal the demeaned logit.
        logit: LOGIT only: the demeaned logit (logit minus the mean logit over the vocab).
        dictionary_id: the transcoder's id (FEATURE), else "".
    """

    kind: NodeKind
    layer: int
    position: int
    feature: int = -1
    activation: float = 0.0
    influence: float = 0.0
    cumulative_influence: float = 0.0
    token_id: int = -1
    probability: float = 0.0
    constant: float = 0.0
    logit: float = 0.0
    dictionary_id: str = ""


@dataclass(frozen=True)
class Edge:
    """A direct effect A(source→target) = a_source · w(source→target); indices into nodes."""

    source: int
    target: int
    weight: float


@dataclass(frozen=True)
class GraphScores:
    """circuit-tracer's graph scores on the unpruned graph (``compute_graph_scores``).

    replacement: fraction of token→logit influence that avoids error nodes.
    completeness: influence-weighted fraction of incoming (normalised) edge mass that comes
        from feature or token nodes rather than errors.
    """

    replacement: float
    completeness: float


@dataclass(frozen=True)
class RawGraph:
    """The unpruned attribution in circuit-tracer's layout (kept for pruning, tests, export).

    Node order (rows are targets, columns sources): the selected features (in order of
    ``active_features``), error nodes layer-major ``[layer * n_pos + pos]``, embedding
    nodes ``[pos]``, logit nodes (target order).

    Attributes:
        token_ids: the prompt, BOS included.
        n_layers, n_pos: model depth and prompt length.
        active_features: [n_active, 3] long (layer, pos, feature), lexicographic order.
        activation_values: [n_active] float32.
        selected: [n_selected] long, indices into ``active_features`` (sorted).
        adjacency: [n_nodes, n_nodes] float32, direct effects.
        logit_token_ids: [n_logits] long.
        logit_probabilities: [n_logits] float32 softmax probabilities.
        logit_values: [n_logits] float32 demeaned logits (forward pass).
        logit_constants: [n_logits] float32, see ``Node.constant``.
        logit_rows_full: [n_logits, n_active + (n_layers + 1) * n_pos] float32: the logit
            rows over *all* active features (unselected ones included), errors, embeddings;
            completeness holds on these rows.
        dictionary_ids: the transcoder id per layer ("" if unknown).
    """

    token_ids: tuple[int, ...]
    n_layers: int
    n_pos: int
    active_features: Tensor
    activation_values: Tensor
    selected: Tensor
    adjacency: Tensor
    logit_token_ids: Tensor
    logit_probabilities: Tensor
    logit_values: Tensor
    logit_constants: Tensor
    logit_rows_full: Tensor
    dictionary_ids: tuple[str, ...] = ()

    @property
    def n_selected(self) -> int:
        return int(self.selected.shape[0])

    @property
    def n_logits(self) -> int:
        return int(self.logit_token_ids.shape[0])

    @property
    def error_offset(self) -> int:
        return self.n_selected

    @property
    def embedding_offset(self) -> int:
        return self.n_selected + self.n_layers * self.n_pos

    @property
    def logit_offset(self) -> int:
        return self.embedding_offset + self.n_pos


@dataclass(frozen=True)
class AttributionGraph:
    """A pruned attribution graph, ready for conversion to the wire.

    Attributes:
        token_ids: the prompt's token ids (BOS included).
        nodes: kept nodes; ``Edge.source``/``target`` index this tuple.
        edges: kept direct-effect edges.
        scores: replacement and completeness (of the unpruned graph).
        node_threshold, edge_threshold: the pruning thresholds used.
        n_active_features: active (non-BOS) features in the prompt.
        stats: timings (seconds per stage) and counts, for logs and benchmarks.
        raw: the unpruned matrix (None when the caller asked not to keep it).
    """

    token_ids: tuple[int, ...]
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    scores: GraphScores
    node_threshold: float
    edge_threshold: float
    n_active_features: int
    stats: dict[str, float] = field(default_factory=dict, compare=False)
    raw: RawGraph | None = field(default=None, compare=False, repr=False)
