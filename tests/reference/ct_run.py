"""Run circuit-tracer 0.5.0 on a local Llama model (runs inside the reference venv only).

Usage (from tests/reference/parity.py or bench_attribution.py):
    ct-venv/bin/python tests/reference/ct_run.py --model-dir D --transcoders D/config.yaml \
        --tokens 1,504,... --max-feature-nodes 200 --batch-size 64 --out result.pt

Builds the HookedTransformer by hand (this TransformerLens does not know the local model's
name), with the rope theta read from the config (a Llama config without it silently gives
wrong logits), unprocessed weights (no folding), wraps it as circuit-tracer's
TransformerLensReplacementModel, and saves the unpruned graph, the prune masks, the scores,
the wall time of ``attribute`` and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def build_model(model_dir: str, transcoders, dtype=torch.float32):
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).eval()
    c = hf.config
    theta = getattr(c, "rope_theta", None) or (c.rope_scaling or {}).get("rope_theta")
    if theta is None:
        raise SystemExit("the model config has no rope_theta")
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_kv = c.num_key_value_heads
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=2048,
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        rotary_base=float(theta),
        final_rms=True,
        gated_mlp=True,
        n_key_value_heads=n_kv if n_kv != c.num_attention_heads else None,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=False,
        tokenizer_name=model_dir,
        model_name="smollm2-135m-local",
        dtype=dtype,
        device="cpu",
    )
    model = TransformerLensReplacementModel(cfg, tokenizer=tok, move_to_device=False)
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model._configure_replacement_model(transcoders)
    model.eval()
    return model, hf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--transcoders", required=True, help="config.yaml of a transcoder set")
    ap.add_argument("--tokens", required=True, help="comma-separated token ids, BOS first")
    ap.add_argument("--max-feature-nodes", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-logit-targets", type=int, default=10)
    ap.add_argument("--desired-logit-prob", type=float, default=0.95)
    ap.add_argument("--node-threshold", type=float, default=0.8)
    ap.add_argument("--edge-threshold", type=float, default=0.98)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--graph-json-dir", help="also write create_graph_files output here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import yaml
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    from circuit_tracer.utils.hf_utils import load_transcoders

    with open(args.transcoders) as f:
        config = yaml.safe_load(f)
    transcoders = load_transcoders(
        config,
        device=torch.device("cpu"),
        dtype=torch.float32,
        lazy_encoder=False,
        lazy_decoder=False,
    )
    t_load = time.perf_counter()
    model, hf = build_model(args.model_dir, transcoders)
    load_s = time.perf_counter() - t_load
    tokens = torch.tensor([int(t) for t in args.tokens.split(",")])
    with torch.no_grad():
        hf_logits = hf(tokens[None]).logits[0, -1]
        tl_logits = model(tokens[None])[0, -1]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    graph = attribute(
        tokens,
        model,
        max_n_logits=args.max_logit_targets,
        desired_logit_prob=args.desired_logit_prob,
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
    )
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    node_mask, edge_mask, cumulative = prune_graph(graph, args.node_threshold, args.edge_threshold)
    replacement, completeness = compute_graph_scores(graph)
    if args.graph_json_dir:
        from circuit_tracer.utils.create_graph_files import create_graph_files

        create_graph_files(
            graph,
            slug="parity",
            output_path=args.graph_json_dir,
            scan="parity",
            node_threshold=args.node_threshold,
            edge_threshold=args.edge_threshold,
        )
    torch.save(
        {
            "input_tokens": graph.input_tokens.cpu(),
            "active_features": graph.active_features.cpu(),
            "activation_values": graph.activation_values.cpu(),
            "selected_features": graph.selected_features.cpu(),
            "adjacency_matrix": graph.adjacency_matrix.cpu(),
            "logit_token_ids": graph.logit_token_ids.cpu(),
            "logit_probabilities": graph.logit_probabilities.cpu(),
            "node_mask": node_mask.cpu(),
            "edge_mask": edge_mask.cpu(),
            "cumulative": cumulative.cpu(),
            "scores": (replacement, completeness),
            "wall_s": wall,
            "load_s": load_s,
            "peak_rss_mib": rss / 1024,
            "peak_rss_before_mib": rss_before / 1024,
            "hf_vs_tl_max_abs": float((hf_logits - tl_logits).abs().max()),
        },
        args.out,
    )
    print(json.dumps({"wall_s": wall, "peak_rss_mib": rss / 1024, "load_s": load_s}))


if __name__ == "__main__":
    main()
