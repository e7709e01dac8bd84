"""The vLLM worker's typed state: what the steering extension keeps between forwards (per
request: compiled spec, trace store, fault) and what one forward's hooks share (``Step``).

Owned by ``worker.SteeringWorkerExtension`` (one ``WorkerState`` per worker); filled by
``grouping.build_step`` once per forward. Must not: import vLLM, the engine, gRPC or asyncio.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from featuresteer_server.dictionaries import Dictionary
from featuresteer_server.interventions import EditBounds, SteeringSpec
from featuresteer_server.planning import TracePlan

TRACE_TTL_S = 120.0  # traces/faults of a request gone from the runner that nobody polled


@dataclass
class Group:
    """Rows of one forward that share one steering spec."""

    spec: SteeringSpec
    rows: Tensor  # [n] int64 row indices into the flattened batch
    positions: Tensor  # [n] int64 absolute positions
    prompt_len: Tensor  # [n] int64
    special: Tensor  # [n] bool
    owners: list[tuple[str, int, int]] = field(default_factory=list)  # (key, start, end)
    captured: dict[str, Tensor] = field(default_factory=dict)  # hook -> [n, d] pre-edit


@dataclass
class TraceStore:
    """One traced request: its plan and the reports captured until the engine polls them."""

    req_id: str  # vLLM's internal id (the runner's key)
    plan: TracePlan  # on the worker's copy of the dictionary
    rows: dict[int, list[Any]] = field(default_factory=dict)  # position -> [[index, act]...]
    touched: float = field(default_factory=time.monotonic)


@dataclass
class TraceRead:
    """Rows of one forward at positions >= their prompt length, of the traced requests that
    trace one dictionary (one encoding for all of them, one report per request)."""

    hook: str  # the dictionary's input hook
    dictionary: Dictionary
    rows: Tensor  # [n] int64 row indices into the flattened batch
    positions: list[int]  # [n] absolute positions
    owners: list[tuple[TraceStore, int, int]]  # (request, start, end): slices of rows


@dataclass
class Step:
    """What every hook of one forward needs: the steered groups and the trace reads."""

    groups: list[Group]
    traces: list[TraceRead] = field(default_factory=list)
    hooks: frozenset[str] = frozenset()  # every hook a group reads/edits or a trace reads
    guard_from: int | None = None  # first layer whose inputs the finiteness guard checks


@dataclass
class Fault:
    """A request whose steered rows went non-finite (or whose spec failed to compile here):
    the error the engine answers it with."""

    field_name: str
    reason: str
    req_id: str
    internal: bool = False  # a server bug (INTERNAL), not the request's fault
    touched: float = field(default_factory=time.monotonic)


def zero_stats() -> dict[str, float]:
    """The worker's counters (exported as ``featuresteer_engine_stat``), all zero."""
    names = (
        "steps_total",
        "steered_steps_total",
        "mixed_spec_steps_total",
        "mixed_steered_unsteered_steps_total",
        "steered_rows_total",
        "max_specs_in_step",
        "spec_errors_total",
        "traced_steps_total",
        "trace_rows_total",
        "trace_errors_total",
        "nonfinite_requests_total",
    )
    out: dict[str, float] = dict.fromkeys(names, 0)
    out["since"] = time.time()
    return out


@dataclass
class WorkerState:
    """Everything the extension keeps. ``debug_capture`` is the one test-only switch: None in
    serving; a dict while a test records final-norm rows and applied edits
    (``fs_debug_capture``)."""

    enabled: bool = True
    handles: list[Any] = field(default_factory=list)
    dictionaries: dict[str, Dictionary] = field(default_factory=dict)
    special_ids: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    hook_names: tuple[str, ...] = ()
    d_model: int = 0
    bounds: EditBounds | None = None
    # req_id -> (spec or None: unsteered, trace store or None: untraced), built once
    plans: dict[str, tuple[SteeringSpec | None, TraceStore | None]] = field(default_factory=dict)
    traces: dict[str, TraceStore] = field(default_factory=dict)  # key -> store
    faults: dict[str, Fault] = field(default_factory=dict)  # key -> fault
    keys: dict[str, str] = field(default_factory=dict)  # req_id -> key (steered requests)
    step: Step | None = None
    stats: dict[str, float] = field(default_factory=zero_stats)
    debug_capture: dict[str, list[Any]] | None = None
    capture_rows: tuple[list[str], list[int], list[int]] | None = None
