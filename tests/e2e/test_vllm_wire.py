"""The steering payload that travels in SamplingParams.extra_args: a JSON round trip compiles to
the same spec fingerprint, and the prefix-cache salt separates specs (no vLLM needed)."""

from __future__ import annotations

import json

import pytest

from featuresteer_server import domain, interventions, planning
from featuresteer_server.engines.vllm import wire

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]


class _Dict:  # the attributes compile_steering reads
    id = "d@v1"
    fingerprint = "f" * 16
    d_sae = 32
    per_token_normalization = False
    is_transcoder = False
    hook_name = hook_name_out = "blocks.1.hook_resid_post"


HOOKS = interventions.steerable_hooks(2)


def items() -> tuple[domain.Intervention, ...]:
    ref = domain.FeatureRef("d@v1", 3, "f" * 16)
    return (
        domain.Intervention(domain.Op.ADD, 2.5, feature=ref, normalize=True),
        domain.Intervention(
            domain.Op.CLAMP, -1.0,
            vector=domain.VectorTarget("blocks.1.hook_resid_post", tuple(map(float, range(8)))),
            apply_to=domain.ApplyTo.GENERATED,
            when=domain.Condition(domain.FeatureRef("d@v1", 4), 0.25),
        ),
        domain.Intervention(
            domain.Op.ABLATE, feature=domain.FeatureRef("d@v1", 5), positions=(1, 4)
        ),
    )  # fmt: skip


def test_payload_round_trip_keeps_fingerprint() -> None:
    dicts = {"d@v1": _Dict()}
    spec = interventions.compile_steering(items(), dicts, hook_names=HOOKS, d_model=8)
    payload = json.loads(json.dumps(wire.encode_interventions(items(), spec.fingerprint)))
    assert wire.decode_interventions(payload) == items()
    again = wire.compile_payload(payload, dicts, hook_names=HOOKS, d_model=8)
    assert again.fingerprint == spec.fingerprint
    payload["fingerprint"] = "0" * 64
    with pytest.raises(RuntimeError):
        wire.compile_payload(payload, dicts, hook_names=HOOKS, d_model=8)


def test_cache_salt() -> None:
    dicts = {"d@v1": _Dict()}
    spec = interventions.compile_steering(items(), dicts, hook_names=HOOKS, d_model=8)
    assert wire.cache_salt(interventions.SteeringSpec(), (), 10) is None
    scoped = wire.cache_salt(spec, items(), 10)
    assert scoped == f"fs:{spec.fingerprint}:10" != wire.cache_salt(spec, items(), 11)
    only_all = items()[:1]
    spec1 = interventions.compile_steering(only_all, dicts, hook_names=HOOKS, d_model=8)
    assert wire.cache_salt(spec1, only_all, 10) == wire.cache_salt(spec1, only_all, 11)


def test_trace_payload_round_trip() -> None:
    d = _Dict()
    plan = planning.TracePlan(dictionary=d, top_k=5, features=(3, 7))
    payload = json.loads(json.dumps(wire.encode_trace(plan, "fs-abc")))
    assert payload["key"] == "fs-abc"
    again = wire.decode_trace(payload, {"d@v1": d})
    assert again == plan
    with pytest.raises(RuntimeError):  # the worker holds a different dictionary
        wire.decode_trace({**payload, "fingerprint": "0" * 16}, {"d@v1": d})
    with pytest.raises(ValueError):
        wire.decode_trace({**payload, "features": [32]}, {"d@v1": d})
