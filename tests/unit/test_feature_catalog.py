"""Cache (LRU, single-flight, keys, Redis-down fallback) and catalog (synthetic metadata,
weight-derived logits against hand math on the tiny model, search, validation)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer_server import convert, domain
from featuresteer_server.cache import LRU, BadValue, FeatureCache, cache_key, unwrap, wrap
from featuresteer_server.catalog import FeatureCatalog
from featuresteer_server.config import load_config
from featuresteer_server.errors import FailedPrecondition, InvalidArgument, NotFound
from featuresteer_server.metrics import Metrics
from tests.feature_metadata import write_features_npz
from tests.redis_server import free_port
from tests.support import tiny_engine

pytestmark = pytest.mark.unit

SAE = "tiny/res-topk-128/blocks.1.hook_resid_post@v1"
TC = "tiny/tc-96/blocks.0.ln2.hook_normalized@v1"


def events(m: Metrics) -> dict[tuple[str, str], float]:
    out = {}
    for metric in m.registry.collect():
        for s in metric.samples:
            if s.name == "featuresteer_cache_events_total":
                out[(s.labels["layer"], s.labels["event"])] = s.value
    return out


# -- cache ------------------------------------------------------------------------------------


def test_lru_evicts_least_recently_used() -> None:
    lru = LRU(2)
    lru.put("a", b"1")
    lru.put("b", b"2")
    assert lru.get("a") == b"1"  # a is now the most recent
    lru.put("c", b"3")
    assert "b" not in lru and lru.get("a") == b"1" and lru.get("c") == b"3"
    assert len(lru) == 2
    off = LRU(0)
    off.put("a", b"1")
    assert off.get("a") is None


def test_keys_are_namespaced_by_kind_and_fingerprint() -> None:
    assert (
        cache_key("featuresteer:v1", "feature", "abc123", 7) == "featuresteer:v1:feature:abc123:7"
    )
    a = cache_key("featuresteer:v1", "feature", "fp-one", 7)
    b = cache_key("featuresteer:v1", "feature", "fp-two", 7)
    assert a != b
    with pytest.raises(ValueError):
        cache_key("featuresteer:v1", "feature", "", 7)
    cache = FeatureCache(None)
    assert cache.key("search-token", "fp", 5, 20) == "featuresteer:v2:search-token:fp:5:20"


async def test_lru_only_cache_computes_once_and_counts() -> None:
    m = Metrics(CollectorRegistry())
    cache = FeatureCache(None, lru_size=8, metrics=m)
    calls = 0

    async def compute() -> bytes:
        nonlocal calls
        calls += 1
        return b"value"

    assert await cache.get_or_compute("k", compute) == b"value"
    assert await cache.get_or_compute("k", compute) == b"value"
    assert calls == 1
    ev = events(m)
    assert ev[("lru", "miss")] == 1 and ev[("lru", "hit")] == 1
    assert ("redis", "hit") not in ev


async def test_single_flight_one_computation_per_cold_key() -> None:
    cache = FeatureCache(None, lru_size=8)
    calls = 0
    gate = asyncio.Event()

    async def compute() -> bytes:
        nonlocal calls
        calls += 1
        await gate.wait()
        return b"v"

    tasks = [asyncio.create_task(cache.get_or_compute("cold", compute)) for _ in range(20)]
    other = asyncio.create_task(cache.get_or_compute("other", compute))
    await asyncio.sleep(0.05)
    gate.set()
    assert await asyncio.gather(*tasks) == [b"v"] * 20
    await other
    assert calls == 2  # one per key
    assert cache.computations == 2 and not cache._inflight


async def test_single_flight_error_reaches_waiters_and_is_not_cached() -> None:
    cache = FeatureCache(None, lru_size=8)
    gate = asyncio.Event()
    calls = 0

    async def boom() -> bytes:
        nonlocal calls
        calls += 1
        await gate.wait()
        raise RuntimeError("compute failed")

    tasks = [asyncio.create_task(cache.get_or_compute("k", boom)) for _ in range(3)]
    await asyncio.sleep(0.02)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results) and calls == 1

    async def ok() -> bytes:
        return b"fine"

    assert await cache.get_or_compute("k", ok) == b"fine"  # the error was not cached


async def test_cancelled_first_caller_does_not_hurt_waiters() -> None:
    """The first caller's client cancels 20 ms in: the second still gets the value as soon
    as it is ready (before: it got a cancelled future and hung until its deadline)."""
    cache = FeatureCache(None, lru_size=8)
    calls = 0

    async def compute() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        return b"value"

    first = asyncio.create_task(cache.get_or_compute("cold", compute))
    await asyncio.sleep(0.005)
    second = asyncio.create_task(cache.get_or_compute("cold", compute))
    await asyncio.sleep(0.015)
    first.cancel()
    t0 = time.perf_counter()
    assert await asyncio.wait_for(second, 2.0) == b"value"
    assert time.perf_counter() - t0 < 0.5
    assert first.cancelled()
    assert calls == 1 and not cache._inflight  # the work was not restarted
    assert await cache.get_or_compute("cold", compute) == b"value" and calls == 1


async def test_computation_is_cancelled_when_every_caller_left() -> None:
    cache = FeatureCache(None, lru_size=8)
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow() -> bytes:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b"never"

    tasks = [asyncio.create_task(cache.get_or_compute("k", slow)) for _ in range(2)]
    await started.wait()
    tasks[0].cancel()
    await asyncio.sleep(0.01)
    assert not cancelled.is_set()  # one caller still waits
    tasks[1].cancel()
    await asyncio.wait_for(cancelled.wait(), 1.0)
    assert not cache._inflight

    async def fast() -> bytes:
        return b"fresh"

    assert await cache.get_or_compute("k", fast) == b"fresh"  # nothing stale was kept


async def test_waiter_recomputes_when_the_computation_cancels_itself() -> None:
    cache = FeatureCache(None, lru_size=8)
    calls = 0

    async def flaky() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls == 1:
            raise asyncio.CancelledError  # e.g. an executor shut down under it
        return b"second try"

    assert await asyncio.wait_for(cache.get_or_compute("k", flaky), 1.0) == b"second try"
    assert calls == 2


def test_envelope_echoes_the_key_and_refuses_anything_else() -> None:
    key = "featuresteer:v2:feature:fp:7"
    value = wrap(key, b"payload")
    assert key.encode() in value and len(value) == len(b"payload") + 22 + len(key)
    assert unwrap(key, value) == b"payload"
    assert unwrap(key, wrap(key, b"")) == b""
    bad = [
        b"",
        b"payload",  # format 1: the bare payload
        b"fsc2",
        value[:-1],  # truncated
        value[:10],
        value[:-1] + bytes([value[-1] ^ 1]),  # a flipped bit
        wrap("featuresteer:v2:feature:fp:8", b"payload"),  # another key's value
        bytes(range(256)),
    ]
    for v in bad:
        with pytest.raises(BadValue):
            unwrap(key, v)


async def test_unreachable_redis_degrades_to_lru_quickly_and_backs_off() -> None:
    m = Metrics(CollectorRegistry())
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    cache = FeatureCache(url, lru_size=8, metrics=m, socket_timeout=0.2, retry_seconds=60)

    async def compute() -> bytes:
        return b"v"

    t0 = time.perf_counter()
    assert await cache.get_or_compute("k", compute) == b"v"
    assert await cache.get_or_compute("k", compute) == b"v"
    assert time.perf_counter() - t0 < 2
    ev = events(m)
    assert ev[("redis", "error")] == 1  # the second call skipped Redis (back-off)
    assert ev[("lru", "hit")] == 1
    assert not cache.redis_usable()
    await cache.close()


# -- catalog ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return tiny_engine(Path(tmp_path_factory.mktemp("catalog-dicts")))


def hand_logits(engine, dictionary_id: str, index: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Decoder row through the HF model's final RMSNorm weight and lm_head (independent of
    TransformerLens)."""
    hf = engine.hf_model
    row = engine.dictionaries[dictionary_id].W_dec[index].double()  # [d_model]
    w_norm = hf.model.norm.weight.detach().double()  # [d_model]
    w_u = hf.lm_head.weight.detach().double()  # [d_vocab, d_model]
    return w_u @ (row * w_norm)  # [d_vocab]


@pytest.mark.parametrize("dictionary_id", [SAE, TC])
async def test_logits_from_weights_match_hand_math(engine, dictionary_id: str) -> None:  # type: ignore[no-untyped-def]
    catalog = FeatureCatalog(engine)
    assert not catalog.has_metadata(dictionary_id)
    feat = await catalog.get_feature(domain.FeatureRef(dictionary_id, 5))
    ref = hand_logits(engine, dictionary_id, 5)
    want_top = torch.topk(ref, 10)
    want_bottom = torch.topk(-ref, 10)
    assert [t.token.id for t in feat.top_logits] == want_top.indices.tolist()
    assert [t.token.id for t in feat.bottom_logits] == want_bottom.indices.tolist()
    np.testing.assert_allclose(
        [t.value for t in feat.top_logits], want_top.values.numpy(), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        [t.value for t in feat.bottom_logits], -want_bottom.values.numpy(), rtol=1e-4, atol=1e-5
    )
    assert feat.label == "" and feat.top_examples == () and feat.density == 0
    assert feat.feature.fingerprint == engine.dictionaries[dictionary_id].fingerprint
    assert feat.top_logits[0].token.text == engine.tokenizer.tokens([want_top.indices[0]])[0].text


async def test_token_search_matches_hand_math(engine) -> None:  # type: ignore[no-untyped-def]
    catalog = FeatureCatalog(engine)
    token = 1234
    res = await catalog.search(domain.SearchRequest(token_id=token, dictionary_id=SAE, limit=5))
    hf = engine.hf_model
    direction = hf.model.norm.weight.detach() * hf.lm_head.weight.detach()[token]  # [d_model]
    scores = engine.dictionaries[SAE].W_dec @ direction  # [d_sae]
    want = torch.topk(scores, 5)
    assert [m.feature.index for m in res.matches] == want.indices.tolist()
    np.testing.assert_allclose([m.score for m in res.matches], want.values.numpy(), rtol=1e-4)
    # every dictionary: merged by score, the SAE's best is among them
    both = await catalog.search(domain.SearchRequest(token_id=token, limit=10))
    assert {m.feature.dictionary_id for m in both.matches} <= {SAE, TC}
    assert [m.score for m in both.matches] == sorted((m.score for m in both.matches), reverse=True)


async def test_synthetic_metadata_is_served_as_stored(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d_sae = engine.dictionaries[SAE].d_sae
    arrays = write_features_npz(tmp_path / "features.npz", d_sae, seed=3)
    catalog = FeatureCatalog(engine, {SAE: tmp_path / "features.npz"})
    for f in (0, 7, d_sae - 1):
        feat = await catalog.get_feature(domain.FeatureRef(SAE, f))
        assert feat.label == str(arrays["labels"][f])
        assert feat.density == pytest.approx(float(arrays["density"][f]))
        assert feat.max_activation == pytest.approx(float(arrays["max_activation"][f]))
        lens = [int(n) for n in arrays["top_len"][f] if n > 0]
        assert [len(e.tokens) for e in feat.top_examples] == lens
        for j, ex in enumerate(feat.top_examples):
            n = lens[j]
            assert [t.id for t in ex.tokens] == arrays["top_tokens"][f, j, :n].tolist()
            np.testing.assert_allclose(
                ex.activations, arrays["top_acts"][f, j, :n].astype(np.float32)
            )
            # byte offsets index the example's own text
            assert ex.tokens[0].start == 0 and ex.tokens[-1].end == sum(
                len(t.bytes) for t in ex.tokens
            )
        if feat.top_examples:  # sorted by max activation, the first holds the max
            assert max(feat.top_examples[0].activations) == pytest.approx(
                feat.max_activation, rel=1e-3
            )
        assert [t.token.id for t in feat.top_logits] == arrays["logit_top_ids"][f].tolist()
        np.testing.assert_allclose(
            [t.value for t in feat.bottom_logits], arrays["logit_bottom_vals"][f], rtol=1e-6
        )
    assert (await catalog.get_feature(domain.FeatureRef(SAE, d_sae - 1))).top_examples == ()


async def test_mismatched_or_missing_metadata_serves_weights_only(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_features_npz(tmp_path / "wrong.npz", 17)  # 17 features, the SAE has 128
    catalog = FeatureCatalog(engine, {SAE: tmp_path / "wrong.npz", TC: tmp_path / "none.npz"})
    assert not catalog.has_metadata(TC)
    feat = await catalog.get_feature(domain.FeatureRef(SAE, 1))
    assert feat.label == "" and len(feat.top_logits) == 10
    assert not catalog.has_metadata(SAE)


async def test_catalog_file_metadata_paths(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_features_npz(tmp_path / "meta" / "tc.npz", engine.dictionaries[TC].d_sae, seed=4)
    entry = {"id": TC, "path": "nowhere", "metadata": "meta/tc.npz"}
    (tmp_path / "catalog.json").write_text(json.dumps({"dictionaries": [entry]}))
    cfg = load_config(catalog=tmp_path / "catalog.json", feature_logits_k=3)
    catalog = FeatureCatalog.from_config(engine, cfg)
    assert catalog.has_metadata(TC) and not catalog.has_metadata(SAE)
    feat = await catalog.get_feature(domain.FeatureRef(TC, 2))
    assert feat.label.startswith("fires on") and len(feat.top_logits) == 3
    assert len((await catalog.get_feature(domain.FeatureRef(SAE, 2))).top_logits) == 3


async def test_text_search_scores_labels_and_contexts(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tok = engine.tokenizer
    (world,) = tok.encode(" world", prepend_bos=False)
    write_features_npz(
        tmp_path / "f.npz",
        engine.dictionaries[SAE].d_sae,
        labels={3: "fires on [' hello world']; promotes ['!']", 9: "fires on ['Hello']"},
        tokens={20: [world, world]},
    )
    catalog = FeatureCatalog(engine, {SAE: tmp_path / "f.npz"})
    res = await catalog.search(domain.SearchRequest(query="hello world", limit=10))
    ranked = [m.feature.index for m in res.matches]
    # 3: phrase in label (2) + both words (1); 9: one word of two (0.5) ; 20: "world" is its
    # top example's max-activating token (context score 1 for one word of two: 0.5 at least)
    assert ranked[0] == 3 and res.matches[0].score >= 3.0
    assert 9 in ranked and 20 in ranked
    assert all(m.feature.dictionary_id == SAE for m in res.matches)  # TC has no metadata
    none = await catalog.search(domain.SearchRequest(query="zzzqqqxx", limit=10))
    assert none.matches == ()
    limited = await catalog.search(domain.SearchRequest(query="fires", limit=2))
    assert len(limited.matches) == 2


def test_validation_names_the_field(engine) -> None:  # type: ignore[no-untyped-def]
    catalog = FeatureCatalog(engine)
    fp = engine.dictionaries[SAE].fingerprint
    with pytest.raises(NotFound, match="feature.dictionary_id"):
        catalog.resolve(domain.FeatureRef("nope@v1", 0))
    with pytest.raises(FailedPrecondition, match="fingerprint"):
        catalog.resolve(domain.FeatureRef(SAE, 0, "0" * 16))
    assert catalog.resolve(domain.FeatureRef(SAE, 0, fp)).fingerprint == fp
    with pytest.raises(InvalidArgument, match="feature.index"):
        catalog.resolve(domain.FeatureRef(SAE, 128))
    with pytest.raises(NotFound, match="dictionary_id"):
        catalog.search_scope(domain.SearchRequest(query="x", dictionary_id="nope"))
    with pytest.raises(InvalidArgument, match="token_id"):
        catalog.search_scope(domain.SearchRequest(token_id=10**7))
    limits = load_config(max_search_limit=50).limits()
    cases = [
        (pb.SearchFeaturesRequest(), "query"),
        (pb.SearchFeaturesRequest(query="  "), "query"),
        (pb.SearchFeaturesRequest(query="a", token_id=3), "query"),
        (pb.SearchFeaturesRequest(query="a", limit=51), "limit"),
    ]
    for msg, field in cases:
        with pytest.raises(InvalidArgument) as err:
            convert.search_request_from_pb(msg, limits)
        assert err.value.field == field
    req = convert.search_request_from_pb(pb.SearchFeaturesRequest(token_id=0), limits)
    assert req.token_id == 0 and req.query is None and req.limit == 20
    with pytest.raises(InvalidArgument, match="feature"):
        convert.get_feature_request_from_pb(pb.GetFeatureRequest(), limits)


def test_graph_feature_nodes_get_catalog_labels(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arrays = write_features_npz(tmp_path / "tc.npz", engine.dictionaries[TC].d_sae, seed=5)
    catalog = FeatureCatalog(engine, {TC: tmp_path / "tc.npz"})

    def node(kind: str, ref: domain.FeatureRef | None) -> domain.GraphNode:
        return domain.GraphNode(kind, 0, 1, ref, 1.0, 0.5, "", 0, 0.0, 0.0)

    result = domain.AttributionResult(
        tokens=(),
        provenance=engine.provenance([]),
        nodes=(
            node("embedding", None),
            node("feature", domain.FeatureRef(TC, 5)),
            node("feature", domain.FeatureRef(TC, 11)),
            node("feature", domain.FeatureRef(SAE, 3)),  # no metadata for this one
        ),
    )
    labelled = catalog.label_graph(result)
    assert [n.label for n in labelled.nodes] == [
        "",
        str(arrays["labels"][5]),
        str(arrays["labels"][11]),
        "",
    ]
    assert str(arrays["labels"][5])  # the synthetic labels are not empty
    assert [n.feature for n in labelled.nodes] == [n.feature for n in result.nodes]


def test_text_scores_match_a_brute_force_of_the_formula(tmp_path: Path) -> None:
    """The inverted-index scorer equals the documented formula computed naively: 2 for the
    phrase in the label, plus, averaged over words, 1 for the word in the label and the mean
    over a feature's examples of (best activation on a token spelling the word) / max act."""
    from featuresteer_server.catalog import FeatureMetadata, _text_scores

    path = tmp_path / "features.npz"
    d_sae = 64
    write_features_npz(
        path, d_sae, seed=7, labels={3: "fires on ['apple']", 9: "apple pie"},
        tokens={5: [1500, 1500, 1700], 6: [1501]},
    )  # fmt: skip
    a = FeatureMetadata(path, d_sae).arrays()
    raw = np.load(path)
    labels = [str(x).lower() for x in raw["labels"]]
    for phrase, terms, matches in [
        ("apple", [("apple", [1500, 1501])], True),
        ("apple pie", [("apple", [1500]), ("pie", [1700, 1999, 4])], True),
        ("nothing", [("nothing", [])], False),
    ]:
        want = []
        for f in range(d_sae):
            s = 2.0 * (phrase in labels[f])
            for w, ids in terms:
                s += (w in labels[f]) / len(terms)
                n_ex = max(int((raw["top_len"][f] > 0).sum()), 1)
                total = 0.0
                for e in range(raw["top_len"].shape[1]):
                    length = int(raw["top_len"][f, e])
                    acts = [
                        float(raw["top_acts"][f, e, t])
                        for t in range(length)
                        if int(raw["top_tokens"][f, e, t]) in ids
                    ]
                    total += max(acts, default=0.0)
                share = total / n_ex / max(float(raw["max_activation"][f]), 1e-12)
                s += min(max(share, 0.0), 1.0) / len(terms)
            want.append(s)
        got = dict(_text_scores(a, phrase, terms))
        for f in range(d_sae):
            assert got.get(f, 0.0) == pytest.approx(want[f], rel=1e-5, abs=1e-6), (phrase, f)
        assert any(v > 0 for v in want) == matches
