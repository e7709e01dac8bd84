"""Glue between the attribution package and the engine: its settings, and the conversion of
an ``AttributionGraph`` into the domain result the servicer converts to protobuf."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from featuresteer_server import domain
from featuresteer_server.tokenization import Token

_KINDS = {"EMBEDDING": "embedding", "FEATURE": "feature", "ERROR": "error", "LOGIT": "logit"}


@dataclass(frozen=True)
class AttributionSettings:
    max_tokens: int = 64
    max_concurrent: int = 1
    batch_size: int = 64
    memory_budget_bytes: int = 2 * 1024**3


def graph_result(
    graph: Any,
    tokens: tuple[Token, ...],
    provenance: domain.Provenance,
) -> domain.AttributionResult:
    """Nodes keep their order (Edge source/target index them); FEATURE nodes get a FeatureRef
    pinned to the transcoder's fingerprint. Labels come later, from the feature catalog
    (``FeatureCatalog.label_graph``): the engine does not read metadata."""
    fps = provenance.dictionary_fingerprints
    nodes = []
    for n in graph.nodes:
        kind = _KINDS[n.kind.name]
        ref = None
        if kind == "feature":
            ref = domain.FeatureRef(n.dictionary_id, int(n.feature), fps.get(n.dictionary_id))
        nodes.append(
            domain.GraphNode(
                kind=kind,
                layer=int(n.layer),
                position=int(n.position),
                feature=ref,
                activation=float(n.activation),
                influence=float(n.influence),
                label="",
                token_id=max(int(n.token_id), 0),
                probability=float(n.probability),
                constant=float(n.constant),
            )
        )
    edges = tuple((int(e.source), int(e.target), float(e.weight)) for e in graph.edges)
    return domain.AttributionResult(
        tokens=tokens,
        provenance=provenance,
        nodes=tuple(nodes),
        edges=edges,
        replacement_score=float(graph.scores.replacement),
        completeness_score=float(graph.scores.completeness),
    )
