"""DecodeFeatures on a tiny random Llama, checked against plain transformers + hand math."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from featuresteer_server import domain
from featuresteer_server.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.support import tiny_engine

pytestmark = pytest.mark.unit
SAE = "tiny/res-topk-128/blocks.1.hook_resid_post@v1"
TC = "tiny/tc-96/blocks.0.ln2.hook_normalized@v1"
TEXT = "The quick brown fox jumps over the lazy dog. Ünïcode ✓ too."


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return tiny_engine(tmp_path_factory.mktemp("dicts"))


def decode(engine, **kw) -> domain.DecodeResult:  # type: ignore[no-untyped-def]
    return asyncio.run(engine.decode(domain.DecodeRequest(**kw)))


def hf_activations(engine, ids: list[int]) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Reference activations from plain transformers with forward hooks."""
    hf = engine.hf_model
    got: dict[str, torch.Tensor] = {}

    def keep(name):  # type: ignore[no-untyped-def]
        def hook(_m, args, out):  # type: ignore[no-untyped-def]
            got[name] = (out[0] if isinstance(out, tuple) else out).detach()
            got[name + ".in"] = args[0].detach()

        return hook

    handles = [
        hf.model.layers[1].register_forward_hook(keep("resid_post.1")),
        hf.model.layers[0].post_attention_layernorm.register_forward_hook(keep("ln2.0")),
        hf.model.layers[0].mlp.register_forward_hook(keep("mlp_out.0")),
    ]
    with torch.no_grad():
        hf(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return {k: v[0] for k, v in got.items()}


def dict_weights(engine, dictionary_id: str) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    d = engine.dictionaries[dictionary_id]
    w = {
        k: v.float() for k, v in load_file(str(Path(d.source) / "sae_weights.safetensors")).items()
    }
    w["mean"] = load_file(str(Path(d.source) / "dataset_stats.safetensors"))["mean"].float()
    return w


def test_topk_sae_matches_hand_math(engine) -> None:  # type: ignore[no-untyped-def]
    ids = engine.tokenizer.encode(TEXT)
    res = decode(
        engine,
        inputs=(domain.DecodeInput(text=TEXT),),
        dictionary_ids=(SAE,),
        top_k=8,
        include_error=True,
    )
    x = hf_activations(engine, ids)["resid_post.1"]  # [pos, d_model]
    w = dict_weights(engine, SAE)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    vals, idx = pre.topk(8, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    recon = acts @ w["W_dec"] + w["b_dec"]
    err = (x - recon).norm(dim=-1)
    fvu = (x - recon).pow(2).sum(-1) / (x - w["mean"]).pow(2).sum(-1)
    positions = res.items[0].results[0].positions
    assert len(positions) == len(ids)
    for p, pos in enumerate(positions):
        ref = {int(i): float(acts[p, i]) for i in acts[p].nonzero().flatten()}
        got = dict(pos.top)
        assert set(got) == set(ref), p
        for i, v in got.items():
            assert v == pytest.approx(ref[i], abs=1e-4, rel=1e-4)
        assert pos.error_norm == pytest.approx(float(err[p]), rel=1e-4)
        assert pos.fvu == pytest.approx(float(fvu[p]), rel=1e-4)


def test_transcoder_reads_normalized_mlp_input_and_scores_mlp_output(engine) -> None:  # type: ignore[no-untyped-def]
    ids = engine.tokenizer.encode(TEXT)
    ref = hf_activations(engine, ids)
    x_raw = ref["ln2.0.in"]
    eps = engine.hf_model.config.rms_norm_eps
    x = x_raw / (x_raw.pow(2).mean(-1, keepdim=True) + eps).sqrt()  # before the ln2 weight
    y = ref["mlp_out.0"]
    w = dict_weights(engine, TC)
    acts = (x @ w["W_enc"] + w["b_enc"]).relu()
    recon = acts @ w["W_dec"] + w["b_dec"]
    sel = [0, 5, 17]
    res = decode(
        engine,
        inputs=(domain.DecodeInput(token_ids=tuple(ids)),),
        dictionary_ids=(TC,),
        features=tuple(domain.FeatureRef(TC, i) for i in sel),
        include_error=True,
    )
    for p, pos in enumerate(res.items[0].results[0].positions):
        assert [i for i, _ in pos.selected] == sel
        for i, v in pos.selected:
            assert v == pytest.approx(float(acts[p, i]), abs=1e-4)
        assert pos.error_norm == pytest.approx(float((y[p] - recon[p]).norm()), rel=1e-4)


def _flat(result: domain.DictionaryResult, n: int) -> list[tuple]:  # type: ignore[type-arg]
    return [(p.top, p.error_norm, p.fvu) for p in result.positions[:n]]


def assert_close(a: list, b: list, tol: float = 1e-5) -> None:  # type: ignore[type-arg]
    for (top_a, err_a, fvu_a), (top_b, err_b, fvu_b) in zip(a, b, strict=True):
        assert [i for i, _ in top_a] == [i for i, _ in top_b]
        for (_, va), (_, vb) in zip(top_a, top_b, strict=True):
            assert abs(va - vb) <= tol
        assert abs(err_a - err_b) <= tol * max(1.0, err_a)
        assert abs(fvu_a - fvu_b) <= tol * max(1.0, fvu_a)


def test_prefix_and_batch_agree_with_full_and_alone(engine) -> None:  # type: ignore[no-untyped-def]
    ids = engine.tokenizer.encode(TEXT)
    prefix = ids[:7]
    other = engine.tokenizer.encode("A different, longer input that pads the batch out a lot.")
    kw = dict(top_k=5, include_error=True, dictionary_ids=(SAE, TC))
    full = decode(engine, inputs=(domain.DecodeInput(token_ids=tuple(ids)),), **kw)
    pre = decode(engine, inputs=(domain.DecodeInput(token_ids=tuple(prefix)),), **kw)
    batch = decode(
        engine,
        inputs=(
            domain.DecodeInput(token_ids=tuple(prefix)),
            domain.DecodeInput(token_ids=tuple(other)),
            domain.DecodeInput(token_ids=tuple(ids)),
        ),
        **kw,
    )
    for r in range(2):
        assert_close(_flat(full.items[0].results[r], 7), _flat(pre.items[0].results[r], 7))
        assert_close(_flat(batch.items[0].results[r], 7), _flat(pre.items[0].results[r], 7))
        assert_close(
            _flat(batch.items[2].results[r], len(ids)), _flat(full.items[0].results[r], len(ids))
        )


def test_bad_references_are_named(engine) -> None:  # type: ignore[no-untyped-def]
    inp = (domain.DecodeInput(text="hi"),)
    with pytest.raises(NotFound, match=r"dictionary_ids\[0\]"):
        decode(engine, inputs=inp, dictionary_ids=("nope@v1",), top_k=1)
    with pytest.raises(InvalidArgument, match=r"features\[0\]\.index"):
        decode(engine, inputs=inp, features=(domain.FeatureRef(SAE, 128),))
    with pytest.raises(FailedPrecondition, match="fingerprint"):
        decode(engine, inputs=inp, features=(domain.FeatureRef(SAE, 1, "deadbeef"),))
    with pytest.raises(InvalidArgument, match=r"inputs\[0\]\.token_ids\[1\]"):
        decode(engine, inputs=(domain.DecodeInput(token_ids=(1, 10**7)),), top_k=1)
    fp = engine.dictionaries[SAE].fingerprint
    ok = decode(engine, inputs=inp, features=(domain.FeatureRef(SAE, 1, fp),))
    assert ok.provenance.dictionary_fingerprints == {SAE: fp}


def test_hooked_logits_match_transformers(engine) -> None:  # type: ignore[no-untyped-def]
    ids = torch.tensor([engine.tokenizer.encode(TEXT)])
    with torch.no_grad():
        ref = engine.hf_model(ids).logits
        got = engine.model(ids)
    assert (ref - got).abs().max().item() < 1e-4


def test_empty_dictionary_ids_decode_the_defaults(engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Not every dictionary (34 on the default server): the configured decode set, by default
    the SAEs, at most max_dictionaries_per_call."""
    inp = (domain.DecodeInput(text="hi"),)
    res = decode(engine, inputs=inp, top_k=2)
    assert [r.dictionary_id for r in res.items[0].results] == [SAE]
    monkeypatch.setattr(engine, "decode_dictionaries", (TC,))
    res = decode(engine, inputs=inp, top_k=2)
    assert [r.dictionary_id for r in res.items[0].results] == [TC]
    monkeypatch.setattr(engine, "decode_dictionaries", ())
    monkeypatch.setattr(engine, "max_dictionaries_per_call", 0)
    with pytest.raises(InvalidArgument, match="dictionary_ids"):
        decode(engine, inputs=inp, top_k=2)


def test_response_size_estimate_bounds_the_answer(engine) -> None:  # type: ignore[no-untyped-def]
    """The estimate is an upper bound of the real encoding (not a loose one), and a request
    whose answer could not be sent is refused before any compute, naming the fields."""
    from featuresteer_server import convert

    req = domain.DecodeRequest(
        inputs=(
            domain.DecodeInput(text=TEXT),
            domain.DecodeInput(token_ids=tuple(range(1000, 1040))),
        ),
        dictionary_ids=(SAE, TC),
        top_k=8,
        features=(domain.FeatureRef(SAE, 3),),
        include_error=True,
        max_response_bytes=10**9,
    )
    res = asyncio.run(engine.decode(req))
    actual = convert.decode_result_to_pb(res).ByteSize()
    estimate = domain.decode_response_bytes([i.tokens for i in res.items], [SAE, TC], [9, 8])
    assert actual <= estimate <= 3 * actual
    small = dataclasses.replace(req, max_response_bytes=actual // 2)
    with pytest.raises(InvalidArgument, match="top_k") as err:
        asyncio.run(engine.decode(small))
    assert "send limit" in str(err.value) and "dictionaries" in str(err.value)
