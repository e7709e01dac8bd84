"""GPU check (no vLLM, no network): the intervention math, the hooked engine's edit path and the
HF generation baselines on CUDA, with a randomly initialised model of SmolLM2-135M's config and
random dictionaries of the default catalog's shapes. Writes a JSON + markdown results file.

    PYTHONPATH=service python -m benchmarks.gpu_check --device cuda --out gpu_results  # GPU box
    .venv/bin/python -m benchmarks.gpu_check --device cpu --quick   # dry run here (installed)

Checks (each recorded pass/fail with its number):
    math      ``interventions.apply`` on [n, d] rows: ADD/SCALE/CLAMP/ABLATE/vector edits equal
              x + δ computed by hand within 1e-5 (float32); no-op edits are bit-exact; CUDA
              agrees with the CPU result within 1e-5.
    hooked    ``generation.HookSession`` on the HF Llama: the edited resid_post equals x + s·d_i
              within 1e-5; ABLATE of an inactive feature / ADD 0 leave greedy tokens unchanged.
    baseline  tokens/s of (d) serial HF generate + steering hook and (e) batched HF generate
              with one shared hook, at 1 and 16 requests, float32 and bfloat16, ≥5 repeats.
Needs torch and transformers; the service package is imported from the repository checkout
(``PYTHONPATH=service``, as ``gpu_check.sh`` sets) where it is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

try:  # errors.py maps exceptions to grpc codes; the GPU box may lack grpcio
    import grpc  # noqa: F401
except ImportError:
    import types

    class _Codes:
        def __getattr__(self, name: str) -> str:
            return name

    _stub = types.ModuleType("grpc")
    _stub.StatusCode = _Codes()  # type: ignore[attr-defined]
    sys.modules["grpc"] = _stub

from featuresteer_server import domain, generation, interventions  # noqa: E402
from featuresteer_server.dictionaries import load_dictionary, write_dictionary  # noqa: E402

SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
D = 576
SAE_HOOK = "blocks.12.hook_resid_post"


def dictionaries(root: Path, device: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)

    def w(d_in: int, d_sae: int) -> dict[str, torch.Tensor]:
        return {
            "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
            "b_enc": torch.randn(d_sae, generator=g) * 0.1,
            "W_dec": torch.randn(d_sae, d_in, generator=g) / d_sae**0.5,
            "b_dec": torch.randn(d_in, generator=g) * 0.1,
        }

    sae = load_dictionary(
        write_dictionary(root / "sae", w(D, 4608), architecture="topk", hook_name=SAE_HOOK,
                         model_name="rand", k=64),
        dictionary_id="rand/sae@v1",
    )  # fmt: skip
    tc = load_dictionary(
        write_dictionary(root / "tc", w(D, 4608), architecture="transcoder",
                         hook_name="blocks.5.ln2.hook_normalized",
                         hook_name_out="blocks.5.hook_mlp_out", model_name="rand"),
        dictionary_id="rand/tc@v1",
    )  # fmt: skip
    return {sae.id: sae.to(device), tc.id: tc.to(device)}


def check_math(dicts: dict[str, Any], device: str, results: list[dict]) -> None:
    hooks = interventions.steerable_hooks(30)
    sae, tc = dicts["rand/sae@v1"], dicts["rand/tc@v1"]
    g = torch.Generator().manual_seed(1)
    n = 64
    x = (torch.randn(n, D, generator=g) * 3).to(device)
    pos = torch.arange(n, device=device)
    special = pos == 0
    a = sae.encode(x)
    active = int(a[1].argmax())
    inactive = int((a == 0).all(0).nonzero()[0])
    vec = torch.randn(D, generator=g)

    def run(items: tuple, hook: str, xx: torch.Tensor, captured: dict | None = None) -> Any:
        spec = interventions.compile_steering(items, dicts, hook_names=hooks, d_model=D)
        return interventions.apply(
            spec.to(device), hook, xx, positions=pos, prompt_len=n, special=special,
            captured=captured or {},
        )  # fmt: skip

    ref = domain.FeatureRef(sae.id, active)
    d_i = sae.decoder_direction(active)
    cases = {
        "add": ((domain.Intervention(domain.Op.ADD, 5.0, feature=ref),), x + 5.0 * d_i),
        "clamp": (
            (domain.Intervention(domain.Op.CLAMP, 2.0, feature=ref),),
            x + (2.0 - a[:, active]).unsqueeze(-1) * d_i,
        ),
        "scale": (
            (domain.Intervention(domain.Op.SCALE, 3.0, feature=ref),),
            x + (2.0 * a[:, active]).unsqueeze(-1) * d_i,
        ),
        "ablate": (
            (domain.Intervention(domain.Op.ABLATE, 0.0, feature=ref),),
            x - a[:, active].unsqueeze(-1) * d_i,
        ),
    }
    vu = (vec / vec.norm()).to(device)
    cases["vector_ablate"] = (
        (domain.Intervention(domain.Op.ABLATE, 0.0,
                             vector=domain.VectorTarget(SAE_HOOK, tuple(vec.tolist()))),),
        x - (x @ vu).unsqueeze(-1) * vu,
    )  # fmt: skip
    for name, (items, want) in cases.items():
        want = torch.where(special.unsqueeze(-1), x, want)
        got = run(items, SAE_HOOK, x)
        err = (got - want).abs().max().item()
        results.append({"check": f"math.{name}", "max_abs_err": err, "ok": err < 1e-5})
    noops = {
        "ablate_inactive": domain.Intervention(
            domain.Op.ABLATE, 0.0, feature=domain.FeatureRef(sae.id, inactive)
        ),
        "add_zero": domain.Intervention(domain.Op.ADD, 0.0, feature=ref),
    }
    for name, iv in noops.items():
        got = run((iv,), SAE_HOOK, x)
        results.append({"check": f"math.noop.{name}", "ok": bool(torch.equal(got, x))})
    # transcoder: read at ln2.hook_normalized, edit at hook_mlp_out
    xin = torch.randn(n, D, generator=g).to(device)
    mlp_out = torch.randn(n, D, generator=g).to(device)
    t_ref = domain.FeatureRef(tc.id, int(tc.encode(xin)[1].argmax()))
    got = run(
        (domain.Intervention(domain.Op.CLAMP, 1.5, feature=t_ref),), "blocks.5.hook_mlp_out",
        mlp_out, {"blocks.5.ln2.hook_normalized": xin},
    )  # fmt: skip
    at = tc.encode(xin)[:, t_ref.index]
    want = mlp_out + (1.5 - at).unsqueeze(-1) * tc.decoder_direction(t_ref.index)
    want = torch.where(special.unsqueeze(-1), mlp_out, want)
    err = (got - want).abs().max().item()
    results.append({"check": "math.transcoder_clamp", "max_abs_err": err, "ok": err < 1e-5})
    if device != "cpu":  # device vs CPU
        cpu_dicts = {k: v.to("cpu") for k, v in dicts.items()}
        spec = interventions.compile_steering(
            cases["clamp"][0], cpu_dicts, hook_names=hooks, d_model=D
        )
        cpu = interventions.apply(
            spec, SAE_HOOK, x.cpu(), positions=pos.cpu(), prompt_len=n, special=special.cpu(),
            captured={},
        )  # fmt: skip
        gpu = run(cases["clamp"][0], SAE_HOOK, x).cpu()
        err = (cpu - gpu).abs().max().item()
        results.append({"check": "math.device_vs_cpu", "max_abs_err": err, "ok": err < 1e-5})
        for d in dicts.values():
            d.to(device)


def random_model(device: str, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, **SMOLLM2)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def check_hooked(model: Any, dicts: dict[str, Any], device: str, results: list[dict]) -> None:
    sae = dicts["rand/sae@v1"]
    ids = [1, *torch.randint(3, 49152, (23,), generator=torch.Generator().manual_seed(2)).tolist()]
    hooks = interventions.steerable_hooks(30)
    items = (domain.Intervention(domain.Op.ADD, 4.0, feature=domain.FeatureRef(sae.id, 9)),)
    spec = interventions.compile_steering(items, dicts, hook_names=hooks, d_model=D)
    seen: dict[str, torch.Tensor] = {}
    layer = model.model.layers[12]
    pre_h = layer.register_forward_hook(
        lambda m, a, o: seen.__setitem__("pre", (o[0] if isinstance(o, tuple) else o).clone())
    )
    session = generation.HookSession(model, spec, prompt_len=len(ids), special_ids=frozenset({1}))
    with session, torch.inference_mode():
        post_h = layer.register_forward_hook(  # registered after the session's: sees the edit
            lambda m, a, o: seen.__setitem__("post", (o[0] if isinstance(o, tuple) else o).clone())
        )
        model(torch.tensor([ids], device=device))
        post_h.remove()
    pre_h.remove()
    x, x2 = seen["pre"][0].float(), seen["post"][0].float()
    want = x + 4.0 * sae.decoder_direction(9)
    want[0] = x[0]
    err = (x2 - want).abs().max().item()
    results.append({"check": "hooked.edited_resid_post", "max_abs_err": err, "ok": err < 1e-5})

    def greedy(spec_: Any) -> list[int]:
        s = generation.HookSession(model, spec_, prompt_len=len(ids), special_ids=frozenset({1}))
        with s, torch.inference_mode():
            out = model.generate(
                torch.tensor([ids], device=device), max_new_tokens=16, do_sample=False,
                pad_token_id=2,
            )  # fmt: skip
        return out[0, len(ids) :].tolist()

    plain = greedy(interventions.SteeringSpec())
    a = sae.encode(x)
    inactive = int((a == 0).all(0).nonzero()[0])
    for name, iv in {
        "ablate_inactive": domain.Intervention(
            domain.Op.ABLATE, 0.0, feature=domain.FeatureRef(sae.id, inactive)
        ),
        "add_zero": domain.Intervention(domain.Op.ADD, 0.0, feature=domain.FeatureRef(sae.id, 9)),
    }.items():
        s = interventions.compile_steering((iv,), dicts, hook_names=hooks, d_model=D)
        results.append({"check": f"hooked.noop_greedy.{name}", "ok": greedy(s) == plain})


def baselines(
    device: str, dtypes: list[str], repeats: int, n_new: int, dicts: dict[str, Any]
) -> list[dict]:
    rows = []
    sae = dicts["rand/sae@v1"]
    ids = [1, *torch.randint(3, 49152, (20,), generator=torch.Generator().manual_seed(3)).tolist()]
    spec = interventions.compile_steering(
        (domain.Intervention(domain.Op.ADD, 4.0, feature=domain.FeatureRef(sae.id, 0)),),
        dicts, hook_names=interventions.steerable_hooks(30), d_model=D,
    )  # fmt: skip
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for dt in dtypes:
        model = random_model(device, getattr(torch, dt))
        d_i = sae.decoder_direction(0).to(model.dtype)

        def serial(n: int, model: Any = model) -> int:
            for _ in range(n):
                s = generation.HookSession(model, spec, prompt_len=len(ids),
                                           special_ids=frozenset({1}))  # fmt: skip
                with s, torch.inference_mode():
                    model.generate(
                        torch.tensor([ids], device=device),
                        max_new_tokens=n_new,
                        min_new_tokens=n_new,
                        do_sample=False,
                        pad_token_id=2,
                    )
            return n * n_new

        def batched(n: int, model: Any = model, d_i: torch.Tensor = d_i) -> int:
            def hook(m: Any, a: Any, o: Any) -> Any:
                h = (o[0] if isinstance(o, tuple) else o) + 4.0 * d_i
                return (h, *o[1:]) if isinstance(o, tuple) else h

            handle = model.model.layers[12].register_forward_hook(hook)
            try:
                t = torch.tensor([ids] * n, device=device)
                with torch.inference_mode():
                    model.generate(
                        t,
                        attention_mask=torch.ones_like(t),
                        max_new_tokens=n_new,
                        min_new_tokens=n_new,
                        do_sample=False,
                        pad_token_id=2,
                    )
            finally:
                handle.remove()
            return n * n_new

        cases = {("hf-serial", 1): lambda: serial(1), ("hf-serial", 16): lambda: serial(16),
                 ("hf-batched", 16): lambda: batched(16)}  # fmt: skip
        for fn in cases.values():
            fn()  # warm-up
        rates: dict[Any, list[float]] = {k: [] for k in cases}
        for _ in range(repeats):
            for k, fn in cases.items():
                sync()
                t0 = time.perf_counter()
                tok = fn()
                sync()
                rates[k].append(tok / (time.perf_counter() - t0))
        for (name, n), xs in rates.items():
            rows.append({"case": name, "concurrency": n, "dtype": dt,
                         "median": statistics.median(xs), "min": min(xs), "max": max(xs),
                         "repeats": repeats})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="gpu_results")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="CPU dry run: float32, few tokens")
    args = ap.parse_args()
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "device": args.device, "cuda": torch.version.cuda, "host": platform.node(),
           "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "",
           "threads": torch.get_num_threads()}  # fmt: skip
    results: list[dict] = []
    dicts = dictionaries(Path(tempfile.mkdtemp(prefix="fs-gpu-")), args.device)
    check_math(dicts, args.device, results)
    rows: list[dict] = []
    try:
        import transformers  # noqa: F401

        model = random_model(args.device, torch.float32)
        check_hooked(model, dicts, args.device, results)
        del model
        dtypes = ["float32"] if args.quick else ["float32", "bfloat16"]
        n_new = 8 if args.quick else args.new_tokens
        repeats = 1 if args.quick else args.repeats
        rows = baselines(args.device, dtypes, repeats, n_new, dicts)
    except ImportError as exc:
        results.append({"check": "transformers", "ok": False, "error": str(exc)})
    report = {"env": env, "checks": results, "baselines": rows, "seconds": time.time() - t0}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    lines = [f"# GPU check on {env['gpu'] or args.device} (torch {env['torch']})", "",
             "| check | ok | max abs err |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {r['check']} | {r['ok']} | {r.get('max_abs_err', '')} |" for r in results]
    lines += [
        "",
        "| case | concurrency | dtype | tokens/s median | min–max |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['case']} | {r['concurrency']} | {r['dtype']} | {r['median']:.1f} | "
              f"{r['min']:.1f}–{r['max']:.1f} |" for r in rows]  # fmt: skip
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\n{sum(r['ok'] for r in results)}/{len(results)} checks ok in {time.time() - t0:.0f}s")
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
