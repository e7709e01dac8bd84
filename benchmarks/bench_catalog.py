"""GetFeature latency cold vs warm from Redis vs the local LRU, and SearchFeatures latency.

Run: .venv/bin/python benchmarks/bench_catalog.py [--tiny] [--calls 200]
Starts its own redis-server on a free port (needs /usr/bin/redis-server) and an in-process
gRPC server on port 0; prints markdown rows for BENCHMARKS.md and writes
benchmarks/results/catalog-<time>.json.

- *cold*: a feature not cached anywhere (Redis GET miss, compute, Redis SET).
- *warm Redis*: the same features again (the LRU is not consulted while Redis is up; see
  docs/cache.md): Redis GET hit + protobuf parse.
- *LRU*: a server without Redis, features already computed once.
Without real metadata files, the default dictionary is served weights-only (logits computed
from W_dec, ln_final.w and W_U); ``--synthetic-metadata`` adds a synthetic features.npz
(the tooling's format) for the first dictionary so the metadata path and text search run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import torch

from benchmarks.common import loadavg, machine, percentile
from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer.v1 import featuresteer_pb2_grpc as pb_grpc
from featuresteer_server.config import load_config
from featuresteer_server.server import start_server


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


async def timed_calls(fn: Callable[[int], Awaitable[Any]], items: list[int]) -> list[float]:
    out = []
    for i in items:
        t0 = time.perf_counter()
        await fn(i)
        out.append(time.perf_counter() - t0)
    return out


def row(name: str, xs: list[float], note: str = "") -> dict[str, Any]:
    return {
        "case": name,
        "calls": len(xs),
        "p50_ms": percentile(xs, 50) * 1e3,
        "p99_ms": percentile(xs, 99) * 1e3,
        "load": loadavg(),
        "note": note,
    }


async def run(engine: Any, calls: int, redis_url: str) -> list[dict[str, Any]]:
    d = next(iter(engine.dictionaries.values()))
    n = min(calls, d.d_sae)
    feats = list(range(n))
    results = []

    async def serve(url: str | None) -> Any:
        return await start_server(
            load_config(port=0, metrics_enabled=False, catalog=None, redis_url=url),
            engine=engine,
        )

    async def stop(srv: Any) -> None:
        srv.state.draining = True
        await srv.server.stop(0)
        await srv.state.cache.close()

    for phase in ("redis", "lru"):
        srv = await serve(redis_url if phase == "redis" else None)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.FeatureSteerStub(ch)

            async def get(i: int, stub: Any = stub) -> Any:
                ref = pb.FeatureRef(dictionary_id=d.id, index=i)
                return await stub.GetFeature(pb.GetFeatureRequest(feature=ref))

            await stub.GetInfo(pb.GetInfoRequest())  # channel warm-up
            cold = await timed_calls(get, feats)
            warm = await timed_calls(get, feats)
            if phase == "redis":
                results.append(row("GetFeature cold (Redis miss + compute + SET)", cold))
                results.append(row("GetFeature warm from Redis", warm))

                async def tok(i: int, stub: Any = stub) -> Any:
                    req = pb.SearchFeaturesRequest(token_id=1000 + i, dictionary_id=d.id, limit=20)
                    return await stub.SearchFeatures(req)

                m = min(n, 50)
                results.append(
                    row("SearchFeatures token_id, cold", await timed_calls(tok, list(range(m))))
                )
                results.append(
                    row(
                        "SearchFeatures token_id, warm (Redis)",
                        await timed_calls(tok, list(range(m))),
                    )
                )
                if srv.state.require_catalog().has_metadata(d.id):
                    words = ("the", "of", "and", "print", "book", "code", "data", "time")

                    async def text(i: int, stub: Any = stub, words: Any = words) -> Any:
                        q = f"{words[i % len(words)]} {i}"
                        return await stub.SearchFeatures(
                            pb.SearchFeaturesRequest(query=q, dictionary_id=d.id, limit=20)
                        )

                    results.append(
                        row("SearchFeatures text, cold", await timed_calls(text, list(range(m))))
                    )
                    results.append(
                        row(
                            "SearchFeatures text, warm (Redis)",
                            await timed_calls(text, list(range(m))),
                        )
                    )
                n_dicts = len(engine.dictionaries)
                if n_dicts > 1:
                    # empty dictionary_id: one search over every loaded dictionary
                    async def text_all(i: int, stub: Any = stub) -> Any:
                        q = ("the", "print", "love", "file")[i % 4] + f" {i}"
                        req = pb.SearchFeaturesRequest(query=q, limit=20)
                        return await stub.SearchFeatures(req)

                    async def tok_all(i: int, stub: Any = stub) -> Any:
                        req = pb.SearchFeaturesRequest(token_id=2000 + i, limit=20)
                        return await stub.SearchFeatures(req)

                    k = min(n, 20)
                    for name, fn in (("text", text_all), ("token_id", tok_all)):
                        for temp in ("cold", "warm (Redis)"):
                            label = f"SearchFeatures {name}, all {n_dicts} dictionaries, {temp}"
                            results.append(row(label, await timed_calls(fn, list(range(k)))))
            else:
                results.append(row("GetFeature from the local LRU (no Redis)", warm))
        await stop(srv)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny random model (fast smoke run)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--synthetic-metadata", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-catalog-"))
    if args.tiny:
        from featuresteer_server.testing import tiny_engine

        engine = tiny_engine(tmp)
        model = "tiny random Llama (d_model 64), TopK SAE 128 features"
    else:
        from featuresteer_server.engines.loading import load_engine

        print("loading the default engine …", flush=True)
        engine = load_engine(load_config(torch_threads=args.threads))
        d0 = next(iter(engine.dictionaries.values()))
        model = f"{engine.model_name}, {d0.id} ({d0.d_sae} features)"
    if args.synthetic_metadata:
        from featuresteer_server.testing import write_features_npz

        d0 = next(iter(engine.dictionaries.values()))
        target = Path(d0.source) / "features.npz"
        if target.exists():
            raise SystemExit(f"{target} exists: not overwriting real metadata")
        write_features_npz(target, d0.d_sae)
    proc, url = start_redis()
    try:
        results = asyncio.run(run(engine, args.calls, url))
    finally:
        proc.terminate()
        proc.wait()
        if args.synthetic_metadata:
            d0 = next(iter(engine.dictionaries.values()))
            (Path(d0.source) / "features.npz").unlink(missing_ok=True)
    info = {"machine": machine(), "model": model, "results": results}
    out = Path(__file__).parent / "results" / f"catalog-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(info, indent=2))
    print(f"\n{model}; threads {args.threads}\n")
    print("| case | calls | p50 | p99 | load avg |")
    print("|---|---|---|---|---|")
    for r in results:
        p50, p99 = f"{r['p50_ms']:.2f} ms", f"{r['p99_ms']:.2f} ms"
        print(f"| {r['case']} | {r['calls']} | {p50} | {p99} | {r['load']} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
