"""Event-loop lag and health-check latency while abusive requests are being refused (issue 10,
"bounded work"; docs/SECURITY.md#limits).

Run: .venv/bin/python -m benchmarks.bench_limits [--tiny] [--seconds 20] [--clients 4]
Starts an in-process gRPC server on port 0 (the tiny random model with ``--tiny``, else the
default model's hooked engine with its catalog dictionaries) and measures two phases:

- *idle*: nothing but the probes;
- *abuse*: ``--clients`` client processes sending, in a loop, requests the server must refuse:
  multi-MiB messages beyond the receive limit (the issue's 8 MiB chat message took 6.9 s of
  event loop to tokenize), a vector of 100,000 values, texts just within the byte limit with
  far more tokens than allowed (tokenized off the event loop, then refused), and undecodable
  bytes.

In both phases an asyncio timer inside the server (sleep 10 ms, record the overshoot)
measures the event loop's lag, and a separate client process sends a health Check and a
GetInfo every 50 ms and records their latency. Prints markdown rows for BENCHMARKS.md and
writes benchmarks/results/limits-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import loadavg, machine, percentile
from featuresteer_server.config import load_config
from featuresteer_server.server import start_server

WORDS = "the quick brown fox jumps over a lazy dog while seven otters play the banjo. "
PERIOD = 0.01  # the lag timer's sleep


def _abusive(max_text_bytes: int, attribute_bytes: int) -> list[tuple[str, str, bytes]]:
    """(kind, method, serialized request) of requests the server must refuse."""
    from featuresteer.v1 import featuresteer_pb2 as pb

    near = (WORDS * (max_text_bytes // len(WORDS) + 1))[:max_text_bytes]
    vec = pb.VectorTarget(hook_name="blocks.0.hook_resid_post", values=[1.0] * 100_000)
    msgs: list[tuple[str, str, Any]] = [
        (
            "8 MiB chat message",
            "Generate",
            pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x" * (8 << 20))]),
        ),
        (
            "3 MiB DecodeFeatures text",
            "DecodeFeatures",
            pb.DecodeFeaturesRequest(inputs=[pb.DecodeInput(text="y" * (3 << 20))], top_k=1),
        ),
        (
            "vector of 100k values",
            "Generate",
            pb.GenerateRequest(
                prompt="a", interventions=[pb.Intervention(op=pb.Intervention.OP_ADD, vector=vec)]
            ),
        ),
        ("Tokenize, text at the byte limit", "Tokenize", pb.TokenizeRequest(text=near)),
        ("Generate prompt at the byte limit", "Generate", pb.GenerateRequest(prompt=near)),
        (
            "chat message at the byte limit",
            "Generate",
            pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=near)]),
        ),
        (
            "DecodeFeatures, 4 texts at the byte limit",
            "DecodeFeatures",
            pb.DecodeFeaturesRequest(inputs=[pb.DecodeInput(text=near)] * 4, top_k=1),
        ),
        (
            "Attribute prompt at its byte limit",
            "Attribute",
            pb.AttributeRequest(prompt=near[:attribute_bytes]),
        ),
    ]
    out = [(kind, method, m.SerializeToString()) for kind, method, m in msgs]
    out.append(("undecodable bytes", "DecodeFeatures", b"\x0a\xff\xff\xff\xff\x0f"))
    return out


def abuse_client(port: int, seconds: float, limits: tuple[int, int], results: Any) -> None:
    """A client process: send every abusive request in turn until ``seconds`` have passed."""
    import grpc

    requests = _abusive(*limits)
    codes: collections.Counter[str] = collections.Counter()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        calls = {}
        for _, method, _raw in requests:
            path = f"/featuresteer.v1.FeatureSteer/{method}"
            streaming = method in ("Generate", "Attribute")
            calls[method] = ch.unary_stream(path) if streaming else ch.unary_unary(path)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _kind, method, raw in requests:
                try:
                    out = calls[method](raw, timeout=60)
                    if method in ("Generate", "Attribute"):
                        for _ in out:
                            pass
                    codes["OK"] += 1
                except grpc.RpcError as err:
                    codes[err.code().name] += 1  # type: ignore[attr-defined]
    results.put(dict(codes))


def probe_client(port: int, seconds: float, results: Any) -> None:
    """A client process: health Check + GetInfo every 50 ms; their latencies (s)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from featuresteer.v1 import featuresteer_pb2 as pb
    from featuresteer.v1 import featuresteer_pb2_grpc as pb_grpc

    lat: dict[str, list[float]] = {"health": [], "GetInfo": []}
    failures = 0
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        stub = pb_grpc.FeatureSteerStub(ch)
        stub.GetInfo(pb.GetInfoRequest(), timeout=30)  # channel warm-up
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for name, call in (
                ("health", lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10)),
                ("GetInfo", lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=10)),
            ):
                t0 = time.perf_counter()
                try:
                    call()
                    lat[name].append(time.perf_counter() - t0)
                except grpc.RpcError:
                    failures += 1
            time.sleep(0.05)
    results.put({"latency": lat, "failures": failures})


async def lag_monitor(stop: asyncio.Event) -> list[float]:
    """Overshoot of a 10 ms sleep on the server's event loop, every tick (s)."""
    lags = []
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(PERIOD)
        lags.append(time.perf_counter() - t0 - PERIOD)
    return lags


def _stats(xs: list[float]) -> str:
    if not xs:
        return "–"
    return (
        f"{percentile(xs, 50) * 1e3:.1f} / {percentile(xs, 99) * 1e3:.1f} / {max(xs) * 1e3:.0f} ms"
    )


async def phase(
    srv: Any, name: str, seconds: float, clients: int, limits: tuple[int, int]
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")  # gRPC and fork do not mix
    results = ctx.Queue()
    procs = [ctx.Process(target=probe_client, args=(srv.port, seconds, results))]
    procs += [
        ctx.Process(target=abuse_client, args=(srv.port, seconds, limits, results))
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    await asyncio.sleep(2.0)  # let the children import and connect
    stop = asyncio.Event()
    monitor = asyncio.create_task(lag_monitor(stop))
    outs = [await asyncio.to_thread(results.get) for _ in procs]
    stop.set()
    lags = await monitor
    for p in procs:
        await asyncio.to_thread(p.join)
    probe = next(o for o in outs if "latency" in o)
    codes: collections.Counter[str] = collections.Counter()
    for o in outs:
        if "latency" not in o:
            codes.update(o)
    return {
        "phase": name,
        "clients": clients,
        "seconds": seconds,
        "lag_s": lags,
        "health_s": probe["latency"]["health"],
        "getinfo_s": probe["latency"]["GetInfo"],
        "probe_failures": probe["failures"],
        "refused": dict(codes),
        "load": loadavg(),
    }


async def run(engine: Any, seconds: float, clients: int) -> tuple[list[dict[str, Any]], Any]:
    from featuresteer_server import convert

    cfg = load_config(port=0, metrics_enabled=False, catalog=None)
    srv = await start_server(cfg, engine=engine)
    lim = srv.state.limits
    # the fallbacks (today's defaults) let the same script measure a checkout from before the
    # bounds: PYTHONPATH=<old>/service:<old>/clients/python:<old> python -m benchmarks...
    limits = (
        getattr(lim, "max_text_bytes", 128 * 1024),
        convert.attribute_prompt_bytes(lim) if hasattr(convert, "attribute_prompt_bytes") else 8192,
    )
    try:
        out = [
            await phase(srv, "idle", min(seconds, 10.0), 0, limits),
            await phase(srv, "abuse", seconds, clients, limits),
        ]
    finally:
        srv.state.draining = True
        await srv.server.stop(0)
    byte_limits = (
        convert.request_byte_limits(lim) if hasattr(convert, "request_byte_limits") else {}
    )
    return out, byte_limits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny random model (same tokenizer)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.tiny:
        from featuresteer_server.testing import tiny_engine

        engine = tiny_engine(Path(tempfile.mkdtemp(prefix="bench-limits-")))
        model = "tiny random Llama (SmolLM2 tokenizer)"
    else:
        from featuresteer_server.engines.loading import load_engine

        print("loading the default engine …", flush=True)
        engine = load_engine(load_config(torch_threads=args.threads))
        model = f"{engine.model_name}, hooked engine, {len(engine.dictionaries)} dictionaries"
    phases, byte_limits = asyncio.run(run(engine, args.seconds, args.clients))
    info = {
        "machine": machine(),
        "model": model,
        "request_byte_limits": byte_limits,
        "phases": phases,
    }
    out = Path(__file__).parent / "results" / f"limits-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(info, indent=2))
    print(f"\n{model}; torch threads {args.threads}\n")
    print(
        "| phase | abusive clients | refused (codes) | event-loop lag p50 / p99 / max | "
        "health Check p50 / p99 / max | GetInfo p50 / p99 / max | probe failures | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for p in phases:
        refused = ", ".join(f"{k} {v}" for k, v in sorted(p["refused"].items())) or "–"
        print(
            f"| {p['phase']} ({p['seconds']:.0f} s) | {p['clients']} | {refused} | "
            f"{_stats(p['lag_s'])} | {_stats(p['health_s'])} | {_stats(p['getinfo_s'])} | "
            f"{p['probe_failures']} | {p['load']} |"
        )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
