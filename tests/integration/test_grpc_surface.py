"""The whole gRPC surface through a real server and real stubs (tiny random model)."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from featuresteer.v1 import featuresteer_pb2 as pb

pytestmark = pytest.mark.integration
SAE = "tiny/res-topk-128/blocks.1.hook_resid_post@v1"
TC = "tiny/tc-96/blocks.0.ln2.hook_normalized@v1"


async def test_info_and_dictionaries(stub) -> None:  # type: ignore[no-untyped-def]
    info = await stub.GetInfo(pb.GetInfoRequest())
    assert info.model.n_layers == 2 and info.model.d_model == 64 and info.model.d_vocab == 49152
    assert "blocks.1.hook_resid_post" in info.model.hook_names
    assert list(info.engines) == ["hooked"] and info.limits.max_top_k == 16
    listed = await stub.ListDictionaries(pb.ListDictionariesRequest())
    by_id = {d.id: d for d in listed.dictionaries}
    assert set(by_id) == {SAE, TC}
    assert (
        by_id[TC].hook_name_out == "blocks.0.hook_mlp_out"
        and by_id[TC].architecture == "transcoder"
    )
    assert by_id[SAE].k == 8 and not by_id[SAE].HasField("fvu")


async def test_tokenize(stub) -> None:  # type: ignore[no-untyped-def]
    text = "naïve café"
    res = await stub.Tokenize(pb.TokenizeRequest(text=text))
    assert res.tokens[0].id == 1 and res.tokens[0].special
    data = text.encode()
    assert b"".join(t.bytes for t in res.tokens[1:]) == data
    assert all(data[t.start : t.end] == t.bytes for t in res.tokens[1:])
    no_bos = await stub.Tokenize(pb.TokenizeRequest(text=text, prepend_bos=False))
    assert [t.id for t in no_bos.tokens] == [t.id for t in res.tokens[1:]]


async def test_decode_roundtrip(stub, tiny) -> None:  # type: ignore[no-untyped-def]
    fp = tiny.dictionaries[SAE].fingerprint
    req = pb.DecodeFeaturesRequest(
        inputs=[pb.DecodeInput(text="Hello there"), pb.DecodeInput(token_ids=[1, 2, 3, 4])],
        dictionary_ids=[SAE, TC],
        top_k=4,
        include_error=True,
        features=[pb.FeatureRef(dictionary_id=SAE, index=7, fingerprint=fp)],
    )
    res = await stub.DecodeFeatures(req)
    assert len(res.items) == 2
    assert [t.id for t in res.items[1].tokens] == [1, 2, 3, 4]
    r0 = res.items[0].results[0]
    assert r0.dictionary_id == SAE and len(r0.positions) == len(res.items[0].tokens)
    assert all(len(p.top) <= 4 and p.error_norm > 0 for p in r0.positions)
    assert all([s.index for s in p.selected] == [7] for p in r0.positions)
    assert res.provenance.engine == "hooked" and res.provenance.dictionary_fingerprints[SAE] == fp


@pytest.mark.parametrize(
    ("request_", "code", "needle"),
    [
        (
            pb.DecodeFeaturesRequest(inputs=[pb.DecodeInput(text="a")], top_k=99),
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_k",
        ),
        (
            pb.DecodeFeaturesRequest(inputs=[pb.DecodeInput(text="a")] * 5, top_k=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs",
        ),
        (
            pb.DecodeFeaturesRequest(inputs=[pb.DecodeInput(token_ids=[5, 999999])], top_k=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs[0].token_ids[1]",
        ),
        (
            pb.DecodeFeaturesRequest(
                inputs=[pb.DecodeInput(text="a")], top_k=1, dictionary_ids=["missing@v1"]
            ),
            grpc.StatusCode.NOT_FOUND,
            "dictionary_ids[0]",
        ),
        (
            pb.DecodeFeaturesRequest(
                inputs=[pb.DecodeInput(text="a")],
                features=[pb.FeatureRef(dictionary_id=SAE, index=3, fingerprint="stale")],
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "fingerprint",
        ),
        (
            pb.DecodeFeaturesRequest(
                inputs=[pb.DecodeInput(text="a")],
                features=[pb.FeatureRef(dictionary_id=SAE, index=100000)],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "features[0].index",
        ),
    ],
)
async def test_bad_input_gets_named_status_and_server_keeps_serving(
    stub,
    request_,
    code,
    needle,  # type: ignore[no-untyped-def]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DecodeFeatures(request_)
    assert err.value.code() == code
    assert needle in err.value.details()
    ok = await stub.Tokenize(pb.TokenizeRequest(text="still serving"))
    assert len(ok.tokens) > 1


async def test_get_feature_is_served(stub) -> None:  # type: ignore[no-untyped-def]
    # details in tests/integration/test_feature_catalog.py
    res = await stub.GetFeature(pb.GetFeatureRequest(feature=pb.FeatureRef(dictionary_id=SAE)))
    assert res.feature.dictionary_id == SAE and len(res.top_logits) == 10


async def test_concurrent_requests_are_not_mixed(stub) -> None:  # type: ignore[no-untyped-def]
    texts = [f"request number {i} says {'la ' * i}" for i in range(8)]

    def req(t: str) -> pb.DecodeFeaturesRequest:
        return pb.DecodeFeaturesRequest(
            inputs=[pb.DecodeInput(text=t)], dictionary_ids=[SAE], top_k=3
        )

    alone = [await stub.DecodeFeatures(req(t)) for t in texts]
    together = await asyncio.gather(*(stub.DecodeFeatures(req(t)) for t in texts))
    for a, b in zip(alone, together, strict=True):
        assert a.items == b.items


async def test_health_reflection_and_metrics(server, stub) -> None:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "featuresteer.v1.FeatureSteer"):
            res = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert res.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def ask():  # type: ignore[no-untyped-def]
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = []
        async for r in refl.ServerReflectionInfo(ask()):
            names = [s.name for s in r.list_services_response.service]
        assert "featuresteer.v1.FeatureSteer" in names and "grpc.health.v1.Health" in names
    await stub.Tokenize(pb.TokenizeRequest(text="count me"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.DecodeFeatures(pb.DecodeFeaturesRequest())
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    assert 'featuresteer_requests_total{code="OK",method="Tokenize"}' in body
    assert 'featuresteer_requests_total{code="INVALID_ARGUMENT",method="DecodeFeatures"}' in body
    assert "featuresteer_ready 1.0" in body


async def test_drain_sets_not_serving(tiny) -> None:  # type: ignore[no-untyped-def]
    from featuresteer_server.config import load_config
    from featuresteer_server.server import start_server

    srv = await start_server(load_config(port=0, metrics_enabled=False, catalog=None), engine=tiny)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        srv.state.draining = True
        await srv.health.enter_graceful_shutdown()
        res = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert res.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc_stub(ch).GetInfo(pb.GetInfoRequest())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    await srv.server.stop(0)


def pb_grpc_stub(ch):  # type: ignore[no-untyped-def]
    from featuresteer.v1 import featuresteer_pb2_grpc

    return featuresteer_pb2_grpc.FeatureSteerStub(ch)


async def test_graph_needs_a_transcoder_per_layer(stub) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Attribute(pb.AttributeRequest(prompt="The capital of France is")):
            pass
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "layers [1]" in err.value.details()
