"""No request may harm another (DESIGN.md "Engines"): the edit bounds of ``compile_steering``
checked against hand-computed limits, a grid of every op × values up to float32's max × raw
vectors whose norm overflows float32 × fp32/bf16 rows, and the run-time guards — the hooked
engine's (a NaN injected past validation aborts only that run) and the vLLM worker's (NaN
injected straight into its hooks: only the owning request's rows are zeroed and faulted, the
other rows come back bit-identical). The vLLM engine end to end: tests/e2e/test_vllm.py."""

from __future__ import annotations

import dataclasses
import math
import threading
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from featuresteer_server import domain, generation, interventions, planning
from featuresteer_server.domain import FeatureRef, Intervention, Op
from featuresteer_server.engines.hooked import HOOK_SCALE_TEXT
from featuresteer_server.engines.vllm import wire
from featuresteer_server.engines.vllm.worker import SteeringWorkerExtension
from featuresteer_server.errors import InvalidArgument
from tests.support import tiny_engine

pytestmark = pytest.mark.unit
SAE = "tiny/res-topk-128/blocks.1.hook_resid_post@v1"
HOOK = "blocks.1.hook_resid_post"
D = 64
F32_MAX = 3.4028235e38


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tiny_engine(tmp_path_factory.mktemp("dicts"))


def compile_(engine: Any, *ivs: Intervention, bounds: Any = "engine") -> Any:
    return interventions.compile_steering(
        ivs,
        engine.dictionaries,
        hook_names=engine.steering_hooks(),
        d_model=D,
        bounds=engine.edit_bounds if bounds == "engine" else bounds,
    )


def feat(op: Op, value: float, index: int = 3, **kw: Any) -> Intervention:
    return Intervention(op=op, value=value, feature=FeatureRef(SAE, index), **kw)


def vec(op: Op, values: list[float], value: float = 1.0, **kw: Any) -> Intervention:
    return Intervention(op=op, value=value, vector=domain.VectorTarget(HOOK, tuple(values)), **kw)


def apply_rows(spec: Any, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    return interventions.apply(
        spec,
        HOOK,
        x,
        positions=torch.arange(1, n + 1),
        prompt_len=2,
        special=torch.zeros(n, dtype=torch.bool),
        captured={},
    )


# -- the bounds, against hand-computed limits


def test_hook_scales_are_the_median_norm_at_each_hook(engine: Any) -> None:
    scales = engine.edit_bounds.hook_scales
    assert set(scales) == set(engine.steering_hooks())
    ids = engine.tokenizer.encode(HOOK_SCALE_TEXT, True)
    _, cache = engine.model.run_with_cache(torch.tensor([ids]))
    keep = [i for i, t in enumerate(ids) if t not in engine.tokenizer.special_ids]
    want = float(cache[HOOK][0, keep].norm(dim=-1).median())
    assert scales[HOOK] == pytest.approx(want, rel=1e-5)
    assert engine.edit_bounds.max_ratio == interventions.DEFAULT_MAX_EDIT_RATIO


def test_feature_add_limit_is_ratio_times_scale_over_decoder_norm(engine: Any) -> None:
    d = engine.dictionaries[SAE]
    limit = engine.edit_bounds.max_ratio * engine.edit_bounds.hook_scales[HOOK]
    s_max = limit / float(d.decoder_direction(3).double().norm())
    compile_(engine, feat(Op.ADD, 0.99 * s_max))
    compile_(engine, feat(Op.CLAMP, -0.99 * s_max))
    for op in (Op.ADD, Op.CLAMP):
        with pytest.raises(InvalidArgument) as e:
            compile_(engine, feat(op, 1.01 * s_max))
        assert e.value.field == "interventions[0].value"
        assert "max_edit_norm_ratio" in e.value.reason


def test_ratio_ops_and_vector_limits(engine: Any) -> None:
    r = engine.edit_bounds.max_ratio
    limit = r * engine.edit_bounds.hook_scales[HOOK]
    compile_(engine, feat(Op.SCALE, r), feat(Op.ADD, -r, index=4, normalize=True))
    for iv in (feat(Op.SCALE, -1.01 * r), feat(Op.ADD, 1.01 * r, normalize=True)):
        with pytest.raises(InvalidArgument, match=r"interventions\[0\]\.value"):
            compile_(engine, iv)
    v = [2.0] + [0.0] * (D - 1)  # ‖v‖ = 2
    compile_(engine, vec(Op.ADD, v, 0.99 * limit / 2))
    compile_(engine, vec(Op.CLAMP, v, 0.99 * limit))
    for iv in (vec(Op.ADD, v, 1.01 * limit / 2), vec(Op.CLAMP, v, 1.01 * limit)):
        with pytest.raises(InvalidArgument, match=r"interventions\[0\]\.value"):
            compile_(engine, iv)


def test_absolute_value_cap_holds_without_bounds(engine: Any) -> None:
    for value in (1e7, F32_MAX, -F32_MAX):
        with pytest.raises(InvalidArgument, match=r"interventions\[0\]\.value"):
            compile_(engine, feat(Op.ADD, value), bounds=None)
    # the request: a finite float32 ADD of 3.4e38 to a residual SAE feature
    with pytest.raises(InvalidArgument, match=r"interventions\[0\]\.value"):
        compile_(engine, feat(Op.ADD, F32_MAX, index=5))
    with pytest.raises(InvalidArgument, match=r"interventions\[0\]\.when\.above"):
        compile_(engine, feat(Op.ADD, 1.0, when=domain.Condition(FeatureRef(SAE, 1), 1e30)))


VALUES = [1e4, 1e6, 1e10, 1e20, 1e30, F32_MAX]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", list(Op))
@pytest.mark.parametrize("target", ["feature", "vector", "huge-vector"])
def test_grid_every_accepted_edit_is_finite_and_bounded(
    engine: Any, dtype: torch.dtype, op: Op, target: str
) -> None:
    """Every op × |value| from 1e4 to float32's max × (feature, vector, vector whose
    components are finite but whose float32 norm overflows) × dtype: either INVALID_ARGUMENT
    naming the field before any work, or a finite result that adds at most the bound."""
    bounds = engine.edit_bounds
    limit = bounds.max_ratio * bounds.hook_scales[HOOK]
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(0)) * 3  # [n, d]
    gen = torch.Generator().manual_seed(1)
    for value in (*VALUES, *(-v for v in VALUES), 0.5):
        if target == "feature":
            iv = feat(op, value)
        elif target == "vector":
            iv = vec(op, torch.randn(D, generator=gen).tolist(), value)
        else:
            iv = vec(op, [F32_MAX / 2] * D, value)  # ‖v‖ ≈ 1.4e39: inf in float32
        try:
            spec = compile_(engine, iv)
        except InvalidArgument as exc:
            assert exc.field in ("interventions[0].value", "interventions[0].vector.values")
            continue
        out = apply_rows(spec, x.to(dtype))
        assert out.dtype == dtype
        assert bool(torch.isfinite(out).all()), (op, target, value)
        added = (out.float() - x.to(dtype).float()).norm(dim=-1)  # [n]
        # SCALE/ADD-normalize are bounded relative to the row itself, the rest absolutely
        own = x.float().norm(dim=-1) * (bounds.max_ratio + 1)
        assert bool((added <= torch.maximum(own, torch.full_like(own, limit)) * 1.01).all())
    if target == "huge-vector" and op is not Op.ADD:
        # only the direction of such a vector is used: accepted, and exactly along v̂
        spec = compile_(engine, vec(op, [F32_MAX / 2] * D, 0.5))
        out = apply_rows(spec, x)
        unit = torch.full((D,), 1 / math.sqrt(D))
        resid = (out - x) - ((out - x) @ unit).unsqueeze(-1) * unit
        assert float(resid.abs().max()) < 1e-4


# -- the hooked engine's run-time guard


def _nan_spec(engine: Any) -> Any:
    """A valid spec whose vector is then replaced by NaN: past every validation."""
    spec = compile_(engine, vec(Op.ADD, [0.1] * D, 1.0))
    (e,) = spec.edits
    bad = dataclasses.replace(e, vector=torch.full((D,), float("nan")))
    return interventions._build((bad,), spec.fingerprint, spec.dictionaries)


def _greedy(engine: Any, spec: Any, ids: list[int], n: int = 4) -> list[int]:
    plan = planning.RunPlan(prompt_ids=ids, spec=spec, max_new_tokens=n)
    out: list[int] = []

    def emit(chunk: domain.GenerateChunk) -> None:
        if chunk.token is not None:
            out.append(chunk.token.id)

    generation.Generator(engine.hf_model, engine.tokenizer).run(plan, emit, threading.Event())
    return out


def test_hooked_guard_aborts_the_poisoned_run_only(engine: Any) -> None:
    ids = engine.tokenizer.encode("The capital of France is", True)
    before = _greedy(engine, interventions.SteeringSpec(), ids)
    with pytest.raises(InvalidArgument) as e:
        _greedy(engine, _nan_spec(engine), ids)
    assert e.value.field == "interventions[0]"
    assert HOOK in e.value.reason and "non-finite" in e.value.reason
    assert _greedy(engine, interventions.SteeringSpec(), ids) == before


# -- the vLLM worker's guard, driven without vLLM


class _Runner:
    """The parts of vLLM's V1 model runner the worker hooks read."""

    def __init__(self, reqs: dict[str, tuple[list[int], dict[str, Any] | None]]) -> None:
        self.requests = {
            rid: SimpleNamespace(
                prompt_token_ids=prompt,
                sampling_params=SimpleNamespace(extra_args=extra),
            )
            for rid, (prompt, extra) in reqs.items()
        }
        self.input_batch = SimpleNamespace(req_ids=list(reqs))
        n = [len(p) for p, _ in reqs.values()]
        qsl = torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32)
        self.query_start_loc = SimpleNamespace(cpu=qsl)


def _worker(engine: Any, runner: _Runner) -> SteeringWorkerExtension:
    ext = SteeringWorkerExtension()
    ext.model_runner = runner  # type: ignore[attr-defined]
    fs = ext._fs()
    fs.dictionaries = engine.dictionaries
    fs.special_ids = torch.tensor(sorted(engine.tokenizer.special_ids), dtype=torch.long)
    fs.hook_names = engine.steering_hooks()
    fs.d_model = D
    fs.bounds = engine.edit_bounds
    return ext


def test_worker_guard_zeroes_and_faults_only_the_owning_request(engine: Any) -> None:
    items = (vec(Op.ADD, [0.1] * D, 2.0),)
    spec = compile_(engine, *items)
    payload = {k: wire.encode_interventions(items, spec.fingerprint, k) for k in ("a", "b")}
    prompts = {"a": [5, 6, 7], "b": [8, 9], "c": [10, 11, 12, 13]}
    runner = _Runner(
        {
            "a-int": (prompts["a"], {wire.EXTRA_KEY: payload["a"]}),
            "b-int": (prompts["b"], {wire.EXTRA_KEY: payload["b"]}),
            "c-int": (prompts["c"], None),  # unsteered
        }
    )
    ext = _worker(engine, runner)
    ids = torch.tensor(prompts["a"] + prompts["b"] + prompts["c"])
    positions = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3])
    ext._fs_on_step(None, (), {"input_ids": ids, "positions": positions})
    step = ext._fs().step
    assert step is not None and step.guard_from == 1
    hidden = torch.randn(9, D, generator=torch.Generator().manual_seed(0))
    residual = torch.randn(9, D, generator=torch.Generator().manual_seed(1))
    hidden[0, 3] = float("nan")  # request a's first row, past validation, before its edit
    new_hidden, new_residual = ext._fs_layer_post(1)(None, (), (hidden, residual))
    # a's NaN row: the edit gave NaN, written as (0, 0); every steered row is finite now
    assert torch.equal(new_hidden[0], torch.zeros(D)) and torch.equal(
        new_residual[0], torch.zeros(D)
    )
    assert bool(torch.isfinite(new_hidden[:5]).all()) and bool(torch.isfinite(new_residual).all())
    # c: untouched, bit-identical
    assert torch.equal(new_hidden[5:], hidden[5:]) and torch.equal(new_residual[5:], residual[5:])
    polled = ext.fs_poll(["a", "b", "c"])
    assert set(polled["faults"]) == {"a"}
    fld, reason, internal = polled["faults"]["a"]
    assert fld == "interventions[0]" and HOOK in reason and internal is False

    # downstream of every edit: an infinity in b's rows at layer 2's input (the KV write)
    later = new_hidden.clone()
    later[4, 0] = float("inf")
    res = ext._fs_layer_pre(2)(None, (positions, later, new_residual))
    assert res is not None
    _, h2, r2 = res
    assert torch.equal(h2[4], torch.zeros(D)) and torch.equal(r2[4], torch.zeros(D))
    assert torch.equal(h2[:4], later[:4]) and torch.equal(r2[:4], new_residual[:4])
    assert torch.equal(h2[5:], later[5:]) and torch.equal(r2[5:], new_residual[5:])
    # the attention's input (what keys and values are computed from), passed by keyword as
    # vLLM's Llama does: b's NaN row is zeroed; c's row is not the guard's to read or write
    normed = torch.randn(9, D)
    normed[3, 1] = float("nan")
    normed[6, 1] = float("nan")
    _, kw = ext._fs_attn_pre(2)(None, (), {"positions": positions, "hidden_states": normed})
    got = kw["hidden_states"]
    assert torch.equal(got[3], torch.zeros(D)) and torch.equal(got[:3], normed[:3])
    assert torch.equal(got[4:6], normed[4:6]) and bool(got[6].isnan().any())
    faults = ext.fs_poll(["a", "b", "c"], final=True)["faults"]
    assert set(faults) == {"a", "b"}
    assert "blocks.2.hook_resid_pre" in faults["b"][1]
    assert ext.fs_poll(["a", "b"])["faults"] == {}  # the final poll dropped them
    assert ext.fs_stats()["nonfinite_requests_total"] == 2


def test_worker_guard_leaves_finite_steps_alone(engine: Any) -> None:
    items = (vec(Op.ADD, [0.1] * D, 2.0),)
    spec = compile_(engine, *items)
    runner = _Runner(
        {
            "a-int": (
                [5, 6],
                {wire.EXTRA_KEY: wire.encode_interventions(items, spec.fingerprint, "a")},
            )
        }
    )
    ext = _worker(engine, runner)
    ext._fs_on_step(None, (), {"input_ids": torch.tensor([5, 6]), "positions": torch.arange(2)})
    hidden, residual = torch.randn(2, D), torch.randn(2, D)
    assert ext._fs_layer_pre(3)(None, (torch.arange(2), hidden, residual)) is None
    assert ext._fs_final_norm_pre(None, (hidden, residual)) is None
    assert ext.fs_poll(["a"])["faults"] == {}


def test_worker_compile_failure_is_an_internal_fault_not_silently_unsteered(engine: Any) -> None:
    items = (vec(Op.ADD, [0.1] * D, 2.0),)
    spec = compile_(engine, *items)
    payload = wire.encode_interventions(items, "not-the-fingerprint", "a")
    assert spec.fingerprint != payload["fingerprint"]
    ext = _worker(engine, _Runner({"a-int": ([5, 6], {wire.EXTRA_KEY: payload})}))
    ext._fs_on_step(None, (), {"input_ids": torch.tensor([5, 6]), "positions": torch.arange(2)})
    fld, _, internal = ext.fs_poll(["a"], final=True)["faults"]["a"]
    assert internal is True and fld == "interventions"
