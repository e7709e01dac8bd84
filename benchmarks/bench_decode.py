"""DecodeFeatures vs a bare forward pass of the same engine, and Tokenize/GetInfo latency.

Run: .venv/bin/python benchmarks/bench_decode.py [--repeats 7] [--threads 2]
Prints markdown rows for BENCHMARKS.md and writes benchmarks/results/decode-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import time
from pathlib import Path

import grpc
import torch

from benchmarks.common import interleave, loadavg, machine, percentile, summary
from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer.v1 import featuresteer_pb2_grpc as pb_grpc
from featuresteer_server import domain
from featuresteer_server.config import load_config
from featuresteer_server.engines.loading import load_engine
from featuresteer_server.server import start_server

TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type "
    "changed how books were made, sold and read across Europe. "
) * 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--latency-calls", type=int, default=200)
    args = ap.parse_args()
    cfg = load_config(port=0, metrics_enabled=False, torch_threads=args.threads)
    print("loading the default engine …", flush=True)
    engine = load_engine(cfg)
    if not engine.dictionaries:
        raise SystemExit("no dictionaries loaded: the catalog has no default dictionaries")
    ids = engine.tokenizer.encode(TEXT)[: args.tokens]
    dicts = list(engine.dictionaries.values())
    hooks = {d.hook_name for d in dicts}
    tokens = torch.tensor([ids])
    req = domain.DecodeRequest(
        inputs=(domain.DecodeInput(token_ids=tuple(ids)),), top_k=16, include_error=True
    )

    def full_forward() -> None:
        with torch.inference_mode():
            engine.model(tokens)

    def forward_to_hooks() -> None:  # the same forward decode needs, without the dictionaries
        engine.forward_cache([ids], hooks)

    def decode() -> None:
        asyncio.run(engine.decode(req))

    one = dicts[len(dicts) // 2]  # one dictionary alone: the per-dictionary overhead
    req_one = dataclasses.replace(req, dictionary_ids=(one.id,))

    def forward_to_one_hook() -> None:
        engine.forward_cache([ids], {one.hook_name})

    def decode_one() -> None:
        asyncio.run(engine.decode(req_one))

    cases = {
        "full_forward": full_forward,
        "forward_to_hooks": forward_to_hooks,
        "decode": decode,
        "forward_to_one_hook": forward_to_one_hook,
        "decode_one": decode_one,
    }
    for fn in cases.values():  # warm-up
        fn()
    print(f"{len(ids)} tokens, {len(dicts)} dictionaries: {[d.id for d in dicts]}", flush=True)
    load_before = loadavg()
    times = interleave(cases, args.repeats)
    rows = []
    for name, xs in times.items():
        med, lo, hi = summary(xs)
        rows.append({"case": name, "median_ms": med * 1e3, "min_ms": lo * 1e3, "max_ms": hi * 1e3})
    ratios_hooks = [d / f for d, f in zip(times["decode"], times["forward_to_hooks"], strict=True)]
    ratios_full = [d / f for d, f in zip(times["decode"], times["full_forward"], strict=True)]
    ratios_one = [
        d / f for d, f in zip(times["decode_one"], times["forward_to_one_hook"], strict=True)
    ]
    latency = asyncio.run(rpc_latency(cfg, engine, args.latency_calls))
    result = {
        "machine": machine(),
        "dtype": engine.dtype,
        "threads": args.threads,
        "tokens": len(ids),
        "dictionaries": [d.id for d in dicts],
        "load_before": load_before,
        "load_after": loadavg(),
        "decode": rows,
        "ratio_decode_vs_forward_to_hooks": summary(ratios_hooks),
        "one_dictionary": one.id,
        "ratio_one_dictionary": summary(ratios_one),
        "ratio_decode_vs_full_forward": summary(ratios_full),
        "rpc_latency": latency,
    }
    out = Path(__file__).parent / "results" / f"decode-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


async def rpc_latency(cfg, engine, calls: int) -> list[dict]:  # type: ignore[no-untyped-def]
    srv = await start_server(cfg, engine=engine)
    out = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.FeatureSteerStub(ch)
            rpcs = {
                "Tokenize": lambda: stub.Tokenize(pb.TokenizeRequest(text=TEXT[:200])),
                "GetInfo": lambda: stub.GetInfo(pb.GetInfoRequest()),
            }
            for name, call in rpcs.items():
                for _ in range(20):
                    await call()
                for conc in (1, 16):
                    lat: list[float] = []

                    async def worker(n: int, call=call, lat=lat) -> None:  # type: ignore[no-untyped-def]
                        for _ in range(n):
                            t0 = time.perf_counter()
                            await call()
                            lat.append(time.perf_counter() - t0)

                    t0 = time.perf_counter()
                    await asyncio.gather(*(worker(calls // conc) for _ in range(conc)))
                    wall = time.perf_counter() - t0
                    out.append(
                        {
                            "rpc": name,
                            "concurrency": conc,
                            "calls": len(lat),
                            "p50_ms": percentile(lat, 50) * 1e3,
                            "p99_ms": percentile(lat, 99) * 1e3,
                            "mean_ms": statistics.mean(lat) * 1e3,
                            "throughput_rps": len(lat) / wall,
                            "load": loadavg(),
                        }
                    )
                    print(out[-1], flush=True)
    finally:
        await srv.stop(grace=0)
    return out


if __name__ == "__main__":
    main()
