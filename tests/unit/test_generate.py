"""Hooked-engine generation on a tiny random Llama: parity with plain transformers, exact
no-op edits, streaming fields (logprobs, trace, baseline, stop), seeds and cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from featuresteer_server import domain
from featuresteer_server.domain import FeatureRef, FinishReason, Intervention, Op
from featuresteer_server.errors import InvalidArgument, NotFound
from tests.support import tiny_engine

pytestmark = pytest.mark.unit
SAE = "tiny/res-topk-128/blocks.1.hook_resid_post@v1"
TC = "tiny/tc-96/blocks.0.ln2.hook_normalized@v1"
PROMPT = "Once upon a time, in a small village,"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return tiny_engine(tmp_path_factory.mktemp("dicts"))


async def collect(engine: Any, **kw: Any) -> list[domain.GenerateChunk]:
    return [c async for c in engine.generate(domain.GenerateRequest(**kw))]


def gen(engine: Any, **kw: Any) -> list[domain.GenerateChunk]:
    kw.setdefault("prompt", PROMPT)
    kw.setdefault("max_new_tokens", 12)
    return asyncio.run(collect(engine, **kw))


def token_ids(chunks: list[domain.GenerateChunk], baseline: bool = False) -> list[int]:
    return [c.token.id for c in chunks if c.token is not None and c.baseline == baseline]


def hf_greedy(engine: Any, prompt_ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = engine.hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


def test_greedy_equals_plain_transformers(engine: Any) -> None:
    chunks = gen(engine)
    prompt_ids = engine.tokenizer.encode(PROMPT, True)
    assert token_ids(chunks) == hf_greedy(engine, prompt_ids, 12)
    final = chunks[-1]
    assert final.finish_reason is FinishReason.LENGTH
    assert final.usage == domain.Usage(len(prompt_ids), 12)
    assert final.provenance is not None and final.provenance.engine == "hooked"
    assert final.provenance.steering_spec_fingerprint == ""
    positions = [c.position for c in chunks if c.token is not None]
    assert positions == list(range(len(prompt_ids), len(prompt_ids) + 12))
    text = "".join(c.text for c in chunks)
    assert text == engine.tokenizer.decode(token_ids(chunks))


def _active_values(engine: Any, ids: list[int], dict_id: str) -> torch.Tensor:
    d = engine.dictionaries[dict_id]
    acts = engine.forward_cache([ids], {d.hook_name})[d.hook_name][0]
    return d.encode(acts)  # [pos, d_sae]


def test_no_op_edits_leave_greedy_output_unchanged(engine: Any) -> None:
    base = token_ids(gen(engine))
    prompt_ids = engine.tokenizer.encode(PROMPT, True)
    a = _active_values(engine, prompt_ids, SAE)
    never = int(((a == 0).all(0)).float().argmax())
    on = int(a[-1].argmax())
    tc_a = _active_values(engine, prompt_ids, TC)
    tc_on = int(tc_a[-1].argmax())
    p = len(prompt_ids) - 1
    for iv in (
        Intervention(op=Op.ABLATE, feature=FeatureRef(SAE, never)),
        Intervention(op=Op.ADD, value=0.0, feature=FeatureRef(SAE, on)),
        Intervention(op=Op.ADD, value=0.0, feature=FeatureRef(TC, tc_on), normalize=True),
        Intervention(
            op=Op.CLAMP, value=float(a[p, on]), feature=FeatureRef(SAE, on), positions=(p,)
        ),
        Intervention(
            op=Op.CLAMP, value=float(tc_a[p, tc_on]), feature=FeatureRef(TC, tc_on), positions=(p,)
        ),
        Intervention(op=Op.SCALE, value=1.0, feature=FeatureRef(SAE, on)),
    ):
        chunks = gen(engine, interventions=(iv,))
        assert token_ids(chunks) == base, iv
        assert chunks[-1].provenance.steering_spec_fingerprint  # type: ignore[union-attr]


def test_large_add_changes_output_and_baseline_is_unsteered(engine: Any) -> None:
    base = token_ids(gen(engine))
    iv = Intervention(op=Op.ADD, value=60.0, feature=FeatureRef(SAE, 3))
    chunks = gen(engine, interventions=(iv,), compare_baseline=True)
    steered, baseline = token_ids(chunks), token_ids(chunks, baseline=True)
    assert steered != base and baseline == base
    finals = [c for c in chunks if c.finish_reason is not None]
    assert [f.baseline for f in finals] == [False, True]
    assert finals[-1].provenance is not None and finals[0].provenance is None
    assert finals[-1].provenance.dictionary_fingerprints == {
        SAE: engine.dictionaries[SAE].fingerprint
    }


def test_generated_only_edit_keeps_the_first_token(engine: Any) -> None:
    base = token_ids(gen(engine))
    iv = Intervention(
        op=Op.ADD, value=60.0, feature=FeatureRef(SAE, 3), apply_to=domain.ApplyTo.GENERATED
    )
    got = token_ids(gen(engine, interventions=(iv,)))
    assert got[0] == base[0] and got != base


def test_logprobs_and_trace_match_teacher_forcing(engine: Any) -> None:
    chunks = gen(
        engine,
        max_new_tokens=6,
        logprobs=True,
        trace=domain.TraceSpec(dictionary_id=SAE, top_k=4, features=(FeatureRef(SAE, 7),)),
    )
    prompt_ids = engine.tokenizer.encode(PROMPT, True)
    toks = [c for c in chunks if c.token is not None]
    full = prompt_ids + [c.token.id for c in toks]  # type: ignore[union-attr]
    with torch.no_grad():
        logits = engine.hf_model(torch.tensor([full])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    acts = _active_values(engine, full, SAE)
    for c in toks:
        assert c.token is not None and c.logprob is not None
        assert abs(c.logprob - float(logp[c.position - 1, c.token.id])) < 1e-4
        top = dict(c.trace)
        want_v, want_i = acts[c.position].topk(4)
        for i, v in zip(want_i.tolist(), want_v.tolist(), strict=True):
            if v > 0:
                assert abs(top[i] - v) < 1e-4
        assert abs(top[7] - float(acts[c.position, 7])) < 1e-4


def test_trace_is_pre_edit(engine: Any) -> None:
    iv = Intervention(op=Op.ABLATE, feature=FeatureRef(SAE, 7))
    chunks = gen(
        engine,
        max_new_tokens=4,
        interventions=(iv,),
        trace=domain.TraceSpec(features=(FeatureRef(SAE, 7),)),
    )
    assert any(dict(c.trace).get(7, 0.0) > 0 for c in chunks if c.token is not None)


def test_sampling_is_reproducible_with_a_seed(engine: Any) -> None:
    kw = dict(temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.1, max_new_tokens=10)
    a = token_ids(gen(engine, seed=7, **kw))
    b = token_ids(gen(engine, seed=7, **kw))
    c = gen(engine, seed=8, **kw)
    assert a == b != token_ids(c)
    assert c[-1].provenance is not None and c[-1].provenance.seed == 8


def test_stop_strings_and_chat(engine: Any) -> None:
    base = gen(engine)
    text = "".join(c.text for c in base)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    chunks = gen(engine, stop=(stop,))
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert stop in "".join(c.text for c in chunks)
    chat = gen(engine, prompt=None, messages=(("user", "Hi there"),), max_new_tokens=3)
    ids = engine.tokenizer.apply_chat_template((("user", "Hi there"),))
    assert chat[-1].usage == domain.Usage(len(ids), 3)


def test_validation_before_any_work(engine: Any) -> None:
    with pytest.raises(NotFound, match=r"interventions\[0\]\.feature\.dictionary_id"):
        gen(engine, interventions=(Intervention(op=Op.ADD, feature=FeatureRef("x", 1)),))
    with pytest.raises(InvalidArgument, match=r"^max_new_tokens"):
        gen(engine, max_new_tokens=10_000)
    with pytest.raises(InvalidArgument, match=r"^trace\.features\[0\]\.dictionary_id"):
        gen(engine, trace=domain.TraceSpec(dictionary_id=SAE, features=(FeatureRef(TC, 1),)))


def test_cancel_frees_the_worker(engine: Any) -> None:
    forwards = []
    handle = engine.hf_model.register_forward_hook(lambda *a: forwards.append(1))

    async def main() -> tuple[int, list[int]]:
        stream = engine.generate(domain.GenerateRequest(prompt=PROMPT, max_new_tokens=400))
        got = 0
        async for _ in stream:
            got += 1
            if got == 2:
                break
        await stream.aclose()
        after = await asyncio.wait_for(collect(engine, prompt=PROMPT, max_new_tokens=5), timeout=60)
        return got, token_ids(after)

    try:
        got, after = asyncio.run(main())
    finally:
        handle.remove()
    assert got == 2 and len(after) == 5
    assert len(forwards) < 100  # the 400-token run stopped soon after the cancel
