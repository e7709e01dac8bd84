"""Attribution graphs over per-layer transcoders (the Attribute RPC's computation).

Owns: the local replacement model on a HookedTransformer (``replacement``), graph building
with the influence-ranked feature queue (``graph``), pruning and scores (``pruning``),
LOGIT_RANKING (``ranking``), exports to circuit-tracer's formats (``export``) and
verification helpers (``verify``). Must not: import gRPC, protobuf or the servicer.

The public surface is re-exported here lazily, so importing the package does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .types import (
    AttributionBudgetExceeded,
    AttributionCancelled,
    AttributionError,
    AttributionGraph,
    Edge,
    GraphScores,
    Node,
    NodeKind,
    RawGraph,
    TranscoderLike,
)

if TYPE_CHECKING:
    from .export import export_transcoder_set, to_graph_json
    from .graph import attribute
    from .ranking import logit_ranking

_LAZY = {
    "attribute": "graph",
    "logit_ranking": "ranking",
    "to_graph_json": "export",
    "export_transcoder_set": "export",
}

__all__ = [
    "AttributionBudgetExceeded",
    "AttributionCancelled",
    "AttributionError",
    "AttributionGraph",
    "Edge",
    "GraphScores",
    "Node",
    "NodeKind",
    "RawGraph",
    "TranscoderLike",
    "attribute",
    "export_transcoder_set",
    "logit_ranking",
    "to_graph_json",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
