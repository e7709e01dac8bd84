"""Parity of featuresteer's attribution against circuit-tracer 0.5.0 (the reference).

Runs in the service environment. Steps: build (or reuse) the isolated reference venv
(``build_env.sh``), write a copy of the default model's directory that transformers 4.57
reads (tokenizer class, a top-level ``rope_theta``), export the transcoders to
circuit-tracer's transcoder-set layout, run ``ct_run.py`` in the reference venv, run ours
on the same tokens, transcoders, thresholds and batch size, and compare:

- the active features (identical sets and activations),
- the logit targets and their probabilities,
- the selected feature sets (overlap ≥ 95%),
- every edge among shared nodes (within 1e-4·|top demeaned logit|),
- the pruned node sets and the scores (reported).

Usage:
    .venv/bin/python tests/reference/parity.py --n-tokens 8 \
        --max-feature-nodes 200 [--json out.json]
Exit status 0 when the parity criteria hold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from featuresteer_server.testing import ct_model_dir, ensure_reference_env, prompt_tokens

HERE = Path(__file__).resolve().parent


def load_model() -> tuple[Any, Any, Path]:
    from featuresteer_server.models import build_hooked, load_hf, prepare_default_model

    src = prepare_default_model()
    hf, tok = load_hf(src, torch.float32)
    return build_hooked(hf, tok, torch.float32), tok, src


def run_reference(
    python: Path,
    model_dir: Path,
    transcoder_cfg: Path,
    tokens: list[int],
    *,
    max_feature_nodes: int,
    batch_size: int,
    out: Path,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    graph_json_dir: Path | None = None,
) -> dict[str, Any]:
    cmd = [
        str(python),
        str(HERE / "ct_run.py"),
        "--model-dir", str(model_dir),
        "--transcoders", str(transcoder_cfg),
        "--tokens", ",".join(map(str, tokens)),
        "--max-feature-nodes", str(max_feature_nodes),
        "--batch-size", str(batch_size),
        "--node-threshold", str(node_threshold),
        "--edge-threshold", str(edge_threshold),
        "--out", str(out),
    ]  # fmt: skip
    if graph_json_dir is not None:
        cmd += ["--graph-json-dir", str(graph_json_dir)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"circuit-tracer run failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return torch.load(out, weights_only=False)


def compare(ours: Any, ref: dict[str, Any]) -> dict[str, Any]:
    """Parity figures between our RawGraph and circuit-tracer's saved graph."""
    from featuresteer_server.attribution.pruning import prune

    raw = ours.raw
    report: dict[str, Any] = {}
    # active features
    ours_active = {tuple(r) for r in raw.active_features.tolist()}
    ref_active = {tuple(r) for r in ref["active_features"].tolist()}
    report["active_ours"] = len(ours_active)
    report["active_ref"] = len(ref_active)
    report["active_identical"] = ours_active == ref_active
    # logit targets
    report["logits_identical"] = raw.logit_token_ids.tolist() == ref["logit_token_ids"].tolist()
    report["logit_prob_max_abs"] = float(
        (raw.logit_probabilities - ref["logit_probabilities"]).abs().max()
    )
    # selected features
    ref_active_list = [tuple(r) for r in ref["active_features"].tolist()]
    ref_sel = [ref_active_list[i] for i in ref["selected_features"].tolist()]
    our_active_list = [tuple(r) for r in raw.active_features.tolist()]
    our_sel = [our_active_list[i] for i in raw.selected.tolist()]
    shared = set(our_sel) & set(ref_sel)
    report["selected_ours"] = len(our_sel)
    report["selected_ref"] = len(ref_sel)
    report["selected_overlap"] = len(shared) / max(len(ref_sel), 1)
    # edges among shared nodes: map both layouts to a common key
    n_layers, n_pos = raw.n_layers, raw.n_pos

    def keys(selected: list[tuple[int, int, int]], n_logits: int) -> list[Any]:
        k: list[Any] = [("F", *f) for f in selected]
        k += [("E", layer, pos) for layer in range(n_layers) for pos in range(n_pos)]
        k += [("T", pos) for pos in range(n_pos)]
        k += [("L", i) for i in range(n_logits)]
        return k

    our_keys = keys(our_sel, raw.n_logits)
    ref_keys = keys(ref_sel, int(ref["logit_token_ids"].shape[0]))
    ref_index = {k: i for i, k in enumerate(ref_keys)}
    common = [(i, ref_index[k]) for i, k in enumerate(our_keys) if k in ref_index]
    oi = torch.tensor([c[0] for c in common])
    ri = torch.tensor([c[1] for c in common])
    a_ours = raw.adjacency[oi][:, oi]
    a_ref = ref["adjacency_matrix"][ri][:, ri].to(torch.float32)
    scale = float(raw.logit_values.abs().max())
    diff = (a_ours - a_ref).abs()
    report["edges_compared"] = int((a_ref != 0).sum())
    report["edge_max_abs_diff"] = float(diff.max())
    report["edge_tolerance"] = 1e-4 * scale
    report["top_demeaned_logit"] = scale
    # pruned node sets (on the shared nodes) and scores
    pr = prune(raw, ours.node_threshold, ours.edge_threshold)
    ref_mask = ref["node_mask"]
    kept_ours = {our_keys[i] for i in torch.where(pr.node_mask)[0].tolist()}
    kept_ref = {ref_keys[i] for i in torch.where(ref_mask)[0].tolist()}
    report["pruned_nodes_ours"] = len(kept_ours)
    report["pruned_nodes_ref"] = len(kept_ref)
    report["pruned_jaccard"] = len(kept_ours & kept_ref) / max(len(kept_ours | kept_ref), 1)
    report["scores_ours"] = [ours.scores.replacement, ours.scores.completeness]
    report["scores_ref"] = list(ref["scores"])
    report["ref_hf_vs_tl_max_abs"] = ref["hf_vs_tl_max_abs"]
    report["passed"] = bool(
        report["active_identical"]
        and report["logits_identical"]
        and report["logit_prob_max_abs"] <= 1e-4
        and report["selected_overlap"] >= 0.95
        and report["edge_max_abs_diff"] <= report["edge_tolerance"]
    )
    return report


def compare_json(ours: Any, ref_json: dict[str, Any], tok: Any) -> dict[str, Any]:
    """Our ``to_graph_json`` against circuit-tracer's ``create_graph_files`` output."""
    from featuresteer_server.attribution import to_graph_json

    mine = to_graph_json(ours, slug="parity", scan="parity", decode=tok.decode)
    ref_nodes = {n["node_id"]: n for n in ref_json["nodes"]}
    my_nodes = {n["node_id"]: n for n in mine["nodes"]}
    ref_links = {(e["source"], e["target"]): e["weight"] for e in ref_json["links"]}
    my_links = {(e["source"], e["target"]): e["weight"] for e in mine["links"]}
    shared = set(ref_links) & set(my_links)
    fields_differ = sorted(
        {
            key
            for nid in set(ref_nodes) & set(my_nodes)
            for key in ref_nodes[nid]
            if key not in ("influence", "activation", "token_prob", "clerp")
            and ref_nodes[nid][key] != my_nodes[nid].get(key)
        }
    )
    return {
        "json_keys_equal": set(mine) == set(ref_json)
        and set(mine["metadata"]) == set(ref_json["metadata"]),
        "json_nodes_jaccard": len(set(ref_nodes) & set(my_nodes))
        / max(len(set(ref_nodes) | set(my_nodes)), 1),
        "json_links_jaccard": len(shared) / max(len(set(ref_links) | set(my_links)), 1),
        "json_link_max_abs_diff": max(
            (abs(ref_links[k] - my_links[k]) for k in shared), default=0.0
        ),
        "json_node_fields_differ": fields_differ,
        "json_prompt_tokens_equal": mine["metadata"]["prompt_tokens"]
        == ref_json["metadata"]["prompt_tokens"],
    }


def run_parity(
    n_tokens: int = 8,
    max_feature_nodes: int = 200,
    batch_size: int = 64,
    *,
    density: float = 0.01,
    skip: bool = False,
    seed: int = 0,
    shipped: bool = False,
) -> dict[str, Any]:
    """``shipped``: the catalog's trained JumpReLU transcoders instead of random ones."""
    torch.set_num_threads(1)
    from featuresteer_dicts.artifacts import catalog_transcoders
    from featuresteer_server.attribution import attribute, export_transcoder_set
    from featuresteer_server.attribution.testing import random_transcoders

    t0 = time.perf_counter()
    python = ensure_reference_env()
    env_s = time.perf_counter() - t0
    model, tok, src = load_model()
    tokens = prompt_tokens(tok, n_tokens)
    if shipped:
        tcs = catalog_transcoders(model.cfg.n_layers)
    else:
        tcs = random_transcoders(
            model.cfg.n_layers, model.cfg.d_model, 2304, density=density, skip=skip, seed=seed
        )
    with tempfile.TemporaryDirectory(prefix="fs-parity-") as tmp:
        cfg = export_transcoder_set(tcs, Path(tmp) / "transcoders", scan="parity")
        t1 = time.perf_counter()
        ref = run_reference(
            python,
            ct_model_dir(src),
            cfg,
            tokens,
            max_feature_nodes=max_feature_nodes,
            batch_size=batch_size,
            out=Path(tmp) / "ref.pt",
            graph_json_dir=Path(tmp) / "graph",
        )
        ref_s = time.perf_counter() - t1
        ref_json = json.loads((Path(tmp) / "graph" / "parity.json").read_text())
    ours = attribute(model, tcs, tokens, max_feature_nodes=max_feature_nodes, batch_size=batch_size)
    report = compare(ours, ref)
    report.update(compare_json(ours, ref_json, tok))
    report.update(
        n_tokens=n_tokens,
        max_feature_nodes=max_feature_nodes,
        batch_size=batch_size,
        env_build_s=env_s,
        reference_process_s=ref_s,
        reference_attribute_s=ref["wall_s"],
        ours_attribute_s=ours.stats["total_s"],
    )
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-tokens", type=int, default=8)
    ap.add_argument("--max-feature-nodes", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip", action="store_true", help="skip transcoders (W_skip)")
    ap.add_argument("--shipped", action="store_true", help="the catalog's trained transcoders")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report = run_parity(
        args.n_tokens, args.max_feature_nodes, args.batch_size, skip=args.skip, shipped=args.shipped
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
