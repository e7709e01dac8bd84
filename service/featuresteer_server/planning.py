"""Request planning for Generate, one module both generation engines call: a domain
request -> its run plans (prompt token ids, compiled and bounded steering, sampling, the
per-token trace; the steered run, then the baseline with ``compare_baseline``) and its
provenance. ``plan_generate`` validates everything that needs the model or the dictionaries,
so a bad request fails with the right status before any engine work.

``PlanContext`` is what planning needs from the served model, built once at bootstrap and
shared by the engines: the dictionary table (the same mapping the engine serves from), the
tokenizer, the steerable hooks, widths and limits, the edit bounds and the model's identity.

Must not: run a model, import an engine, parse protobuf. ``plan_generate`` tokenizes the
prompt: callers run it off the event loop.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from featuresteer_server import __version__, domain, interventions
from featuresteer_server.errors import InvalidArgument, feature_dictionary, pinned_dictionary
from featuresteer_server.interventions import EditBounds, SteeringSpec
from featuresteer_server.tokenization import Tokenizer


@dataclass(frozen=True)
class TracePlan:
    """What to report per generated token: ``top_k`` of ``dictionary`` and/or ``features``."""

    dictionary: Any
    top_k: int
    features: tuple[int, ...] = ()

    def report(self, acts: Tensor) -> list[tuple[tuple[int, float], ...]]:
        """[n, d_sae] float32 -> per row (index, activation) pairs: the top-k active features
        (activation > 0), then the chosen features not already listed (even at 0)."""
        out: list[tuple[tuple[int, float], ...]] = []
        top_v = top_i = None
        if self.top_k > 0:
            top_v, top_i = torch.topk(acts, min(self.top_k, acts.shape[-1]), dim=-1)
        for r in range(acts.shape[0]):
            pairs: list[tuple[int, float]] = []
            if top_v is not None and top_i is not None:
                pairs = [
                    (int(i), float(v))
                    for i, v in zip(top_i[r].tolist(), top_v[r].tolist(), strict=True)
                    if v > 0
                ]
            have = {i for i, _ in pairs}
            pairs += [(i, float(acts[r, i])) for i in self.features if i not in have]
            out.append(tuple(pairs))
        return out


@dataclass
class RunPlan:
    """One generation run (the steered one, or the baseline with an empty spec)."""

    prompt_ids: list[int]
    spec: SteeringSpec
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    trace: TracePlan | None = None
    baseline: bool = False


@dataclass(frozen=True)
class PlanContext:
    """What planning needs from the served model (module docstring).

    Attributes:
        dictionaries: id -> loaded dictionary (shared with the engine that serves them).
        tokenizer: the one tokenizer module's wrapper.
        steering_hooks: hooks generation can read and edit, forward order.
        d_model: width of every steerable hook.
        n_ctx: the model's context length (prompt + new tokens must fit).
        max_tokens: the most prompt tokens a request may have.
        bounds: what one edit may add (``interventions.EditBounds``).
        model_name, weights_hash: the model's identity, for provenance.
    """

    dictionaries: Mapping[str, Any]
    tokenizer: Tokenizer
    steering_hooks: tuple[str, ...]
    d_model: int
    n_ctx: int
    max_tokens: int
    bounds: EditBounds
    model_name: str
    weights_hash: str

    def provenance(
        self, engine: str, dtype: str, dicts: Any = (), **extra: Any
    ) -> domain.Provenance:
        """Provenance of a response computed by ``engine`` in ``dtype`` with ``dicts``."""
        return domain.Provenance(
            model_name=self.model_name,
            model_weights_hash=self.weights_hash,
            engine=engine,
            dtype=dtype,
            dictionary_fingerprints={d.id: d.fingerprint for d in dicts},
            server_version=__version__,
            request_id=extra.pop("request_id", "") or uuid.uuid4().hex,
            **extra,
        )


def prompt_ids(req: domain.GenerateRequest, ctx: PlanContext) -> list[int]:
    """The prompt's token ids (chat template for ``messages``), within the limits."""
    if req.messages:
        ids = ctx.tokenizer.apply_chat_template(req.messages)
        field = "messages"
    else:
        ids = ctx.tokenizer.encode(req.prompt or "", req.prepend_bos)
        field = "prompt"
    if not ids:
        raise InvalidArgument(field, "no tokens (empty prompt and prepend_bos false)")
    if len(ids) > ctx.max_tokens:
        raise InvalidArgument(field, f"{len(ids)} tokens > max_tokens_per_input {ctx.max_tokens}")
    if len(ids) + req.max_new_tokens > ctx.n_ctx:
        raise InvalidArgument(
            "max_new_tokens",
            f"{len(ids)} prompt tokens + {req.max_new_tokens} > the model's context {ctx.n_ctx}",
        )
    return ids


def trace_plan(spec: domain.TraceSpec | None, ctx: PlanContext) -> TracePlan | None:
    """The per-token trace of a request (None: untraced), checked against the dictionaries."""
    if spec is None or (not spec.dictionary_id and not spec.features):
        return None
    dict_id = spec.dictionary_id or spec.features[0].dictionary_id
    d = pinned_dictionary(ctx.dictionaries, dict_id, "trace.dictionary_id")
    for i, ref in enumerate(spec.features):
        if ref.dictionary_id != d.id:
            raise InvalidArgument(
                f"trace.features[{i}].dictionary_id",
                f"traced features must all be in the traced dictionary {d.id!r}",
            )
        feature_dictionary(
            ctx.dictionaries, ref.dictionary_id, ref.index, ref.fingerprint, f"trace.features[{i}]"
        )
    if spec.top_k == 0 and not spec.features:
        raise InvalidArgument("trace.top_k", "set top_k or features to trace")
    return TracePlan(dictionary=d, top_k=spec.top_k, features=tuple(f.index for f in spec.features))


def plan_generate(
    req: domain.GenerateRequest, ctx: PlanContext, *, engine: str, dtype: str
) -> tuple[list[RunPlan], domain.Provenance]:
    """The run plans (steered, then the baseline when asked) and provenance of a request,
    validated against ``ctx``; ``engine``/``dtype`` go into the provenance."""
    spec = interventions.compile_steering(
        req.interventions,
        ctx.dictionaries,
        hook_names=ctx.steering_hooks,
        d_model=ctx.d_model,
        bounds=ctx.bounds,
    )
    trace = trace_plan(req.trace, ctx)
    prompt = prompt_ids(req, ctx)
    seed = req.seed if req.seed is not None else secrets.randbits(63)

    def plan(run_spec: SteeringSpec, baseline: bool) -> RunPlan:
        return RunPlan(
            prompt_ids=prompt,
            spec=run_spec,
            max_new_tokens=req.max_new_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            repetition_penalty=req.repetition_penalty,
            seed=seed,
            stop=req.stop,
            logprobs=req.logprobs,
            trace=trace,
            baseline=baseline,
        )

    plans = [plan(spec, False)]
    if req.compare_baseline:
        plans.append(plan(SteeringSpec(), True))
    used = {d_id: ctx.dictionaries[d_id] for d_id in spec.dictionaries}
    if trace is not None:
        used[trace.dictionary.id] = trace.dictionary
    prov = ctx.provenance(
        engine, dtype, used.values(), seed=seed, steering_spec_fingerprint=spec.fingerprint
    )
    return plans, prov
