"""How a request's steering travels from the engine to vLLM's worker: the domain
interventions as plain JSON-able data in ``SamplingParams.extra_args[EXTRA_KEY]`` (vLLM
serialises extra_args with msgspec between processes, so no tensors or dataclasses), plus the
fingerprint the engine computed, which the worker's own compilation must reproduce.

Also owns the prefix-cache salt: KV computed under one steering spec must never serve a
request under another, so steered requests carry ``cache_salt`` = spec fingerprint (plus the
prompt length when an edit is scoped by PROMPT/GENERATED, since the same token at the same
position is then edited or not depending on where the prompt ended). Unsteered requests carry
no salt and share the cache among themselves.

A per-token trace travels beside the steering, in ``extra_args[TRACE_KEY]``: the traced
dictionary's id and fingerprint, ``top_k``, the chosen feature indices and the key the engine
fetches the traces by. It changes no
activation, so it takes no part in the spec fingerprint or the cache salt.

Must not: import vLLM (the engine imports it lazily; this module is unit-testable without it).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from featuresteer_server import domain, interventions, planning

EXTRA_KEY = "featuresteer"
TRACE_KEY = "featuresteer_trace"
WIRE_VERSION = 1


def _ref(ref: domain.FeatureRef) -> dict[str, Any]:
    return {"dictionary_id": ref.dictionary_id, "index": int(ref.index), "fp": ref.fingerprint}


def _unref(d: Mapping[str, Any]) -> domain.FeatureRef:
    return domain.FeatureRef(d["dictionary_id"], int(d["index"]), d.get("fp") or None)


def encode_interventions(
    items: Sequence[domain.Intervention], fingerprint: str, key: str = ""
) -> dict[str, Any]:
    """Domain interventions -> the JSON-able payload put in extra_args. ``key`` (the
    engine's request id) names the request's faults in the worker (``worker.fs_poll``); like
    the trace it takes no part in the fingerprint."""
    out = []
    for iv in items:
        item: dict[str, Any] = {
            "op": iv.op.value,
            "value": float(iv.value),
            "normalize": bool(iv.normalize),
            "apply_to": iv.apply_to.value,
            "positions": [int(p) for p in iv.positions],
        }
        if iv.feature is not None:
            item["feature"] = _ref(iv.feature)
        if iv.vector is not None:
            item["vector"] = {
                "hook_name": iv.vector.hook_name,
                "values": [float(v) for v in iv.vector.values],
            }
        if iv.when is not None:
            item["when"] = {"feature": _ref(iv.when.feature), "above": float(iv.when.above)}
        out.append(item)
    return {"v": WIRE_VERSION, "fingerprint": fingerprint, "key": key, "interventions": out}


def decode_interventions(payload: Mapping[str, Any]) -> tuple[domain.Intervention, ...]:
    if payload.get("v") != WIRE_VERSION:
        raise ValueError(f"steering payload version {payload.get('v')!r} != {WIRE_VERSION}")
    out = []
    for item in payload["interventions"]:
        vec = item.get("vector")
        when = item.get("when")
        out.append(
            domain.Intervention(
                op=domain.Op(item["op"]),
                value=float(item["value"]),
                feature=_unref(item["feature"]) if item.get("feature") else None,
                vector=(
                    domain.VectorTarget(vec["hook_name"], tuple(float(v) for v in vec["values"]))
                    if vec
                    else None
                ),
                normalize=bool(item["normalize"]),
                apply_to=domain.ApplyTo(item["apply_to"]),
                positions=tuple(int(p) for p in item["positions"]),
                when=(
                    domain.Condition(_unref(when["feature"]), float(when["above"]))
                    if when
                    else None
                ),
            )
        )
    return tuple(out)


def compile_payload(
    payload: Mapping[str, Any],
    dictionaries: Mapping[str, Any],
    *,
    hook_names: Collection[str],
    d_model: int,
    bounds: interventions.EditBounds | None = None,
) -> interventions.SteeringSpec:
    """The worker's compilation (with the engine's ``bounds``); refuses a spec whose
    fingerprint differs from the engine's (the two processes hold different dictionaries: a
    deployment bug, never silent)."""
    spec = interventions.compile_steering(
        decode_interventions(payload),
        dictionaries,
        hook_names=hook_names,
        d_model=d_model,
        bounds=bounds,
    )
    if spec.fingerprint != payload.get("fingerprint", spec.fingerprint):
        raise RuntimeError(
            f"worker spec fingerprint {spec.fingerprint} != engine's {payload['fingerprint']}"
        )
    return spec


def encode_trace(plan: planning.TracePlan, key: str) -> dict[str, Any]:
    """A request's trace plan -> the JSON-able payload put in extra_args[TRACE_KEY]; ``key``
    (the engine's request id) names the request's traces in the worker, whose own id for it
    is vLLM's internal one."""
    return {
        "v": WIRE_VERSION,
        "key": key,
        "dictionary_id": plan.dictionary.id,
        "fingerprint": plan.dictionary.fingerprint,
        "top_k": int(plan.top_k),
        "features": [int(i) for i in plan.features],
    }


def decode_trace(payload: Mapping[str, Any], dictionaries: Mapping[str, Any]) -> planning.TracePlan:
    """The worker's side: the same plan on its own copy of the dictionary; refuses a
    dictionary whose fingerprint differs from the engine's, like ``compile_payload``."""
    if payload.get("v") != WIRE_VERSION:
        raise ValueError(f"trace payload version {payload.get('v')!r} != {WIRE_VERSION}")
    d = dictionaries[payload["dictionary_id"]]
    if d.fingerprint != payload["fingerprint"]:
        raise RuntimeError(
            f"trace dictionary {d.id}: worker fingerprint {d.fingerprint} != "
            f"engine's {payload['fingerprint']}"
        )
    features = tuple(int(i) for i in payload["features"])
    if any(not 0 <= i < d.d_sae for i in features):
        raise ValueError(f"trace features outside [0, {d.d_sae})")
    return planning.TracePlan(dictionary=d, top_k=int(payload["top_k"]), features=features)


def cache_salt(
    spec: interventions.SteeringSpec, items: Sequence[domain.Intervention], prompt_len: int
) -> str | None:
    """Prefix-cache salt for a request (None: unsteered, share freely)."""
    if spec.empty:
        return None
    scoped = any(iv.apply_to is not domain.ApplyTo.ALL and not iv.positions for iv in items)
    return f"fs:{spec.fingerprint}:{prompt_len}" if scoped else f"fs:{spec.fingerprint}"
