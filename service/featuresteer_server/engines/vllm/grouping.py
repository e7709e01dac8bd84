"""Row grouping for one vLLM forward: which rows of the flattened batch ``[T, d]`` belong to
which request, which of them are steered (grouped by steering-spec fingerprint) or traced, and
which hooks this step must visit (``build_step``). Each request's spec is compiled once
(``wire.compile_payload`` against the worker's dictionaries and the engine's bounds) and kept
until the request leaves the runner.

Reads vLLM's V1 model runner only: ``input_batch.req_ids``, ``query_start_loc.cpu`` (the row
ranges the attention metadata is built from), ``requests[req_id]`` (``prompt_token_ids``,
``sampling_params.extra_args``). Must not: edit activations, raise out of a forward for one
bad request (it becomes a fault of that request).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import Tensor

from featuresteer_server.engines.vllm import wire
from featuresteer_server.engines.vllm.state import (
    TRACE_TTL_S,
    Fault,
    Group,
    Step,
    TraceRead,
    TraceStore,
    WorkerState,
)
from featuresteer_server.interventions import SteeringSpec, hook_order

log = logging.getLogger(__name__)


def request_plan(
    st: WorkerState, req_id: str, request: Any
) -> tuple[SteeringSpec | None, TraceStore | None]:
    """(compiled spec or None: unsteered, trace store or None: untraced) of one request,
    built once."""
    if req_id in st.plans:
        return st.plans[req_id]
    spec: SteeringSpec | None = None
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    payload = extra.get(wire.EXTRA_KEY)
    if payload:
        key = str(payload.get("key") or req_id)
        try:
            spec = wire.compile_payload(
                payload, st.dictionaries, hook_names=st.hook_names, d_model=st.d_model,
                bounds=st.bounds,
            )  # fmt: skip
            if spec.empty:
                spec = None
            else:
                st.keys[req_id] = key
        except Exception:  # noqa: BLE001 - one bad request must not stop the batch
            # the engine validated it with the same dictionaries and bounds: a bug. The
            # request runs unsteered until the engine's next poll aborts it (INTERNAL)
            log.exception("request %s: steering spec failed to compile in the worker", req_id)
            st.stats["spec_errors_total"] += 1
            spec = None
            st.faults[key] = Fault(
                "interventions", "the vLLM worker could not compile the steering spec", req_id,
                internal=True,
            )  # fmt: skip
    trace = None
    trace_payload = extra.get(wire.TRACE_KEY)
    if trace_payload:
        try:
            plan = wire.decode_trace(trace_payload, st.dictionaries)
            key = str(trace_payload.get("key") or req_id)
            trace = st.traces.get(key)  # kept if the request comes back (preemption)
            if trace is None:
                trace = st.traces[key] = TraceStore(req_id=req_id, plan=plan)
            trace.req_id = req_id
        except Exception:  # noqa: BLE001 - one bad request must not stop the batch
            log.exception("request %s: trace plan failed to decode in the worker", req_id)
            st.stats["trace_errors_total"] += 1
    st.plans[req_id] = (spec, trace)
    return spec, trace


def sweep(st: WorkerState, runner: Any, n_scheduled: int) -> None:
    """Drop the state of requests that left the runner (plans), and, as a backstop, traces and
    faults the engine never polled finally (it always does)."""
    if len(st.plans) > 4 * n_scheduled + 64:
        live = set(runner.requests)
        for rid in [r for r in st.plans if r not in live]:
            del st.plans[rid]
            st.keys.pop(rid, None)
    now = time.monotonic()
    for key, fault in list(st.faults.items()):
        if fault.req_id not in runner.requests and now - fault.touched > TRACE_TTL_S:
            del st.faults[key]
    for key, store in list(st.traces.items()):
        if store.req_id not in runner.requests and now - store.touched > TRACE_TTL_S:
            del st.traces[key]
            st.plans.pop(store.req_id, None)


def build_step(st: WorkerState, runner: Any, positions: Tensor, input_ids: Tensor) -> Step | None:
    """The step of one forward (None: no request of it is steered or traced here).

    Args:
        positions: [T] the model's positions argument (absolute, chunked prefill included).
        input_ids: [T] token ids (the special-token mask).
    """
    req_ids: list[str] = list(runner.input_batch.req_ids)
    stats = st.stats
    stats["steps_total"] += 1
    sweep(st, runner, len(req_ids))
    n = len(req_ids)
    qsl: list[int] = runner.query_start_loc.cpu[: n + 1].tolist()
    if st.debug_capture is not None:
        st.capture_rows = (req_ids, qsl, positions[: qsl[-1]].tolist())
    by_fp: dict[str, list[int]] = {}
    spec_of: dict[str, SteeringSpec] = {}
    traced: list[tuple[int, TraceStore]] = []
    n_unsteered = 0
    for i, rid in enumerate(req_ids):
        spec, trace = request_plan(st, rid, runner.requests.get(rid))
        if trace is not None:
            traced.append((i, trace))
        if spec is None:
            n_unsteered += 1
            continue
        by_fp.setdefault(spec.fingerprint, []).append(i)
        spec_of[spec.fingerprint] = spec
    if not by_fp and not traced:
        return None
    if by_fp:
        stats["steered_steps_total"] += 1
        if len(by_fp) >= 2:
            stats["mixed_spec_steps_total"] += 1
        if n_unsteered:
            stats["mixed_steered_unsteered_steps_total"] += 1
        stats["max_specs_in_step"] = max(stats["max_specs_in_step"], len(by_fp))
    groups = [
        _group(st, runner, spec_of[fp], idxs, req_ids, qsl, positions, input_ids)
        for fp, idxs in by_fp.items()
    ]
    traces = trace_reads(runner, traced, req_ids, qsl, positions) if traced else []
    if traces:
        stats["traced_steps_total"] += 1
    hooks = {h for g in groups for h in (*g.spec.read_hooks, *g.spec.edit_hooks)}
    hooks |= {t.hook for t in traces}
    if not hooks:
        return None  # traced requests with no generated row in this step (prefill)
    # the isolation guard checks every layer's inputs from the first edited layer on
    guard_from = (
        min(hook_order(h)[0] for g in groups for h in g.spec.edit_hooks) if groups else None
    )
    stats["steered_rows_total"] += sum(len(g.rows) for g in groups)
    return Step(groups=groups, traces=traces, hooks=frozenset(hooks), guard_from=guard_from)


def _group(
    st: WorkerState,
    runner: Any,
    spec: SteeringSpec,
    idxs: list[int],
    req_ids: list[str],
    qsl: list[int],
    positions: Tensor,
    input_ids: Tensor,
) -> Group:
    """The rows of the requests ``idxs`` (indices into the step's requests) sharing ``spec``."""
    rows_l: list[int] = []
    plen_l: list[int] = []
    owners: list[tuple[str, int, int]] = []
    for i in idxs:
        request = runner.requests[req_ids[i]]
        n_rows = qsl[i + 1] - qsl[i]
        owners.append((st.keys.get(req_ids[i], req_ids[i]), len(rows_l), len(rows_l) + n_rows))
        rows_l.extend(range(qsl[i], qsl[i + 1]))
        plen_l.extend([len(request.prompt_token_ids or ())] * n_rows)
    rows = torch.tensor(rows_l, dtype=torch.long)  # [n]
    pos = positions.index_select(0, rows.to(positions.device)).to(torch.long).cpu()  # [n]
    ids = input_ids.index_select(0, rows.to(input_ids.device)).cpu()  # [n]
    return Group(
        spec=spec,
        rows=rows,
        positions=pos,
        prompt_len=torch.tensor(plen_l, dtype=torch.long),
        special=torch.isin(ids, st.special_ids),
        owners=owners,
    )


def trace_reads(
    runner: Any,
    traced: list[tuple[int, TraceStore]],
    req_ids: list[str],
    qsl: list[int],
    positions: Tensor,
) -> list[TraceRead]:
    """The rows of traced requests at positions >= their prompt length, grouped by the
    traced dictionary."""
    pos = positions[: qsl[-1]].to(torch.long).cpu()
    by_dict: dict[str, tuple[Any, list[int], list[int], list[tuple[TraceStore, int, int]]]] = {}
    for i, store in traced:
        plen = len(runner.requests[req_ids[i]].prompt_token_ids or ())
        a, b = qsl[i], qsl[i + 1]
        keep = (pos[a:b] >= plen).nonzero().flatten()
        if keep.numel() == 0:
            continue
        d = store.plan.dictionary
        _, rows, ps, owners = by_dict.setdefault(d.id, (d, [], [], []))
        start = len(rows)
        rows.extend((keep + a).tolist())
        ps.extend(pos[a:b][keep].tolist())
        owners.append((store, start, len(rows)))
    return [
        TraceRead(
            hook=d.hook_name,
            dictionary=d,
            rows=torch.tensor(rows, dtype=torch.long),
            positions=ps,
            owners=owners,
        )
        for d, rows, ps, owners in by_dict.values()
    ]
