"""The steering edit math (interventions.py) against hand-written references, its validation,
and the hooked engine's HF hook mapping against TransformerLens hooks doing the same edit."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from featuresteer_server import domain, interventions
from featuresteer_server.domain import ApplyTo, Condition, FeatureRef, Intervention, Op
from featuresteer_server.errors import FailedPrecondition, InvalidArgument, NotFound
from featuresteer_server.generation import HookSession
from tests.support import tiny_engine

pytestmark = pytest.mark.unit
SAE = "tiny/res-topk-128/blocks.1.hook_resid_post@v1"
TC = "tiny/tc-96/blocks.0.ln2.hook_normalized@v1"
D = 64


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return tiny_engine(tmp_path_factory.mktemp("dicts"))


def compile_(engine: Any, *ivs: Intervention) -> interventions.SteeringSpec:
    return interventions.compile_steering(
        ivs, engine.dictionaries, hook_names=engine.steering_hooks(), d_model=D
    )


def feat(op: Op, index: int, value: float = 0.0, dict_id: str = SAE, **kw: Any) -> Intervention:
    return Intervention(op=op, value=value, feature=FeatureRef(dict_id, index), **kw)


def vec(op: Op, hook: str, v: torch.Tensor, value: float = 0.0, **kw: Any) -> Intervention:
    return Intervention(
        op=op, value=value, vector=domain.VectorTarget(hook, tuple(v.tolist())), **kw
    )


def rows(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 3  # [n, d]


def run(spec: Any, hook: str, x: torch.Tensor, *, prompt_len: int = 3, special=None, captured=None):  # type: ignore[no-untyped-def]
    n = x.shape[0]
    return interventions.apply(
        spec,
        hook,
        x,
        positions=torch.arange(n),
        prompt_len=prompt_len,
        special=torch.zeros(n, dtype=torch.bool) if special is None else special,
        captured=captured or {},
    )


def active_and_inactive(d: Any, x: torch.Tensor) -> tuple[int, int]:
    a = d.encode(x)  # [n, d_sae]
    on = int((a > 0).all(0).float().argmax()) if bool((a > 0).all(0).any()) else -1
    off = int((a == 0).all(0).float().argmax())
    return on, off


# -- the math, feature edits


@pytest.mark.parametrize("op", list(Op))
def test_sae_feature_edit_is_x_plus_delta(engine: Any, op: Op) -> None:
    d = engine.dictionaries[SAE]
    x = rows()
    a = d.encode(x)  # [n, d_sae]
    i = int(a.sum(0).argmax())  # active somewhere
    value = {Op.ADD: 2.5, Op.SCALE: 3.0, Op.CLAMP: 1.75, Op.ABLATE: 0.0}[op]
    spec = compile_(engine, feat(op, i, value))
    got = run(spec, d.hook_name, x, prompt_len=0)
    target = {
        Op.ADD: a[:, i] + value,
        Op.SCALE: a[:, i] * value,
        Op.CLAMP: torch.full_like(a[:, i], value),
        Op.ABLATE: torch.zeros_like(a[:, i]),
    }[op]
    want = x + (target - a[:, i]).unsqueeze(-1) * d.W_dec[i]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert spec.edit_hooks == (d.hook_name,) and spec.fingerprint


def test_add_normalize_uses_pre_edit_norm(engine: Any) -> None:
    d = engine.dictionaries[SAE]
    x = rows()
    spec = compile_(engine, feat(Op.ADD, 5, 0.5, normalize=True))
    got = run(spec, d.hook_name, x, prompt_len=0)
    unit = d.W_dec[5] / d.W_dec[5].norm()
    torch.testing.assert_close(
        got, x + 0.5 * x.norm(dim=-1, keepdim=True) * unit, atol=1e-5, rtol=0
    )


def test_transcoder_reads_input_and_edits_output(engine: Any) -> None:
    tc = engine.dictionaries[TC]
    x_in, x_out = rows(seed=1), rows(seed=2)
    a = tc.encode(x_in)
    i = int(a.sum(0).argmax())
    spec = compile_(engine, feat(Op.CLAMP, i, 4.0, dict_id=TC))
    assert spec.edit_hooks == ("blocks.0.hook_mlp_out",)
    assert spec.read_hooks == ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    got = run(spec, "blocks.0.hook_mlp_out", x_out, prompt_len=0, captured={tc.hook_name: x_in})
    torch.testing.assert_close(
        got, x_out + (4.0 - a[:, i]).unsqueeze(-1) * tc.W_dec[i], atol=1e-5, rtol=0
    )
    # nothing happens at the input hook itself
    assert run(spec, tc.hook_name, x_in) is x_in


def test_edits_at_one_hook_share_one_encoding_and_sum(engine: Any) -> None:
    d = engine.dictionaries[SAE]
    x = rows()
    a = d.encode(x)
    i, j = (int(k) for k in a.sum(0).topk(2).indices)
    v = rows(1, seed=9)[0]
    spec = compile_(
        engine,
        feat(Op.ABLATE, i),
        feat(Op.SCALE, j, 2.0),
        vec(Op.ADD, d.hook_name, v, 0.3),
    )
    got = run(spec, d.hook_name, x, prompt_len=0)
    want = x - a[:, i : i + 1] * d.W_dec[i] + a[:, j : j + 1] * d.W_dec[j] + 0.3 * v
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_exact_no_ops(engine: Any) -> None:
    d = engine.dictionaries[SAE]
    x = rows()
    a = d.encode(x)
    off = int((a == 0).all(0).float().argmax())
    assert bool((a[:, off] == 0).all())
    on = int(a[0].argmax())
    for iv in (
        feat(Op.ABLATE, off),
        feat(Op.ADD, on, 0.0),
        feat(Op.SCALE, on, 1.0),
        feat(Op.CLAMP, on, float(a[0, on]), positions=(0,)),
    ):
        got = run(compile_(engine, iv), d.hook_name, x, prompt_len=0)
        assert torch.equal(got, x), iv


def test_dtype_round_trip_and_untouched_rows_bit_identical(engine: Any) -> None:
    d = engine.dictionaries[SAE]
    x = rows().to(torch.bfloat16)
    spec = compile_(engine, feat(Op.ADD, 3, 1.0, apply_to=ApplyTo.GENERATED))
    got = run(spec, d.hook_name, x, prompt_len=4)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got[:4], x[:4]) and not torch.equal(got[4:], x[4:])
    want = (x[4:].float() + d.W_dec[3]).to(torch.bfloat16)
    assert torch.equal(got[4:], want)


# -- raw vectors


@pytest.mark.parametrize("op", list(Op))
def test_vector_edit_is_x_plus_delta(engine: Any, op: Op) -> None:
    hook = "blocks.0.hook_resid_mid"
    x, v = rows(), rows(1, seed=5)[0]
    value = {Op.ADD: 0.7, Op.SCALE: -2.0, Op.CLAMP: 3.0, Op.ABLATE: 0.0}[op]
    got = run(compile_(engine, vec(op, hook, v, value)), hook, x, prompt_len=0)
    unit = v / v.norm()
    proj = x @ unit
    if op is Op.ADD:
        want = x + value * v
    else:
        target = {Op.SCALE: value * proj, Op.CLAMP: torch.full_like(proj, value)}.get(
            op, torch.zeros_like(proj)
        )
        want = x + (target - proj).unsqueeze(-1) * unit
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if op is Op.ABLATE:
        assert float((got @ unit).abs().max()) < 1e-4


# -- scoping and conditions


def test_scoping_prompt_generated_positions_special(engine: Any) -> None:
    d = engine.dictionaries[SAE]
    x = rows(6)
    special = torch.tensor([True, False, False, False, True, False])
    step = d.W_dec[2]

    def changed(**kw: Any) -> list[int]:
        got = run(
            compile_(engine, feat(Op.ADD, 2, 1.0, **kw)),
            d.hook_name,
            x,
            prompt_len=3,
            special=special,
        )
        for r in range(6):
            if not torch.equal(got[r], x[r]):
                torch.testing.assert_close(got[r], x[r] + step, atol=1e-5, rtol=0)
        return [r for r in range(6) if not torch.equal(got[r], x[r])]

    assert changed() == [1, 2, 3, 5]
    assert changed(apply_to=ApplyTo.PROMPT) == [1, 2]
    assert changed(apply_to=ApplyTo.GENERATED) == [3, 5]
    assert changed(positions=(0, 4, 5)) == [0, 4, 5]  # named positions include special tokens


def test_when_condition_strictly_above_on_pre_edit_activation(engine: Any) -> None:
    d, tc = engine.dictionaries[SAE], engine.dictionaries[TC]
    x = rows()
    x_in = rows(seed=3)
    c_act = tc.encode(x_in)
    ci = int(((c_act > 0).float().sum(0) - 3).abs().argmin())  # fires on some rows
    threshold = float(c_act[:, ci].median())
    spec = compile_(
        engine,
        feat(Op.ADD, 4, 1.0, when=Condition(FeatureRef(TC, ci), threshold)),
    )
    assert "blocks.0.ln2.hook_normalized" in spec.read_hooks
    got = run(spec, d.hook_name, x, prompt_len=0, captured={tc.hook_name: x_in})
    fire = c_act[:, ci] > threshold
    assert 0 < int(fire.sum()) < 6
    want = torch.where(fire.unsqueeze(-1), x + d.W_dec[4], x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# -- validation


@pytest.mark.parametrize(
    ("iv", "exc", "field"),
    [
        (feat(Op.ADD, 1, dict_id="nope"), NotFound, "interventions[0].feature.dictionary_id"),
        (feat(Op.ADD, 128), InvalidArgument, "interventions[0].feature.index"),
        (feat(Op.ADD, 1, float("nan")), InvalidArgument, "interventions[0].value"),
        (feat(Op.SCALE, 1, normalize=True), InvalidArgument, "interventions[0].normalize"),
        (
            vec(Op.ADD, "blocks.0.hook_resid_post", torch.ones(D - 1)),
            InvalidArgument,
            "interventions[0].vector.values",
        ),
        (
            vec(Op.ADD, "blocks.0.hook_resid_post", torch.full((D,), float("inf"))),
            InvalidArgument,
            "interventions[0].vector.values",
        ),
        (
            vec(Op.ABLATE, "blocks.0.hook_resid_post", torch.zeros(D)),
            InvalidArgument,
            "interventions[0].vector.values",
        ),
        (
            vec(Op.ADD, "blocks.9.hook_resid_post", torch.ones(D)),
            InvalidArgument,
            "interventions[0].vector.hook_name",
        ),
        (
            feat(Op.ADD, 1, dict_id=TC, when=Condition(FeatureRef(SAE, 1), 0.0)),
            InvalidArgument,
            "interventions[0].when",
        ),
        (
            feat(Op.ADD, 1, when=Condition(FeatureRef(SAE, 999), 0.0)),
            InvalidArgument,
            "interventions[0].when.feature.index",
        ),
    ],
)
def test_validation_names_the_field(engine: Any, iv: Intervention, exc: type, field: str) -> None:
    with pytest.raises(exc) as info:
        compile_(engine, iv)
    assert str(info.value).startswith(field + ":") or getattr(info.value, "field", "") == field


def test_stale_fingerprint_and_duplicates(engine: Any) -> None:
    stale = Intervention(op=Op.ADD, value=1.0, feature=FeatureRef(SAE, 1, fingerprint="old"))
    with pytest.raises(FailedPrecondition, match=r"interventions\[0\]\.feature"):
        compile_(engine, stale)
    with pytest.raises(InvalidArgument, match=r"interventions\[1\]\.feature.*duplicates"):
        compile_(engine, feat(Op.ADD, 1, 1.0), feat(Op.CLAMP, 1, 2.0))
    v = torch.ones(D)
    with pytest.raises(InvalidArgument, match=r"interventions\[1\]\.vector"):
        compile_(
            engine,
            vec(Op.ADD, "blocks.1.hook_resid_pre", v, 1.0),
            vec(Op.SCALE, "blocks.1.hook_resid_pre", v, 2.0),
        )


def test_per_token_normalised_dictionary_refuses_feature_edits(engine: Any) -> None:
    class Fake:
        id, fingerprint, d_sae, per_token_normalization = "fake", "f", 4, True
        hook_name = hook_name_out = "blocks.0.hook_resid_post"
        is_transcoder = False
        cfg = type("C", (), {"normalize_activations": "layer_norm"})()

    with pytest.raises(InvalidArgument, match=r"interventions\[0\]\.feature"):
        interventions.compile_steering(
            [feat(Op.ADD, 1, 1.0, dict_id="fake")],
            {"fake": Fake()},
            hook_names=engine.steering_hooks(),
            d_model=D,
        )


def test_fingerprint_is_stable_and_specific(engine: Any) -> None:
    a = compile_(engine, feat(Op.ADD, 1, 1.0), feat(Op.ABLATE, 2))
    b = compile_(engine, feat(Op.ADD, 1, 1.0), feat(Op.ABLATE, 2))
    c = compile_(engine, feat(Op.ADD, 1, 1.5), feat(Op.ABLATE, 2))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert len(a.fingerprint) == 64 and compile_(engine).fingerprint == ""
    assert a.dictionaries == {SAE: engine.dictionaries[SAE].fingerprint}


# -- the hooked engine's HF hook mapping, checked at the hook and against TransformerLens


def _tl_reference(engine: Any, ids: torch.Tensor, hook: str, delta_fn: Any) -> torch.Tensor:
    """TransformerLens logits with ``delta_fn(pre_cache, x) -> δ`` added at ``hook``."""
    tl = engine.model
    with torch.no_grad():
        _, cache = tl.run_with_cache(ids)

        def add(x: torch.Tensor, hook: Any) -> torch.Tensor:
            return x + delta_fn(cache, x[0]).unsqueeze(0)

        return tl.run_with_hooks(ids, fwd_hooks=[(hook, add)])[0]  # [pos, vocab]


@pytest.mark.parametrize(
    "hook",
    [
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_attn_out",
        "blocks.1.hook_resid_mid",
        "blocks.1.ln2.hook_normalized",
        "blocks.1.hook_mlp_out",
        "blocks.0.hook_resid_post",
    ],
)
def test_hf_hook_mapping_matches_transformer_lens(engine: Any, hook: str) -> None:
    ids = torch.tensor([engine.tokenizer.encode("Steering the tiny model works.")])  # [1, P]
    v = rows(1, seed=11)[0]
    spec = compile_(engine, vec(Op.CLAMP, hook, v, 2.0))
    unit = v / v.norm()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    with HookSession(
        engine.hf_model, spec, prompt_len=ids.shape[1], special_ids=engine.tokenizer.special_ids
    ) as session:
        inner = session.process

        def spy(name: str, x: torch.Tensor) -> torch.Tensor | None:
            out = inner(name, x)
            if name == hook:
                seen.append((x[0].clone(), out[0].clone() if out is not None else x[0]))
            return out

        session.process = spy  # type: ignore[method-assign]
        with torch.no_grad():
            got = engine.hf_model(ids).logits[0]
    ((pre, post),) = seen
    special = torch.isin(ids[0], torch.tensor(sorted(engine.tokenizer.special_ids)))
    proj = pre @ unit
    want = pre + torch.where(special, 0.0, 2.0 - proj).unsqueeze(-1) * unit
    torch.testing.assert_close(post, want, atol=1e-5, rtol=0)  # x + δ at the hook

    def delta(cache: Any, x: torch.Tensor) -> torch.Tensor:
        p = x @ unit
        return torch.where(special, 0.0, 2.0 - p).unsqueeze(-1) * unit

    ref = _tl_reference(engine, ids, hook, delta)
    assert float((got - ref).abs().max()) < 1e-3
    with torch.no_grad():
        plain = engine.hf_model(ids).logits[0]
    assert float((plain - got).abs().max()) > 1e-2  # the edit did something


def test_hf_transcoder_edit_matches_transformer_lens(engine: Any) -> None:
    tc = engine.dictionaries[TC]
    ids = torch.tensor([engine.tokenizer.encode("A transcoder feature, clamped.")])
    with torch.no_grad():
        _, cache = engine.model.run_with_cache(ids)
    a = tc.encode(cache[tc.hook_name][0])
    i = int(a[1:].sum(0).argmax())
    spec = compile_(engine, feat(Op.CLAMP, i, 3.0, dict_id=TC))
    with (
        HookSession(
            engine.hf_model, spec, prompt_len=ids.shape[1], special_ids=engine.tokenizer.special_ids
        ),
        torch.no_grad(),
    ):
        got = engine.hf_model(ids).logits[0]

    def delta(cache: Any, x: torch.Tensor) -> torch.Tensor:
        act = tc.encode(cache[tc.hook_name][0])[:, i]
        step = (3.0 - act).unsqueeze(-1) * tc.W_dec[i]
        step[0] = 0  # BOS
        return step

    ref = _tl_reference(engine, ids, tc.hook_name_out, delta)
    assert float((got - ref).abs().max()) < 1e-3
