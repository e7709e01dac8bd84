"""Attribute / GetAttribution through a real server: jobs, progress, the graph against a
direct call of the attribution engine, ranking, limits and cancellation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer.v1 import featuresteer_pb2_grpc as pb_grpc
from featuresteer_server.attribution import attribute
from featuresteer_server.config import load_config
from featuresteer_server.server import RunningServer, start_server
from tests.support import tiny_engine

pytestmark = pytest.mark.integration
PROMPT = "The capital of France is"
SAE = "tiny/res-topk-128/blocks.1.hook_resid_post@v1"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return tiny_engine(Path(tmp_path_factory.mktemp("attr")), all_transcoders=True)


@pytest_asyncio.fixture
async def server(engine) -> AsyncIterator[RunningServer]:  # type: ignore[no-untyped-def]
    cfg = load_config(
        port=0,
        metrics_enabled=False,
        catalog=None,
        max_queued_attributions=0,
        max_feature_nodes=100,
    )
    srv = await start_server(cfg, engine=engine)
    yield srv
    await srv.server.stop(0)


@pytest_asyncio.fixture
async def stub(server: RunningServer) -> AsyncIterator[pb_grpc.FeatureSteerStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.FeatureSteerStub(channel)


async def test_graph_stream_matches_the_engine_and_is_kept(stub, engine) -> None:  # type: ignore[no-untyped-def]
    req = pb.AttributeRequest(prompt=PROMPT, max_feature_nodes=50, max_logit_targets=3)
    chunks = [c async for c in stub.Attribute(req)]
    job_id = chunks[0].job_id
    assert job_id and not chunks[0].HasField("graph")
    stages = [c.progress.stage for c in chunks[1:-1]]
    assert stages and all(c.job_id == job_id for c in chunks)
    graph = chunks[-1].graph
    ids = engine.tokenizer.encode(PROMPT)
    ref = attribute(
        engine.model,
        engine.transcoder_set(),
        ids,
        max_feature_nodes=50,
        max_logit_targets=3,
        keep_raw=False,
    )
    assert len(graph.nodes) == len(ref.nodes) and len(graph.edges) == len(ref.edges)
    kinds = {pb.Node.KIND_EMBEDDING, pb.Node.KIND_FEATURE, pb.Node.KIND_ERROR, pb.Node.KIND_LOGIT}
    assert {n.kind for n in graph.nodes} == kinds
    for got, want in zip(graph.nodes, ref.nodes, strict=True):
        assert (got.layer, got.position) == (want.layer, want.position)
        assert got.influence == pytest.approx(want.influence, rel=1e-4, abs=1e-6)
        if got.kind == pb.Node.KIND_FEATURE:
            assert got.feature.index == want.feature
            tc = engine.transcoder_set()[want.layer]
            assert (got.feature.dictionary_id, got.feature.fingerprint) == (tc.id, tc.fingerprint)
        if got.kind == pb.Node.KIND_LOGIT:
            assert got.probability == pytest.approx(want.probability, abs=1e-5)
    for got, want in zip(graph.edges, ref.edges, strict=True):
        assert (got.source, got.target) == (want.source, want.target)
        assert got.weight == pytest.approx(want.weight, rel=1e-4, abs=1e-6)
    assert 0 < graph.scores.completeness <= 1 and 0 < graph.scores.replacement <= 1
    assert chunks[-1].provenance.engine == "hooked"
    kept = await stub.GetAttribution(pb.GetAttributionRequest(job_id=job_id))
    assert kept.state == pb.JOB_STATE_DONE and kept.graph == graph


async def test_logit_ranking(stub, engine) -> None:  # type: ignore[no-untyped-def]
    target = engine.tokenizer.encode(" Paris", prepend_bos=False)[0]
    req = pb.AttributeRequest(
        prompt=PROMPT,
        mode=pb.ATTRIBUTION_MODE_LOGIT_RANKING,
        dictionary_id=SAE,
        target_token_ids=[target],
    )
    chunks = [c async for c in stub.Attribute(req)]
    ranking = chunks[-1].ranking
    assert ranking and all(r.feature.dictionary_id == SAE for r in ranking)
    values = [abs(r.attribution) for r in ranking]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize(
    ("req", "code", "needle"),
    [
        (pb.AttributeRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (
            pb.AttributeRequest(prompt="x", max_feature_nodes=10_000),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_feature_nodes",
        ),
        (
            pb.AttributeRequest(prompt="x", node_threshold=1.5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "node_threshold",
        ),
        (
            pb.AttributeRequest(prompt="x", mode=pb.ATTRIBUTION_MODE_LOGIT_RANKING),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dictionary_id",
        ),
        (pb.AttributeRequest(prompt="word " * 80), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (
            pb.AttributeRequest(prompt="x", target_token_ids=[10**7]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "target_token_ids[0]",
        ),
    ],
)
async def test_bad_requests(stub, req, code, needle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Attribute(req):
            pass
    assert err.value.code() == code and needle in err.value.details()


async def test_queue_full_is_resource_exhausted_and_cancel_frees_the_job(stub) -> None:  # type: ignore[no-untyped-def]
    slow = pb.AttributeRequest(prompt=PROMPT * 4, max_feature_nodes=100, batch_size=1)
    first = stub.Attribute(slow)
    head = await first.read()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Attribute(slow):
            pass
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    first.cancel()
    for _ in range(200):  # the cancelled job stops between backward batches
        state = (await stub.GetAttribution(pb.GetAttributionRequest(job_id=head.job_id))).state
        if state == pb.JOB_STATE_CANCELLED:
            break
        import asyncio

        await asyncio.sleep(0.05)
    assert state == pb.JOB_STATE_CANCELLED
    chunks = [
        c async for c in stub.Attribute(pb.AttributeRequest(prompt=PROMPT, max_feature_nodes=20))
    ]
    assert chunks[-1].HasField("graph")


async def test_unknown_job(stub) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetAttribution(pb.GetAttributionRequest(job_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "job_id" in err.value.details()
