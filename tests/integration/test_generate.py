"""Generate through a real in-process gRPC server on the tiny random engine: streaming,
steering, validation statuses naming the field, and cancellation freeing the worker."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from featuresteer.v1 import featuresteer_pb2 as pb
from tests.support import ISSUE_PROMPTS

pytestmark = pytest.mark.integration
SAE = "tiny/res-topk-128/blocks.1.hook_resid_post@v1"
TC = "tiny/tc-96/blocks.0.ln2.hook_normalized@v1"
PROMPT = "Once upon a time, in a small village,"
IV = pb.Intervention


async def stream(stub, **kw) -> list[pb.GenerateResponse]:  # type: ignore[no-untyped-def]
    kw.setdefault("prompt", PROMPT)
    kw.setdefault("max_new_tokens", 8)
    return [c async for c in stub.Generate(pb.GenerateRequest(**kw))]


def ids(chunks: list[pb.GenerateResponse], baseline: bool = False) -> list[int]:
    return [c.token.id for c in chunks if c.HasField("token") and c.baseline == baseline]


async def test_generate_streams_tokens_then_a_final_chunk(stub) -> None:  # type: ignore[no-untyped-def]
    chunks = await stream(stub, logprobs=True, seed=3)
    assert len(ids(chunks)) == 8
    assert all(c.HasField("logprob") for c in chunks[:-1])
    final = chunks[-1]
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == 8 and final.usage.prompt_tokens > 0
    assert final.provenance.engine == "hooked" and final.provenance.seed == 3
    assert final.provenance.steering_spec_fingerprint == ""


async def test_steering_with_baseline_and_trace(stub) -> None:  # type: ignore[no-untyped-def]
    plain = ids(await stream(stub))
    chunks = await stream(
        stub,
        interventions=[
            IV(feature=pb.FeatureRef(dictionary_id=SAE, index=3), op=IV.OP_ADD, value=60.0),
            IV(
                feature=pb.FeatureRef(dictionary_id=TC, index=5),
                op=IV.OP_ABLATE,
                apply_to=IV.APPLY_TO_GENERATED,
            ),
        ],
        compare_baseline=True,
        trace=pb.TraceSpec(dictionary_id=SAE, top_k=3),
    )
    assert ids(chunks) != plain and ids(chunks, baseline=True) == plain
    assert all(len(c.trace) > 0 for c in chunks if c.HasField("token"))
    final = chunks[-1]
    assert final.baseline and final.provenance.steering_spec_fingerprint
    assert set(final.provenance.dictionary_fingerprints) == {SAE, TC}


@pytest.mark.parametrize(
    ("kw", "code", "field"),
    [
        (
            dict(interventions=[IV(feature=pb.FeatureRef(dictionary_id="nope"), op=IV.OP_ADD)]),
            grpc.StatusCode.NOT_FOUND,
            "interventions[0].feature.dictionary_id",
        ),
        (
            dict(
                interventions=[
                    IV(feature=pb.FeatureRef(dictionary_id=SAE, fingerprint="x"), op=IV.OP_ADD)
                ]
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "interventions[0].feature",
        ),
        (
            dict(
                interventions=[
                    IV(feature=pb.FeatureRef(dictionary_id=SAE, index=1), op=IV.OP_ADD),
                    IV(feature=pb.FeatureRef(dictionary_id=SAE, index=999), op=IV.OP_ADD),
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "interventions[1].feature.index",
        ),
        (
            dict(
                interventions=[
                    IV(
                        vector=pb.VectorTarget(hook_name="blocks.0.hook_resid_post", values=[1.0]),
                        op=IV.OP_ADD,
                    )
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "interventions[0].vector.values",
        ),
        (
            dict(
                interventions=[
                    IV(
                        feature=pb.FeatureRef(dictionary_id=SAE, index=1),
                        op=IV.OP_ADD,
                        value=float("inf"),
                    )
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "interventions[0].value",
        ),
        (
            dict(
                interventions=[
                    IV(
                        feature=pb.FeatureRef(dictionary_id=TC, index=1),
                        op=IV.OP_ADD,
                        when=pb.Condition(feature=pb.FeatureRef(dictionary_id=SAE, index=2)),
                    )
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "interventions[0].when",
        ),
        (dict(max_new_tokens=100_000), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (
            dict(interventions=[IV(feature=pb.FeatureRef(dictionary_id=SAE, index=1))]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "interventions[0].op",
        ),
    ],
)
async def test_validation_statuses_name_the_field(stub, kw, code, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stream(stub, **kw)
    assert err.value.code() == code
    assert err.value.details().startswith(field), err.value.details()


async def test_cancel_frees_the_worker(stub) -> None:  # type: ignore[no-untyped-def]
    call = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=500))
    got = 0
    async for _ in call:
        got += 1
        if got == 3:
            call.cancel()
            break
    assert got == 3
    chunks = await asyncio.wait_for(stream(stub, max_new_tokens=4), timeout=60)
    assert len(ids(chunks)) == 4 and chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH


async def test_deadline_exceeded_then_served(stub) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Generate(
            pb.GenerateRequest(prompt=PROMPT, max_new_tokens=500), timeout=0.5
        ):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    chunks = await asyncio.wait_for(stream(stub, max_new_tokens=4), timeout=60)
    assert len(ids(chunks)) == 4


async def test_poisoning_request_refused_and_others_unharmed(stub) -> None:  # type: ignore[no-untyped-def]
    """The hardening issue's repro on the hooked engine: a finite but absurd ADD (float32's
    max) is refused before any work, naming the field; other clients' greedy output is the
    same before and after (tests/e2e/test_vllm.py replays it on the vLLM engine)."""
    before = [ids(await stream(stub, prompt=p, max_new_tokens=4)) for p in ISSUE_PROMPTS]
    for value in (3.4028235e38, 1e20, -1e6):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stream(
                stub,
                prompt="The capital of France is",
                max_new_tokens=4,
                interventions=[
                    IV(feature=pb.FeatureRef(dictionary_id=SAE, index=5), op=IV.OP_ADD, value=value)
                ],
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (e.value.details() or "").startswith("interventions[0].value:")
    huge = pb.VectorTarget(hook_name="blocks.1.hook_resid_post", values=[1.7e38] * 64)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stream(stub, interventions=[IV(vector=huge, op=IV.OP_ADD, value=1.0)])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = [ids(await stream(stub, prompt=p, max_new_tokens=4)) for p in ISSUE_PROMPTS]
    assert after == before
