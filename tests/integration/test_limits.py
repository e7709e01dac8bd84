"""Bounded work through the real server (tiny model): oversized requests are refused before
parsing with RESOURCE_EXHAUSTED, undecodable bytes get INVALID_ARGUMENT (no traceback),
error messages stay short, and health checks and small requests keep answering within 2 s
while abusive requests are being refused (how long the event loop stalls under that abuse is
measured in benchmarks/bench_limits.py, not asserted here)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer.v1 import featuresteer_pb2_grpc as pb_grpc
from featuresteer_server import convert

pytestmark = pytest.mark.integration
SAE = "tiny/res-topk-128/blocks.1.hook_resid_post@v1"
TC = "tiny/tc-96/blocks.0.ln2.hook_normalized@v1"
SERVICE = "/featuresteer.v1.FeatureSteer/"
WORDS = "the quick brown fox jumps over a lazy dog while seven otters play the banjo. "


def _code(exc: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> grpc.StatusCode:
    return exc.value.code()


async def _stream_error(call) -> grpc.aio.AioRpcError:  # type: ignore[no-untyped-def]
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as err:
        return err
    raise AssertionError("the stream ended without an error")


async def test_oversized_requests_are_refused_before_parsing(server, stub) -> None:  # type: ignore[no-untyped-def]
    limits = convert.request_byte_limits(server.state.limits)
    # over DecodeFeatures' own limit, under the server's receive limit (Generate's)
    text = "a" * (limits["DecodeFeatures"] + 1)
    req = pb.DecodeFeaturesRequest(inputs=[pb.DecodeInput(text=text)], top_k=1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DecodeFeatures(req, timeout=10)
    assert _code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "DecodeFeatures" in err.value.details() and len(err.value.details()) < 200
    # a small method has a small limit: a 16 KB dictionary id never reaches NOT_FOUND
    ref = pb.FeatureRef(dictionary_id="d" * 16384, index=1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetFeature(pb.GetFeatureRequest(feature=ref), timeout=10)
    assert _code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED and len(err.value.details()) < 200
    # over every limit: gRPC's own receive limit refuses it
    big = pb.GenerateRequest(prompt="a" * (max(limits.values()) + 1))
    assert (await _stream_error(stub.Generate(big, timeout=10))).code() == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert (await stub.GetInfo(pb.GetInfoRequest(), timeout=5)).model.n_layers == 2


async def test_long_user_input_is_not_echoed(stub) -> None:  # type: ignore[no-untyped-def]
    huge = "d" * 16384  # within DecodeFeatures' byte limit: refused by the id bound instead
    req = pb.DecodeFeaturesRequest(
        inputs=[pb.DecodeInput(text="a")], top_k=1, dictionary_ids=[huge]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DecodeFeatures(req, timeout=10)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "dictionary_ids[0]" in err.value.details() and len(err.value.details()) < 300


async def test_undecodable_bytes_are_invalid_argument(server, caplog) -> None:  # type: ignore[no-untyped-def]
    garbage = [b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x02\xff\xfe"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        unary = [SERVICE + m for m in ("GetInfo", "Tokenize", "DecodeFeatures", "GetFeature")]
        unary.append("/grpc.health.v1.Health/Check")
        with caplog.at_level(logging.ERROR):
            for method in unary:
                call = channel.unary_unary(method)  # no serializers: raw bytes
                # GetInfoRequest has no fields: the invalid UTF-8 is an unknown field to it
                for raw in garbage[:2] if method.endswith("GetInfo") else garbage:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(raw, timeout=5)
                    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT, (method, raw)
            for method in ("Generate", "Attribute"):
                stream = channel.unary_stream(SERVICE + method)
                err2 = await _stream_error(stream(garbage[1], timeout=5))
                assert err2.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no tracebacks
        health = health_pb2_grpc.HealthStub(channel)
        ok = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert ok.status == health_pb2.HealthCheckResponse.SERVING


async def test_empty_dictionary_ids_decode_the_defaults(stub) -> None:  # type: ignore[no-untyped-def]
    res = await stub.DecodeFeatures(
        pb.DecodeFeaturesRequest(inputs=[pb.DecodeInput(text="Hello")], top_k=2), timeout=30
    )
    assert [r.dictionary_id for r in res.items[0].results] == [SAE]  # the SAE, not the TC


async def test_health_and_small_requests_answer_while_abuse_is_refused(server, stub) -> None:  # type: ignore[no-untyped-def]
    limits = server.state.limits
    near = (WORDS * (limits.max_text_bytes // len(WORDS) + 1))[: limits.max_text_bytes]
    abusive = [
        # multi-MiB messages: beyond the receive limit (the 8 MiB chat message of the issue
        # took 6.9 s of event loop to tokenize)
        lambda: stub.Generate(
            pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x" * (8 << 20))])
        ),
        lambda: stub.DecodeFeatures(
            pb.DecodeFeaturesRequest(inputs=[pb.DecodeInput(text="y" * (3 << 20))], top_k=1)
        ),
        lambda: stub.Generate(
            pb.GenerateRequest(
                prompt="a",
                interventions=[
                    pb.Intervention(
                        op=pb.Intervention.OP_ADD,
                        vector=pb.VectorTarget(
                            hook_name="blocks.0.hook_resid_post", values=[1.0] * 100_000
                        ),
                    )
                ],
            )
        ),
        # texts just within the byte limit, with far more tokens than allowed: tokenized (off
        # the event loop), then refused
        lambda: stub.Tokenize(pb.TokenizeRequest(text=near)),
        lambda: stub.Generate(pb.GenerateRequest(prompt=near)),
        lambda: stub.Generate(
            pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=near)])
        ),
        lambda: stub.DecodeFeatures(
            pb.DecodeFeaturesRequest(
                inputs=[pb.DecodeInput(text=near)] * limits.max_inputs, top_k=1
            )
        ),
        lambda: stub.Attribute(
            pb.AttributeRequest(prompt=near[: convert.attribute_prompt_bytes(limits)])
        ),
    ]
    codes: list[grpc.StatusCode] = []

    async def abuse(make) -> None:  # type: ignore[no-untyped-def]
        call = make()
        try:
            if hasattr(call, "__aiter__"):
                async for _ in call:
                    pass
            else:
                await call
        except grpc.aio.AioRpcError as err:
            codes.append(err.code())

    # the probes run in a thread with a blocking client, so their deadlines do not depend on
    # this event loop (the server's), and on their own connection
    stop = threading.Event()
    latencies: list[float] = []

    def probe() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            fs = pb_grpc.FeatureSteerStub(channel)
            while not stop.is_set() or len(latencies) < 3:
                t0 = time.perf_counter()
                ok = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                assert ok.status == health_pb2.HealthCheckResponse.SERVING
                assert fs.GetInfo(pb.GetInfoRequest(), timeout=2).model.n_layers == 2
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.02)

    prober = asyncio.create_task(asyncio.to_thread(probe))
    await asyncio.gather(*(abuse(make) for make in abusive))
    stop.set()
    await prober  # re-raises a probe's DEADLINE_EXCEEDED or failed assertion
    assert len(codes) == len(abusive)  # every abusive request was refused
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT}
    print(
        f"{len(latencies)} health+GetInfo probes during the abuse, slowest {max(latencies):.3f} s"
    )
