"""Exports to circuit-tracer's formats.

Owns: ``to_graph_json`` (the graph JSON that circuit-tracer's local viewer and Neuronpedia
read: circuit-tracer 0.5.0 ``create_graph_files`` output, schema_version 1) and
``export_transcoder_set`` (per-layer transcoders in circuit-tracer's transcoder-set layout:
``layer_{i}.safetensors`` + ``config.yaml``, for reference runs). Must not: run the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .types import AttributionGraph, NodeKind

VIEWER_SCHEMA_VERSION = 1


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _process_token(token: str) -> str:
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def to_graph_json(
    graph: AttributionGraph,
    *,
    slug: str,
    scan: str | Sequence[str] = "featuresteer",
    token_strings: Sequence[str] | None = None,
    decode: Callable[[int], str] | None = None,
    prompt: str | None = None,
    labels: Mapping[tuple[int, int], str] | None = None,
) -> dict[str, Any]:
    """The graph as the viewer's JSON object (``json.dumps`` it to write ``{slug}.json``).

    Args:
        graph: a pruned graph from ``attribute``.
        slug: the graph's name in the viewer.
        scan: the transcoder set's identifier (a list becomes ``custom-<hash>`` as in
            circuit-tracer, with the list kept in ``transcoder_list``).
        token_strings: the prompt's tokens as text; else ``decode`` is applied to each id.
        decode: token id -> text (e.g. ``tokenizer.decode``), for prompt and logit tokens.
        prompt: the prompt text (default: the tokens joined).
        labels: (layer, feature) -> label, shown as the feature node's ``clerp``.
    """

    def text(token_id: int) -> str:
        return decode(token_id) if decode is not None else str(token_id)

    tokens = (
        list(token_strings) if token_strings is not None else [text(t) for t in graph.token_ids]
    )
    n_layers = max((n.layer for n in graph.nodes if n.kind is NodeKind.LOGIT), default=0)
    first_logit = next((n.token_id for n in graph.nodes if n.kind is NodeKind.LOGIT), None)
    labels = labels or {}
    ids: list[str] = []
    nodes: list[dict[str, Any]] = []
    for node in graph.nodes:
        base: dict[str, Any] = {
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "clerp": "",
            "influence": node.cumulative_influence,
            "activation": None,
        }
        if node.kind is NodeKind.FEATURE:
            node_id = f"{node.layer}_{node.feature}_{node.position}"
            base.update(
                node_id=node_id,
                feature=_cantor(node.layer, node.feature),
                layer=str(node.layer),
                ctx_idx=node.position,
                feature_type="cross layer transcoder",
                jsNodeId=f"{node.layer}_{node.feature}-0",
                activation=node.activation,
                clerp=labels.get((node.layer, node.feature), ""),
            )
        elif node.kind is NodeKind.ERROR:
            node_id = f"0_{node.layer}_{node.position}"
            base.update(
                node_id=node_id,
                feature=-1,
                layer=str(node.layer),
                ctx_idx=node.position,
                feature_type="mlp reconstruction error",
                jsNodeId=f"{node.layer}_{node.position}-0",
            )
        elif node.kind is NodeKind.EMBEDDING:
            node_id = f"E_{node.token_id}_{node.position}"
            base.update(
                node_id=node_id,
                feature=node.position,
                layer="E",
                ctx_idx=node.position,
                feature_type="embedding",
                jsNodeId=f"E_{node.token_id}-{node.position}",
            )
        else:
            layer = str(n_layers + 1)
            node_id = f"{layer}_{node.token_id}_{node.position}"
            base.update(
                node_id=node_id,
                feature=node.token_id,
                layer=layer,
                ctx_idx=node.position,
                feature_type="logit",
                token_prob=node.probability,
                is_target_logit=node.token_id == first_logit,
                jsNodeId=f"L_{node.token_id}-{node.position}",
                clerp=f'Output "{text(node.token_id)}" (p={node.probability:.3f})',
                influence=None,
            )
        ids.append(node_id)
        nodes.append(base)
    links = [
        {"source": ids[e.source], "target": ids[e.target], "weight": e.weight} for e in graph.edges
    ]
    connected = {link["source"] for link in links} | {link["target"] for link in links}
    nodes = [
        n for n in nodes if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")
    ]
    if isinstance(scan, str):
        scan_name, transcoder_list = scan, []
    else:
        transcoder_list = list(scan)
        scan_name = "custom-" + str(abs(hash("-".join(transcoder_list))))
    metadata = {
        "slug": slug,
        "scan": scan_name,
        "transcoder_list": transcoder_list,
        "prompt_tokens": [_process_token(t) for t in tokens],
        "prompt": prompt if prompt is not None else "".join(tokens),
        "node_threshold": graph.node_threshold,
        "schema_version": VIEWER_SCHEMA_VERSION,
    }
    q_params = {
        "pinnedIds": [],
        "supernodes": [],
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
    }
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


def write_graph_files(graph_json: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``{slug}.json`` and update ``graph-metadata.json`` (the viewer's index)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = graph_json["metadata"]["slug"]
    path = out / f"{slug}.json"
    path.write_text(json.dumps(graph_json))
    index_path = out / "graph-metadata.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"graphs": []}
    index["graphs"] = [g for g in index["graphs"] if g.get("slug") != slug]
    index["graphs"].append(graph_json["metadata"])
    index_path.write_text(json.dumps(index, indent=2))
    return path


def export_transcoder_set(
    transcoders: Sequence[Any], out_dir: str | Path, *, scan: str = "featuresteer"
) -> Path:
    """Write per-layer transcoders in circuit-tracer's transcoder-set layout.

    Each ``layer_{i}.safetensors`` holds ``W_enc [d_sae, d_model]``, ``W_dec [d_sae,
    d_model]``, ``b_enc``, ``b_dec``, and when present ``activation_function.threshold``
    (JumpReLU) and ``W_skip [d_out, d_in]``; ``config.yaml`` names them with the hooks
    circuit-tracer reads (``ln2.hook_normalized`` → ``hook_mlp_out``). circuit-tracer loads
    only ReLU and JumpReLU transcoders from disk; TopK is refused here.

    Returns:
        the ``config.yaml`` path (pass its parsed dict to circuit-tracer's
        ``load_transcoders``).
    """
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer, tc in enumerate(transcoders):
        arch = getattr(tc, "architecture", "transcoder")
        if "topk" in arch or getattr(tc, "k", None):
            raise ValueError(f"layer {layer}: circuit-tracer cannot load TopK transcoders")
        if getattr(tc, "_feature_scale", lambda: None)() is not None:
            raise ValueError(f"layer {layer}: decoder-norm rescaling has no circuit-tracer form")
        cfg = getattr(tc, "cfg", None)
        if cfg is not None and getattr(cfg, "apply_b_dec_to_input", False):
            raise ValueError(f"layer {layer}: apply_b_dec_to_input has no circuit-tracer form")

        def f32(t: Any) -> Any:
            return t.detach().to(torch.float32).contiguous().cpu()

        state = {
            "W_enc": f32(tc.W_enc.T),
            "W_dec": f32(tc.W_dec),
            "b_enc": f32(tc.b_enc),
            "b_dec": f32(tc.b_dec),
        }
        threshold = getattr(tc, "threshold", None)
        if isinstance(threshold, torch.Tensor):
            state["activation_function.threshold"] = f32(threshold)
        w_skip = getattr(tc, "W_skip", None)
        if w_skip is not None:
            state["W_skip"] = f32(w_skip)
        path = out / f"layer_{layer}.safetensors"
        save_file(state, str(path))
        paths.append(str(path.resolve()))
    config = out / "config.yaml"
    lines = [
        "model_kind: transcoder_set",
        f"scan: {scan}",
        "feature_input_hook: ln2.hook_normalized",
        "feature_output_hook: hook_mlp_out",
        "transcoders:",
        *[f"  - {p}" for p in paths],
    ]
    config.write_text("\n".join(lines) + "\n")
    return config
