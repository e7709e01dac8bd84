"""Generate's sampling ranges (convert.py) against vLLM's own SamplingParams checks: every
value convert accepts builds the vLLM engine's SamplingParams, and the values it refuses are
ones vLLM refuses too (a temperature above 2 was INTERNAL on the vLLM engine). No engine is
started: only vLLM's parameter validation runs."""

from __future__ import annotations

from typing import Any, cast

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

from featuresteer.v1 import featuresteer_pb2 as pb  # noqa: E402
from featuresteer_server import convert, interventions, planning  # noqa: E402
from featuresteer_server.config import load_config  # noqa: E402
from featuresteer_server.engines.vllm.engine import VllmEngine  # noqa: E402
from featuresteer_server.errors import InvalidArgument  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]
LIMITS = load_config().limits()

ACCEPTED = [
    dict(temperature=2.0),
    dict(temperature=1e-30),  # raised to 0.01, as vLLM does
    dict(temperature=0.7, top_p=1e-6),
    dict(temperature=0.7, top_p=1.0, top_k=2**32 - 1),
    dict(temperature=0.7, repetition_penalty=3.0e38),
    dict(temperature=0.7, repetition_penalty=1e-30),
    dict(temperature=0.7, seed=2**64 - 1),
    dict(max_new_tokens=LIMITS.max_new_tokens, seed=0),
]
REFUSED = [
    dict(temperature=2.0001),
    dict(temperature=float("inf")),
    dict(temperature=float("nan")),
    dict(temperature=-1.0),
    dict(temperature=0.7, top_p=1.01),
    dict(temperature=0.7, repetition_penalty=float("inf")),
    dict(temperature=0.7, repetition_penalty=-1.0),
]


def _params(fields: dict[str, Any]) -> Any:
    req = convert.generate_request_from_pb(pb.GenerateRequest(prompt="a", **fields), LIMITS)
    plan = planning.RunPlan(
        prompt_ids=[1],
        spec=interventions.SteeringSpec(),
        max_new_tokens=req.max_new_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed or 0,
    )
    # the engine's own mapping onto SamplingParams (it does not touch the engine instance)
    return VllmEngine.sampling_params(cast(Any, None), plan, ())


@pytest.mark.parametrize("fields", ACCEPTED)
def test_accepted_ranges_build_vllm_sampling_params(fields: dict[str, Any]) -> None:
    params = _params(fields)
    assert isinstance(params, SamplingParams)


@pytest.mark.parametrize("fields", REFUSED)
def test_refused_ranges_are_refused_by_vllm_too(fields: dict[str, Any]) -> None:
    with pytest.raises(
        InvalidArgument, match=next(iter(fields.keys() - {"temperature"}), "temperature")
    ):
        convert.generate_request_from_pb(pb.GenerateRequest(prompt="a", **fields), LIMITS)
    with pytest.raises(VLLMValidationError):
        SamplingParams(**{"temperature": 0.7, **fields})
