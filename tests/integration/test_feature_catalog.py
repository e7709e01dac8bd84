"""GetFeature / SearchFeatures through a real in-process gRPC server and a real Redis server:
namespaced keys with TTLs, Redis hits, the LRU fallback while Redis is down, hits again after
it restarts, and no shared entries between dictionary versions."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer.v1 import featuresteer_pb2_grpc as pb_grpc
from featuresteer_server.cache import unwrap, wrap
from featuresteer_server.config import load_config
from featuresteer_server.dictionaries import load_dictionary
from featuresteer_server.engines.hooked import HookedEngine
from featuresteer_server.server import start_server
from tests.feature_metadata import write_features_npz
from tests.redis_server import RedisServer
from tests.support import TINY, tiny_engine, write_random_dictionary

pytestmark = [pytest.mark.integration, pytest.mark.redis]

SAE = "tiny/res-topk-128/blocks.1.hook_resid_post@v1"
TC = "tiny/tc-96/blocks.0.ln2.hook_normalized@v1"
PREFIX = "featuresteer:v2"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> HookedEngine:
    root = Path(tmp_path_factory.mktemp("catalog-int"))
    eng = tiny_engine(root)
    # synthetic metadata beside the SAE's weights (the catalog's fallback location)
    write_features_npz(
        root / "sae" / "features.npz",
        128,
        seed=5,
        labels={11: "fires on [' catalog']; promotes [' cache']"},
    )
    return eng


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The run's Redis (tests/run.sh exports it), else one started here."""
    url = os.environ.get("FEATURESTEER_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


def clear(url: str, *fingerprints: str) -> None:
    """Delete this test's keys (the tiny dictionaries' fingerprints are deterministic), and
    those of searches over every dictionary (``all-<hash>``), so reruns start cold."""
    r = redis.Redis.from_url(url)
    for fp in (*fingerprints, "all-*"):
        for key in r.scan_iter(f"{PREFIX}:*:{fp}:*"):
            r.delete(key)
    r.close()


def cache_events(srv: Any) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for metric in srv.metrics.registry.collect():
        for s in metric.samples:
            if s.name == "featuresteer_cache_events_total":
                out[(s.labels["layer"], s.labels["event"])] = s.value
    return out


@asynccontextmanager
async def serving(engine: HookedEngine, **cfg: Any) -> AsyncIterator[tuple[Any, Any]]:
    config = load_config(port=0, metrics_enabled=False, catalog=None, **cfg)
    srv = await start_server(config, engine=engine)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            yield srv, pb_grpc.FeatureSteerStub(channel)
    finally:  # not srv.stop(): that would shut the shared engine down
        srv.state.draining = True
        await srv.server.stop(0)
        await srv.state.cache.close()


def ref(dictionary_id: str, index: int, fingerprint: str | None = None) -> pb.FeatureRef:
    out = pb.FeatureRef(dictionary_id=dictionary_id, index=index)
    if fingerprint is not None:
        out.fingerprint = fingerprint
    return out


async def test_get_feature_writes_namespaced_keys_with_ttl_then_hits_redis(
    engine: HookedEngine, redis_url: str
) -> None:
    fp = engine.dictionaries[SAE].fingerprint
    clear(redis_url, fp)
    async with serving(engine, redis_url=redis_url, cache_ttl_seconds=120) as (srv, stub):
        first = await stub.GetFeature(pb.GetFeatureRequest(feature=ref(SAE, 11)))
        assert first.label.startswith("fires on [' catalog']")
        assert first.feature.fingerprint == fp and len(first.top_examples) > 0
        r = redis.Redis.from_url(redis_url)
        key = f"{PREFIX}:feature:{fp}:11"
        assert r.exists(key)
        assert 0 < r.ttl(key) <= 120
        assert pb.GetFeatureResponse.FromString(unwrap(key, r.get(key))) == first
        assert cache_events(srv) == {("redis", "miss"): 1}

        second = await stub.GetFeature(pb.GetFeatureRequest(feature=ref(SAE, 11, fp)))
        assert second == first
        ev = cache_events(srv)
        assert ev[("redis", "hit")] == 1 and srv.state.cache.computations == 1

        # search responses are cached the same way
        res = await stub.SearchFeatures(pb.SearchFeaturesRequest(query="catalog", limit=5))
        assert res.features[0].feature.index == 11 and res.features[0].label.startswith("fires")
        keys = [k.decode() for k in r.scan_iter(f"{PREFIX}:search-text:*")]
        assert keys and all(r.ttl(k) > 0 for k in keys)
        tok = await stub.SearchFeatures(
            pb.SearchFeaturesRequest(token_id=42, dictionary_id=SAE, limit=3)
        )
        assert len(tok.features) == 3
        assert r.ttl(f"{PREFIX}:search-token:{fp}:42:3") > 0
        again = await stub.SearchFeatures(
            pb.SearchFeaturesRequest(token_id=42, dictionary_id=SAE, limit=3)
        )
        assert again == tok and cache_events(srv)[("redis", "hit")] == 2
        r.close()


async def test_concurrent_cold_requests_compute_once(engine: HookedEngine, redis_url: str) -> None:
    clear(redis_url, engine.dictionaries[TC].fingerprint)
    async with serving(engine, redis_url=redis_url) as (srv, stub):
        calls = [stub.GetFeature(pb.GetFeatureRequest(feature=ref(TC, 3))) for _ in range(16)]
        results = await asyncio.gather(*calls)
        assert all(r == results[0] for r in results)
        assert srv.state.cache.computations == 1


async def test_garbage_and_swapped_values_in_redis_are_dropped_and_recomputed(
    engine: HookedEngine, redis_url: str
) -> None:
    """Values read from Redis are untrusted: garbage, a well-formed envelope around a bad
    payload, and a value copied from another feature's key are each refused, deleted and
    recomputed; the client gets the right feature (before: INTERNAL, or feature 2 served
    for feature 1)."""
    fp = engine.dictionaries[SAE].fingerprint
    clear(redis_url, fp)
    key1, key2 = f"{PREFIX}:feature:{fp}:1", f"{PREFIX}:feature:{fp}:2"
    tok_key = f"{PREFIX}:search-token:{fp}:42:3"
    r = redis.Redis.from_url(redis_url)
    async with serving(engine, redis_url=redis_url) as (srv, stub):
        one = await stub.GetFeature(pb.GetFeatureRequest(feature=ref(SAE, 1)))
        two = await stub.GetFeature(pb.GetFeatureRequest(feature=ref(SAE, 2)))
        tok_req = pb.SearchFeaturesRequest(token_id=42, dictionary_id=SAE, limit=3)
        tok = await stub.SearchFeatures(tok_req)
        assert one.feature.index == 1 and two.feature.index == 2
        good = r.get(key1)

        planted = [
            (key1, bytes(range(256)) * 4),  # garbage
            (key1, b"\xff" * 64),  # garbage that is not protobuf either
            (key1, good[:-5]),  # truncated
            (key1, wrap(key1, b"\xff" * 64)),  # a valid envelope, not a GetFeatureResponse
            (key1, r.get(key2)),  # feature 2's value under feature 1's key
            (key1, pb.GetFeatureResponse.FromString(unwrap(key2, r.get(key2))).SerializeToString()),
            (tok_key, b"\x00garbage"),
        ]
        for n, (key, value) in enumerate(planted, 1):
            r.set(key, value, ex=60)
            if key == tok_key:
                assert await stub.SearchFeatures(tok_req) == tok
            else:
                assert await stub.GetFeature(pb.GetFeatureRequest(feature=ref(SAE, 1))) == one
            assert cache_events(srv)[("redis", "invalid")] == n
            assert unwrap(key, r.get(key)) != b""  # dropped, recomputed and stored again
            assert 0 < r.ttl(key) <= 3600
        # the recomputed entries are good hits again
        hits = cache_events(srv).get(("redis", "hit"), 0)
        assert await stub.GetFeature(pb.GetFeatureRequest(feature=ref(SAE, 1))) == one
        assert cache_events(srv)[("redis", "hit")] == hits + 1
        assert srv.state.cache.computations == 3 + len(planted)
    r.close()


async def test_cancelling_one_search_does_not_stall_an_identical_one(
    engine: HookedEngine, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two identical cold SearchFeatures; the first client cancels while both wait for the
    one computation. The second gets its answer as soon as the computation finishes (before:
    the waiters were handed the first caller's cancellation and hung until their deadline)."""
    clear(redis_url, engine.dictionaries[SAE].fingerprint)
    async with serving(engine, redis_url=redis_url) as (srv, stub):
        catalog, cache = srv.state.require_catalog(), srv.state.cache
        search, get_or_compute = catalog.search, cache.get_or_compute
        release = asyncio.Event()
        callers = {"in": 0, "out": 0, "searches": 0}

        async def held_search(req: Any) -> Any:  # a cold search that finishes when told
            callers["searches"] += 1
            await release.wait()
            return await search(req)

        async def counted(*args: Any) -> bytes:
            callers["in"] += 1
            try:
                return await get_or_compute(*args)
            finally:
                callers["out"] += 1

        async def until(condition: Any) -> None:
            for _ in range(500):
                if condition():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"timed out: {callers}")

        monkeypatch.setattr(catalog, "search", held_search)
        monkeypatch.setattr(cache, "get_or_compute", counted)
        # scoped to SAE: its keys are cleared above, so the search is cold on every run
        req = pb.SearchFeaturesRequest(query="otter meteor banjo", dictionary_id=SAE, limit=100)
        first = stub.SearchFeatures(req, timeout=20)
        await until(lambda: callers["searches"] == 1)  # the first one's search is running
        second = stub.SearchFeatures(req, timeout=20)
        await until(lambda: callers["in"] == 2)  # both wait for the same computation
        first.cancel()
        await until(lambda: callers["out"] >= 1)  # the server saw the first one go
        release.set()
        answer = await asyncio.wait_for(second, 5)
        with pytest.raises(asyncio.CancelledError):
            await first
        assert answer == await stub.SearchFeatures(req)  # now a cache hit
        assert cache.computations == 1 and callers["searches"] == 1


async def test_redis_stop_and_restart_are_invisible_to_clients(engine: HookedEngine) -> None:
    redis_server = RedisServer().start()
    try:
        async with serving(engine, redis_url=redis_server.url, cache_retry_seconds=0.3) as (
            srv,
            stub,
        ):
            a = await stub.GetFeature(pb.GetFeatureRequest(feature=ref(SAE, 1)))
            assert cache_events(srv) == {("redis", "miss"): 1}

            redis_server.stop()
            # the LRU answers the warm key, a cold key is computed: no client-visible error
            assert await stub.GetFeature(pb.GetFeatureRequest(feature=ref(SAE, 1))) == a
            b = await stub.GetFeature(pb.GetFeatureRequest(feature=ref(SAE, 2)))
            assert b.feature.index == 2
            await stub.SearchFeatures(pb.SearchFeaturesRequest(token_id=7, limit=4))
            ev = cache_events(srv)
            assert ev[("redis", "error")] >= 1 and ev[("lru", "hit")] >= 1
            assert ("redis", "hit") not in ev

            redis_server.start()  # same port, empty (no persistence)
            await asyncio.sleep(0.4)  # past the back-off
            assert await stub.GetFeature(pb.GetFeatureRequest(feature=ref(SAE, 1))) == a
            assert await stub.GetFeature(pb.GetFeatureRequest(feature=ref(SAE, 1))) == a
            ev = cache_events(srv)
            assert ev[("redis", "hit")] >= 1, ev  # hits resumed after the restart
            r = redis.Redis.from_url(redis_server.url)
            assert r.ttl(f"{PREFIX}:feature:{engine.dictionaries[SAE].fingerprint}:1") > 0
            r.close()
    finally:
        redis_server.stop()


async def test_dictionary_versions_never_share_entries(
    engine: HookedEngine, redis_url: str, tmp_path: Path
) -> None:
    """A retrained dictionary under the same id (new fingerprint) gets its own entries."""
    d = TINY["hidden_size"]
    retrained_dir = write_random_dictionary(
        tmp_path, "sae-v2", "topk", "blocks.1.hook_resid_post", d, 128, k=8, seed=99
    )
    retrained = load_dictionary(retrained_dir, dictionary_id=SAE)
    other = HookedEngine(
        engine.model, engine.tokenizer, [retrained], model_name="tiny-llama", weights_hash="0"
    )
    old_fp, new_fp = engine.dictionaries[SAE].fingerprint, retrained.fingerprint
    assert old_fp != new_fp
    clear(redis_url, old_fp, new_fp)
    try:
        async with serving(engine, redis_url=redis_url) as (_, stub_old):
            old = await stub_old.GetFeature(pb.GetFeatureRequest(feature=ref(SAE, 4)))
        async with serving(other, redis_url=redis_url) as (srv_new, stub_new):
            new = await stub_new.GetFeature(pb.GetFeatureRequest(feature=ref(SAE, 4)))
            assert cache_events(srv_new) == {("redis", "miss"): 1}  # not the old entry
            assert new.feature.fingerprint == new_fp and old.feature.fingerprint == old_fp
            assert new.label == "" and old.label != ""  # the new version has no metadata
            top, _ = await other.feature_logits(SAE, 4, 10)
            assert [t.token.id for t in new.top_logits] == [i for i, _ in top]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub_new.GetFeature(pb.GetFeatureRequest(feature=ref(SAE, 4, old_fp)))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        r = redis.Redis.from_url(redis_url)
        assert r.exists(f"{PREFIX}:feature:{old_fp}:4") and r.exists(f"{PREFIX}:feature:{new_fp}:4")
        r.close()
    finally:
        await other.shutdown()


async def test_without_redis_the_lru_serves(engine: HookedEngine) -> None:
    async with serving(engine, redis_url=None) as (srv, stub):
        a = await stub.GetFeature(pb.GetFeatureRequest(feature=ref(TC, 0)))
        b = await stub.GetFeature(pb.GetFeatureRequest(feature=ref(TC, 0)))
        assert a == b and len(a.top_logits) == 10 and a.label == ""
        assert cache_events(srv) == {("lru", "miss"): 1, ("lru", "hit"): 1}


async def test_errors_name_the_field(engine: HookedEngine) -> None:
    fp = engine.dictionaries[SAE].fingerprint
    cases = [
        (pb.GetFeatureRequest(feature=ref("nope@v1", 0)), grpc.StatusCode.NOT_FOUND, "dictionary"),
        (pb.GetFeatureRequest(feature=ref(SAE, 0, "f" * 16)), "FAILED_PRECONDITION", fp),
        (pb.GetFeatureRequest(feature=ref(SAE, 128)), "INVALID_ARGUMENT", "feature.index"),
        (pb.GetFeatureRequest(), "INVALID_ARGUMENT", "feature"),
        (pb.SearchFeaturesRequest(), "INVALID_ARGUMENT", "query"),
        (pb.SearchFeaturesRequest(query="x", token_id=1), "INVALID_ARGUMENT", "query"),
        (pb.SearchFeaturesRequest(query="x", limit=101), "INVALID_ARGUMENT", "limit"),
        (pb.SearchFeaturesRequest(token_id=10**6), "INVALID_ARGUMENT", "token_id"),
        (pb.SearchFeaturesRequest(query="x", dictionary_id="nope"), "NOT_FOUND", "dictionary_id"),
    ]
    async with serving(engine) as (srv, stub):
        for req, code, text in cases:
            call = stub.GetFeature if isinstance(req, pb.GetFeatureRequest) else stub.SearchFeatures
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(req)
            want = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode[code]
            assert err.value.code() == want, (req, err.value.details())
            assert text in (err.value.details() or ""), err.value.details()
        assert srv.state.cache.computations == 0  # errors never reach (or fill) the cache
