"""Benchmark: attribution graphs, featuresteer vs circuit-tracer 0.5.0, interleaved.

Same model (the default SmolLM2-135M-Instruct, float32), same per-layer transcoders
(``--transcoders shipped``: the catalog's trained JumpReLU transcoders; ``random``: random
ReLU, 576 -> 2304; written once in circuit-tracer's layout and loaded by both), same tokens,
thresholds
(0.8 / 0.98), max_feature_nodes (500) and backward batch (64). Each measurement runs in
its own process so that peak RSS is that run's alone; the two implementations alternate
(ours first on even repeats, circuit-tracer first on odd ones) so that background load on
a shared machine hits both alike. LOGIT_RANKING's time is measured in our worker.

Usage:
    .venv/bin/python benchmarks/bench_attribution.py \
        [--sizes 16,32,64] [--repeats 1] [--threads 1] [--transcoders shipped|random]
        [--json out.json]

Reported per run: wall time of the attribution call (model loading excluded), peak RSS of
the whole process (model, transcoders and attribution), and the RSS before the call.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

DENSITY = 0.01  # random transcoders fire on ~1% of tokens: ~23 active features/token/layer
D_SAE = 2304
SEED = 0


def load_transcoders(kind: str, n_layers: int, d_model: int) -> list[Any]:
    from featuresteer_dicts.artifacts import catalog_transcoders
    from featuresteer_server.attribution.testing import random_transcoders

    if kind == "shipped":
        return catalog_transcoders(n_layers)
    return random_transcoders(n_layers, d_model, D_SAE, density=DENSITY, seed=SEED)


def worker_ours(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    from featuresteer_server.attribution import attribute, logit_ranking
    from featuresteer_server.models import build_hooked, load_hf, prepare_default_model

    t = time.perf_counter()
    hf, tok = load_hf(prepare_default_model(), torch.float32)
    model = build_hooked(hf, tok, torch.float32)
    del hf
    tcs = load_transcoders(args.transcoders, model.cfg.n_layers, model.cfg.d_model)
    load_s = time.perf_counter() - t
    tokens = [int(x) for x in args.tokens.split(",")]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    graph = attribute(
        model, tcs, tokens, max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size
    )
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t1 = time.perf_counter()
    logit_ranking(model, tcs[15], tokens, int(graph.raw.logit_token_ids[0]))
    ranking_s = time.perf_counter() - t1
    return {
        "wall_s": wall,
        "peak_rss_mib": rss,
        "peak_rss_before_mib": rss_before,
        "load_s": load_s,
        "logit_ranking_s": ranking_s,
        "active_features": graph.n_active_features,
        "stats": graph.stats,
    }


def run_worker(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16,32,64")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-feature-nodes", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip-reference", action="store_true", help="ours only")
    ap.add_argument("--transcoders", choices=["shipped", "random"], default="shipped")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", choices=["ours"], help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "ours":
        print(json.dumps(worker_ours(args)))
        return

    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from featuresteer_server.attribution import export_transcoder_set
    from featuresteer_server.models import prepare_default_model
    from featuresteer_server.testing import ct_model_dir, ensure_reference_env, prompt_tokens

    src = prepare_default_model()
    tok = AutoTokenizer.from_pretrained(src)
    sizes = [int(s) for s in args.sizes.split(",")]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fs-bench-") as tmp:
        ct_python = ct_cfg = ct_dir = None
        if not args.skip_reference:
            ct_python = ensure_reference_env()
            ct_dir = ct_model_dir(src)
            d_model = 576
            tcs = load_transcoders(args.transcoders, 30, d_model)
            ct_cfg = export_transcoder_set(tcs, Path(tmp) / "tc", scan="bench")
            del tcs
        for n in sizes:
            tokens = prompt_tokens(tok, n)
            common = [
                "--max-feature-nodes", str(args.max_feature_nodes),
                "--batch-size", str(args.batch_size),
                "--threads", str(args.threads),
            ]  # fmt: skip
            for rep in range(args.repeats):
                order = ["ours", "circuit-tracer"] if rep % 2 == 0 else ["circuit-tracer", "ours"]
                for impl in order:
                    if impl == "ours":
                        cmd = [sys.executable, __file__, "--worker", "ours",
                               "--tokens", ",".join(map(str, tokens)), *common,
                               "--transcoders", args.transcoders]  # fmt: skip
                        out = run_worker(cmd)
                    elif ct_python is not None:
                        res = Path(tmp) / f"ct-{n}-{rep}.pt"
                        cmd = [str(ct_python), str(ROOT / "tests/reference/ct_run.py"),
                               "--model-dir", str(ct_dir), "--transcoders", str(ct_cfg),
                               "--tokens", ",".join(map(str, tokens)), "--out", str(res),
                               *common]  # fmt: skip
                        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
                        out = run_worker(cmd, env)
                    else:
                        continue
                    out.update(impl=impl, n_tokens=n, repeat=rep, load_avg=os.getloadavg())
                    results.append(out)
                    print(
                        f"{impl:15s} n={n:3d} rep={rep} wall={out['wall_s']:7.2f}s "
                        f"peak_rss={out['peak_rss_mib']:7.0f} MiB "
                        f"load={out['load_avg'][0]:.1f}",
                        flush=True,
                    )
    print()
    print(
        "| tokens | ours s | circuit-tracer s | ratio | ours peak RSS MiB | "
        "circuit-tracer peak RSS MiB | LOGIT_RANKING s |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        mine = [r for r in results if r["n_tokens"] == n and r["impl"] == "ours"]
        ref = [r for r in results if r["n_tokens"] == n and r["impl"] == "circuit-tracer"]
        m_wall = statistics.median(r["wall_s"] for r in mine)
        m_rss = max(r["peak_rss_mib"] for r in mine)
        m_rank = statistics.median(r["logit_ranking_s"] for r in mine)
        if ref:
            r_wall = statistics.median(r["wall_s"] for r in ref)
            r_rss = max(r["peak_rss_mib"] for r in ref)
            print(
                f"| {n} | {m_wall:.1f} | {r_wall:.1f} | {m_wall / r_wall:.2f}x | {m_rss:.0f} | "
                f"{r_rss:.0f} | {m_rank:.2f} |"
            )
        else:
            print(f"| {n} | {m_wall:.1f} | - | - | {m_rss:.0f} | - | {m_rank:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
