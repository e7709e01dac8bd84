"""Generate throughput: tokens/s at 1 and 16 concurrent requests.

Cases (fixed here, so runs are comparable):
    (a) vllm-unsteered      the vLLM engine, no interventions
    (b) vllm-one-spec       every request steered with the same spec
    (c) vllm-16-specs       every request with its own spec (16 distinct fingerprints)
    (d) hf-serial           Neuronpedia-style baseline: one request at a time, transformers
                            ``generate`` with its KV cache and a steering forward hook
    (e) hf-batched          one transformers ``generate`` over the whole batch, one shared hook
With ``--engine-path``, also through ``VllmEngine.generate`` (what the servicer calls: prompt
tokenization, text deltas, and for steered requests the worker poll after every output that
lets the isolation guard abort a request before its tokens are streamed):
    (f) engine-unsteered    as (a), through the engine (never polled)
    (g) engine-distinct     as (c), through the engine (polled; polls coalesced)
(f)/(g) count the tokens actually generated (EOS is not ignored on that path).
Every case generates ``--new-tokens`` greedy tokens per request (EOS ignored, so all cases
produce the same token count) from the same prompt; vLLM's prefix cache is off unless
``--prefix-caching`` (else (a)/(b) reuse cached prefills that (c)'s salts keep apart).
Rounds interleave the cases (drift on a shared machine hits all alike); each row reports
median and min–max tokens/s, dtype, threads and the load average seen. Prints markdown rows
for BENCHMARKS.md.

Run in the environment holding vLLM (docs/vllm.md):
    python -m benchmarks.bench_generate --repeats 5 --new-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import loadavg
from featuresteer_server import domain, generation, interventions, models, planning
from featuresteer_server.dictionaries import load_dictionary

D_SAE = 4608
HOOK = "blocks.12.hook_resid_post"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def build(root: Path, dtype: torch.dtype) -> tuple[Any, Any, Any, Path]:
    """HF model, tokenizer, a random TopK SAE of the default catalog's shape at layer 12."""
    from featuresteer_server.dictionaries import write_dictionary

    model_dir = models.prepare_default_model()
    hf, tok = models.load_hf(model_dir, dtype)
    g = torch.Generator().manual_seed(0)
    d = int(hf.config.hidden_size)
    weights = {
        "W_enc": torch.randn(d, D_SAE, generator=g) / d**0.5,
        "b_enc": torch.zeros(D_SAE),
        "W_dec": torch.randn(D_SAE, d, generator=g) / D_SAE**0.5,
        "b_dec": torch.zeros(d),
    }
    path = write_dictionary(
        root / "sae", weights, architecture="topk", hook_name=HOOK, model_name="bench", k=64
    )
    sae = load_dictionary(path, dictionary_id="bench/sae@v1")
    return hf, tok, sae, model_dir


def spec_items(i: int) -> tuple[domain.Intervention, ...]:
    return (
        domain.Intervention(
            op=domain.Op.ADD, value=4.0 + 0.25 * i, feature=domain.FeatureRef("bench/sae@v1", i)
        ),
    )


class HfCases:
    """(d) and (e): transformers generate with forward hooks running the shared edit code."""

    def __init__(self, hf: Any, tok: Any, sae: Any, n_new: int) -> None:
        self.hf, self.n_new = hf, n_new
        self.sae = sae
        self.ids = [1, *tok.encode(PROMPT, add_special_tokens=False)]
        self.spec = interventions.compile_steering(
            spec_items(0), {sae.id: sae}, hook_names=[HOOK], d_model=int(hf.config.hidden_size)
        )
        self.special = frozenset(int(i) for i in tok.all_special_ids)

    def serial(self, n: int) -> int:
        for _ in range(n):
            session = generation.HookSession(
                self.hf, self.spec, prompt_len=len(self.ids), special_ids=self.special
            )
            with session, torch.inference_mode():
                self.hf.generate(
                    torch.tensor([self.ids]), max_new_tokens=self.n_new, min_new_tokens=self.n_new,
                    do_sample=False, pad_token_id=2,
                )  # fmt: skip
        return n * self.n_new

    def batched(self, n: int) -> int:
        layer = int(HOOK.split(".")[1])
        d_i = self.sae.decoder_direction(0).to(self.hf.dtype)  # one shared ADD for the batch

        def hook(module: Any, args: Any, out: Any) -> Any:
            h = out[0] if isinstance(out, tuple) else out
            h = h + 4.0 * d_i
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = self.hf.model.layers[layer].register_forward_hook(hook)
        try:
            ids = torch.tensor([self.ids] * n)
            with torch.inference_mode():
                self.hf.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.n_new,
                    min_new_tokens=self.n_new, do_sample=False, pad_token_id=2,
                )  # fmt: skip
        finally:
            handle.remove()
        return n * self.n_new


class VllmCases:
    def __init__(self, engine: Any, ids: list[int], n_new: int) -> None:
        self.engine, self.ids, self.n_new = engine, ids, n_new

    async def one(self, items: tuple[domain.Intervention, ...], k: int) -> int:
        h = self.engine.hooked
        spec = interventions.compile_steering(
            items, h.dictionaries, hook_names=h.steering_hooks(), d_model=int(h.model.cfg.d_model)
        )
        plan = planning.RunPlan(prompt_ids=self.ids, spec=spec, max_new_tokens=self.n_new)
        sp = self.engine.sampling_params(plan, items)
        sp.ignore_eos = True
        n = 0
        async for out in self.engine.llm.generate(
            self.engine.prompt(plan, items), sp, f"bench-{k}-{time.monotonic_ns()}"
        ):
            n += len(out.outputs[0].token_ids)
        return n

    async def run(self, n: int, mode: str) -> int:
        def items(i: int) -> tuple[domain.Intervention, ...]:
            return () if mode == "a" else spec_items(0 if mode == "b" else i)

        counts = await asyncio.gather(*(self.one(items(i), i) for i in range(n)))
        return sum(counts)

    async def via_engine(self, n: int, steered: bool) -> int:
        """``n`` concurrent ``VllmEngine.generate`` calls (distinct specs when steered)."""

        async def one(i: int) -> int:
            req = domain.GenerateRequest(
                prompt=PROMPT,
                max_new_tokens=self.n_new,
                interventions=spec_items(i) if steered else (),
            )
            done = 0
            async for chunk in self.engine.generate(req):
                if chunk.usage is not None:
                    done = chunk.usage.completion_tokens
            return done

        return sum(await asyncio.gather(*(one(i) for i in range(n))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument(
        "--prefix-caching",
        action="store_true",
        help="leave vLLM's prefix cache on (off by default: every case repeats one prompt, and "
        "the cache would serve (a)/(b) prefills that (c)'s per-spec salts must recompute)",
    )
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    ap.add_argument("--engine-path", action="store_true", help="add cases (f) and (g)")
    ap.add_argument("--skip-hf", action="store_true", help="leave out (d) and (e)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    root = Path(tempfile.mkdtemp(prefix="fs-bench-gen-"))
    hf, tok, sae, model_dir = build(root, dtype)
    hfc = HfCases(hf, tok, sae, args.new_tokens)
    loop = asyncio.new_event_loop()
    vc = None
    if not args.skip_vllm:
        from featuresteer_server.engines.hooked import HookedEngine
        from featuresteer_server.engines.vllm.engine import VllmEngine, VllmOptions
        from featuresteer_server.tokenization import Tokenizer

        tl = models.build_hooked(hf, tok, dtype)
        hooked = HookedEngine(
            tl, Tokenizer(tok), [sae], model_name="bench", weights_hash="bench", hf_model=hf
        )
        opts = VllmOptions(
            dtype=args.dtype,
            max_model_len=512,
            kv_cache_gib=2,
            enable_prefix_caching=args.prefix_caching,
        )
        engine = loop.run_until_complete(VllmEngine.create(hooked, model_dir, opts))
        vc = VllmCases(engine, hfc.ids, args.new_tokens)
    cases: dict[str, Any] = {}
    for n in args.concurrency:
        if vc is not None:
            for mode, label in (("a", "unsteered"), ("b", "one-spec"), ("c", "distinct-specs")):
                if mode == "c" and n == 1:
                    continue
                cases[f"vllm-{label}@{n}"] = lambda n=n, mode=mode: loop.run_until_complete(
                    vc.run(n, mode)
                )
            if args.engine_path:
                for steered, label in ((False, "unsteered"), (True, "distinct")):
                    cases[f"engine-{label}@{n}"] = lambda n=n, s=steered: loop.run_until_complete(
                        vc.via_engine(n, s)
                    )
        if args.skip_hf:
            continue
        cases[f"hf-serial@{n}"] = lambda n=n: hfc.serial(n)
        if n > 1:
            cases[f"hf-batched@{n}"] = lambda n=n: hfc.batched(n)
    for fn in cases.values():  # warm-up round, not timed
        fn()
    rates: dict[str, list[float]] = {k: [] for k in cases}
    loads: dict[str, list[str]] = {k: [] for k in cases}
    for r in range(args.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            tokens = fn()
            rates[name].append(tokens / (time.perf_counter() - t0))
            loads[name].append(loadavg().split("/")[0])
        print(f"round {r + 1}/{args.repeats} (load {loadavg()})", flush=True)
    threads = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")
    print("\n| case | concurrency | tokens/s median | min–max | dtype | threads | load (1 min) |")
    print("|---|---|---|---|---|---|---|")
    for name, xs in rates.items():
        label, n = name.split("@")
        th = f"torch {args.threads}" if label.startswith("hf") else f"bind {threads}"
        ld = "–".join(sorted(set(loads[name]), key=float)[:: max(1, len(set(loads[name])) - 1)])
        print(
            f"| {label} | {n} | {statistics.median(xs):.1f} | {min(xs):.1f}–{max(xs):.1f} "
            f"| {args.dtype} | {th} | {ld} |"
        )
    med = {k: statistics.median(v) for k, v in rates.items()}
    for n in args.concurrency:
        if args.engine_path and vc is not None:
            f, g = med[f"engine-unsteered@{n}"], med[f"engine-distinct@{n}"]
            a = med[f"vllm-unsteered@{n}"]
            ref = f" vs raw (c)/(a) = {med[f'vllm-distinct-specs@{n}'] / a:.3f}" if n > 1 else ""
            print(f"\nat {n}: engine path (g)/(f) = {g / f:.3f}{ref}, (f)/(a) = {f / a:.3f}")
        if vc is None or n == 1 or args.skip_hf:
            continue
        b, a = med[f"vllm-one-spec@{n}"], med[f"vllm-unsteered@{n}"]
        c, d = med[f"vllm-distinct-specs@{n}"], med[f"hf-serial@{n}"]
        print(
            f"\nat {n}: (b)/(a) = {b / a:.3f} (target ≥ 0.95), (c)/(b) = {c / b:.3f} "
            f"(target ≥ 0.9), (c)/(d) = {c / d:.2f} (target ≥ 5)"
        )
    if vc is not None:
        stats = loop.run_until_complete(vc.engine.stats())
        print(f"worker stats: {stats}")
        vc.engine.llm.shutdown()


if __name__ == "__main__":
    main()
