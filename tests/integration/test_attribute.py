"""Attribute / GetAttribution through a real server: jobs, progress, the graph against a
direct call of the attribution engine, ranking, limits and cancellation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer.v1 import featuresteer_pb2_grpc as pb_grpc
from featuresteer_server import convert, jobs
from featuresteer_server.attribution import AttributionCancelled, attribute
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


async def test_logit_ranking_honours_cancel(engine) -> None:  # type: ignore[no-untyped-def]
    cfg = load_config(port=0, metrics_enabled=False, catalog=None)
    target = engine.tokenizer.encode(" Paris", prepend_bos=False)[0]
    request = pb.AttributeRequest(
        prompt=PROMPT,
        mode=pb.ATTRIBUTION_MODE_LOGIT_RANKING,
        dictionary_id=SAE,
        target_token_ids=[target],
    )
    req = convert.attribute_request_from_pb(request, cfg.limits(), cfg.attribution_batch_size)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(AttributionCancelled):
        await engine.attribute(req, lambda stage, fraction: None, cancel)


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


@asynccontextmanager
async def own_server(engine, **cfg: Any) -> AsyncIterator[tuple[RunningServer, Any]]:  # type: ignore[no-untyped-def]
    config = load_config(port=0, metrics_enabled=False, catalog=None, **cfg)
    srv = await start_server(config, engine=engine)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            yield srv, pb_grpc.FeatureSteerStub(channel)
    finally:
        await srv.server.stop(0)


async def wait_state(stub, job_id: str, state: int, tries: int = 100) -> int:  # type: ignore[no-untyped-def]
    for _ in range(tries):
        got = (await stub.GetAttribution(pb.GetAttributionRequest(job_id=job_id))).state
        if got == state:
            break
        await asyncio.sleep(0.02)
    return int(got)


async def test_cancelling_a_queued_job_frees_its_slot_at_once(engine) -> None:  # type: ignore[no-untyped-def]
    """One job runs (held in its forward pass by the model lock), one is queued, the queue is
    full; the queued client cancels: a new submission is accepted while the first still
    runs (before: the slot stayed taken until the cancelled job reached the front)."""
    req = pb.AttributeRequest(prompt=PROMPT, max_feature_nodes=20)
    async with own_server(engine, max_queued_attributions=1) as (_, stub):
        engine.model_lock.acquire()
        try:
            running = stub.Attribute(req)
            head = await running.read()
            assert await wait_state(stub, head.job_id, pb.JOB_STATE_RUNNING) == (
                pb.JOB_STATE_RUNNING
            )
            queued = stub.Attribute(req)
            queued_head = await queued.read()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Attribute(req):
                    pass
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            queued.cancel()
            state = await wait_state(stub, queued_head.job_id, pb.JOB_STATE_CANCELLED)
            assert state == pb.JOB_STATE_CANCELLED
            third = stub.Attribute(req)
            third_head = await third.read()  # accepted
            assert third_head.job_id
            got = await stub.GetAttribution(pb.GetAttributionRequest(job_id=head.job_id))
            assert got.state == pb.JOB_STATE_RUNNING  # the first still holds its slot
        finally:
            engine.model_lock.release()
        for call in (running, third):
            last = await call.read()
            while (chunk := await call.read()) is not grpc.aio.EOF:
                last = chunk
            assert last.HasField("graph")


async def test_server_stop_cancels_detached_and_queued_jobs(tmp_path: Path) -> None:
    """RunningServer.stop cancels the jobs that outlive their RPCs (detached or queued), so
    the engine's shutdown does not wait for whole graphs."""
    own = tiny_engine(tmp_path, all_transcoders=True)  # stop() shuts its engine down
    config = load_config(port=0, metrics_enabled=False, catalog=None, max_queued_attributions=2)
    srv = await start_server(config, engine=own)
    req = pb.AttributeRequest(prompt=PROMPT, max_feature_nodes=20, detach=True)
    own.model_lock.acquire()  # the running job waits in its forward pass
    release = threading.Timer(0.3, own.model_lock.release)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = pb_grpc.FeatureSteerStub(channel)
            ids = [(await stub.Attribute(req).read()).job_id for _ in range(2)]
        jobs_ = [srv.state.jobs.get(i) for i in ids]
        assert [j.state for j in jobs_] == [jobs.RUNNING, jobs.QUEUED]
        release.start()  # (a thread: engine shutdown blocks the event loop while it waits)
        await srv.stop(grace=0)
        await asyncio.wait_for(asyncio.gather(*(j.task for j in jobs_)), 10)  # type: ignore[misc]
        assert [j.state for j in jobs_] == [jobs.CANCELLED, jobs.CANCELLED]
        assert jobs_[0].result is None
    finally:
        release.cancel()
        if own.model_lock.locked() and not release.is_alive():
            own.model_lock.release()


async def test_get_attribution_hides_internal_error_text(engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA error at /opt/secret/kernel.cu:42")

    monkeypatch.setattr(engine, "attribute", broken)
    async with own_server(engine) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for chunk in stub.Attribute(pb.AttributeRequest(prompt=PROMPT, detach=True)):
                job_id = chunk.job_id
        assert err.value.code() == grpc.StatusCode.INTERNAL
        got = await stub.GetAttribution(pb.GetAttributionRequest(job_id=job_id))
        assert got.state == pb.JOB_STATE_FAILED
        assert got.error.startswith("internal error (request id ")
        assert "secret" not in got.error and "RuntimeError" not in got.error


async def test_unknown_job(stub) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetAttribution(pb.GetAttributionRequest(job_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "job_id" in err.value.details()
