"""The steering edit math both generation engines call (DESIGN.md "Interventions").

Owns: validating a request's interventions against the loaded dictionaries and the hooks an
engine can edit (``compile_steering``), the compiled, immutable ``SteeringSpec`` with its
stable fingerprint, and the per-hook edit (``apply``) on plain ``[n_rows, d]`` tensors.
Must not: know about any engine, module layout, KV cache or batch structure, or import gRPC.
An engine maps its modules to TransformerLens hook names and calls ``apply`` with the rows
of ONE request (or of several requests sharing one spec, with per-row ``prompt_len``).

API (stable; the vLLM worker and the hooked engine both use it):

    spec = compile_steering(interventions, dictionaries, hook_names=..., d_model=...,
                            bounds=EditBounds(hook_scales, max_ratio))
        interventions: Sequence[domain.Intervention]
        dictionaries:  Mapping[str, Dictionary]        (id -> loaded dictionary)
        hook_names:    Collection[str]                 (hooks this engine can edit/read)
        d_model:       int                             (width of every steerable hook)
        bounds:        EditBounds | None               (engines always pass theirs; None
                                                        keeps only the absolute value cap)
      -> SteeringSpec, or raises NotFound / FailedPrecondition / InvalidArgument naming the
         field (``interventions[2].feature.index``). Empty interventions -> ``spec.empty``,
         ``spec.fingerprint == ""``.

    spec.fingerprint   str  sha256 hex of a canonical JSON of the edits in request order,
                            dictionary fingerprints included (prefix-cache salt, provenance).
    spec.read_hooks    tuple[str, ...] hooks whose PRE-edit activation ``apply`` may read
                            (transcoder input hooks, ``when`` hooks, the edit hooks), in
                            forward order. Capture them before applying edits at that hook.
    spec.edit_hooks    tuple[str, ...] hooks where ``apply`` changes x, forward order
                            (a transcoder edit lives at its output hook).
    spec.dictionaries  dict[str, str] id -> fingerprint of every dictionary used.
    spec.edits_at(hook) -> tuple[Edit, ...]

    x2 = apply(spec, hook_name, x, positions=..., prompt_len=..., special=..., captured=...)
        x          [n, d]  the activation at ``hook_name`` for n token rows, any float dtype
        positions  [n]     int64 absolute input positions of those rows (0 = first prompt
                           token, BOS included), the same under chunked prefill and decode
        prompt_len int or [n] int64: len(prompt) of each row's request
        special    [n]     bool: the row's INPUT token is BOS or another special token
        captured   Mapping[str, Tensor [n, d]]: pre-edit activations of ``spec.read_hooks``
                           seen earlier in this forward pass for the same rows (the current
                           hook's own pre-edit value is ``x``; it need not be in captured)
      -> [n, d] in x's dtype: x + Σ δ over the edits at this hook, computed in float32 from
         ONE pre-edit encoding per dictionary. Rows no edit covers come back bit-identical.
         Returns ``x`` itself (same object) when the spec has no edit at ``hook_name``.

Semantics (a = encode(x_read) in float32, d_i = the dictionary's decoder direction, so that
contrib_i(v) = v·d_i honouring ``rescale_acts_by_decoder_norm``):
    feature ADD   δ = s·d_i; with ``normalize`` δ = s·‖x‖·d̂_i, ‖x‖ the pre-edit norm of the
                  activation being edited (for a transcoder: the MLP output row).
    feature SCALE a'_i = k·a_i;  CLAMP a'_i = c;  ABLATE a'_i = 0;  δ = (a'_i − a_i)·d_i.
    vector  ADD   δ = s·v (``normalize``: s·‖x‖·v̂); ABLATE δ = −(x·v̂)v̂;
            CLAMP δ = (c − x·v̂)v̂; SCALE δ = (k − 1)(x·v̂)v̂.
    Transcoders: a_i is read from the captured input hook (``ln2.hook_normalized``, pre-edit),
    δ is added at the output hook (``hook_mlp_out``); W_skip is untouched.
    Scope: ``positions`` non-empty -> exactly those positions (may name BOS/special tokens);
    otherwise ``apply_to`` (PROMPT: position < prompt_len; GENERATED: ≥ prompt_len; ALL) minus
    special-token rows. ``when``: rows where the condition feature's pre-edit activation is
    strictly above the threshold; its hook must not come after the edit's hook.
    ABLATE of an inactive feature, CLAMP to the current value and ADD 0 give δ = 0 exactly.

Bounds (DESIGN.md "No request can affect another"; docs/steering.md#limits). Every value is
finite and |value| ≤ ``MAX_ABS_VALUE``. With ``EditBounds`` (``scale(h)``: the typical
per-token norm at hook h, measured by the engine at load; R: ``max_ratio``), the norm of what
one edit can add per token is refused beyond R·scale(h), checked at compile time, before any
work:
    feature ADD   |s|·‖d_i‖ ≤ R·scale(h)         vector ADD   |s|·‖v‖ ≤ R·scale(h)
    ADD normalize |s| ≤ R (δ = s·‖x‖·unit)        SCALE        |k| ≤ R
    feature CLAMP |c|·‖d_i‖ ≤ R·scale(h)         vector CLAMP |c| ≤ R·scale(h)
(‖v‖ is computed in float64, so a vector whose float32 norm overflows is measured, not
mistaken for inf/NaN; ABLATE/CLAMP/SCALE only use its direction.) Violations are
INVALID_ARGUMENT naming ``interventions[i].value`` (or ``.vector.values``).
At run time an engine checks the rows it edited with ``nonfinite_rows`` and, for a request
whose rows are not finite anyway (a bug, or a dtype with a small range), aborts only that
request with ``nonfinite_error`` (INVALID_ARGUMENT naming its interventions): nothing
non-finite may reach a shared KV cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from featuresteer_server import domain
from featuresteer_server.errors import InvalidArgument, feature_dictionary

Op = domain.Op
ApplyTo = domain.ApplyTo

# position of each hook kind inside a block, in forward order
_KIND_ORDER = {
    "hook_resid_pre": 0,
    "ln1.hook_normalized": 1,
    "hook_attn_out": 2,
    "hook_resid_mid": 3,
    "ln2.hook_normalized": 4,
    "hook_mlp_out": 5,
    "hook_resid_post": 6,
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# hooks the hooked engine's HF generation can edit; an engine may support fewer or more
STEERABLE_KINDS = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "hook_mlp_out",
    "hook_resid_post",
)


# |value| of any intervention (and ``when.above``); far beyond any useful steering strength
MAX_ABS_VALUE = 1e6
# an edit may add at most this many times the hook's typical per-token norm
DEFAULT_MAX_EDIT_RATIO = 100.0


@dataclass(frozen=True)
class EditBounds:
    """What one edit may add per token, relative to each hook's scale.

    Attributes:
        hook_scales: hook name -> typical per-token ‖x‖ there (the engine's load-time
            measurement, ``hook_scales`` of the hooked engine; > 0).
        max_ratio: R, the most an edit may add in units of the hook's scale.
    """

    hook_scales: Mapping[str, float]
    max_ratio: float = DEFAULT_MAX_EDIT_RATIO

    def limit(self, hook: str) -> float:
        """The largest ‖δ‖ per token an edit at ``hook`` may add."""
        scale = self.hook_scales.get(hook)
        if scale is None or not math.isfinite(scale) or scale <= 0:
            raise RuntimeError(f"engine bug: no scale measured for hook {hook!r}")
        return self.max_ratio * scale


def hook_order(hook_name: str) -> tuple[int, int]:
    """Sort key putting hooks in forward order; ValueError for hooks outside ``_KIND_ORDER``."""
    m = _BLOCK.match(hook_name)
    if m is None or m.group(2) not in _KIND_ORDER:
        raise ValueError(f"not an orderable block hook: {hook_name!r}")
    return int(m.group(1)), _KIND_ORDER[m.group(2)]


def steerable_hooks(n_layers: int, kinds: Sequence[str] = STEERABLE_KINDS) -> tuple[str, ...]:
    """The block hooks of a model with ``n_layers`` blocks, forward order."""
    return tuple(f"blocks.{layer}.{k}" for layer in range(n_layers) for k in kinds)


@dataclass(frozen=True, eq=False)
class Edit:
    """One compiled intervention. ``read_hook``: where a (or the projection) is computed;
    ``hook``: where δ is added (differs only for transcoder features)."""

    field: str  # "interventions[i]", for messages
    op: Op
    value: float
    normalize: bool
    apply_to: ApplyTo
    positions: tuple[int, ...]
    hook: str
    read_hook: str
    dictionary: Any = None  # Dictionary for feature edits
    index: int = -1
    vector: Tensor | None = None  # [d] float32 for raw-vector edits (ADD: the vector itself)
    unit: Tensor | None = None  # [d] float32 v̂, computed in float64 (raw-vector edits)
    when_dictionary: Any = None
    when_index: int = -1
    when_above: float = 0.0
    # [p] int64 ``positions`` as a tensor, built once with the edit, not per forward
    positions_t: Tensor | None = dataclasses.field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.positions:
            object.__setattr__(self, "positions_t", torch.tensor(self.positions, dtype=torch.long))


@dataclass(frozen=True, eq=False)
class SteeringSpec:
    edits: tuple[Edit, ...] = ()
    fingerprint: str = ""
    read_hooks: tuple[str, ...] = ()
    edit_hooks: tuple[str, ...] = ()
    dictionaries: dict[str, str] = field(default_factory=dict)
    _by_hook: dict[str, tuple[Edit, ...]] = field(default_factory=dict, repr=False)

    @property
    def empty(self) -> bool:
        return not self.edits

    def edits_at(self, hook_name: str) -> tuple[Edit, ...]:
        return self._by_hook.get(hook_name, ())

    def to(self, device: torch.device | str) -> SteeringSpec:
        """The same spec with raw vectors on ``device`` (dictionaries are moved by their
        owner)."""
        edits = tuple(
            e
            if e.vector is None
            else _replace(
                e,
                vector=e.vector.to(device),
                unit=e.unit.to(device) if e.unit is not None else None,
            )
            for e in self.edits
        )
        return _build(edits, self.fingerprint, self.dictionaries)


def _replace(e: Edit, **kw: Any) -> Edit:
    return dataclasses.replace(e, **kw)


def _finite(v: float, field_name: str) -> float:
    if not math.isfinite(v):
        raise InvalidArgument(field_name, f"must be finite, got {v}")
    if abs(v) > MAX_ABS_VALUE:
        raise InvalidArgument(field_name, f"|{v:g}| > {MAX_ABS_VALUE:g}, the most any edit takes")
    return float(v)


def _bounded(
    f: str, op: Op, value: float, normalize: bool, hook: str, norm: float, bounds: EditBounds
) -> None:
    """Refuse an edit that could add more than R·scale(hook) per token (module docstring).
    ``norm``: ‖d_i‖ of a feature, ‖v‖ of a raw vector (float64)."""
    r = bounds.max_ratio
    if op is Op.ABLATE:
        return
    if (op is Op.ADD and normalize) or op is Op.SCALE:
        if abs(value) > r:
            what = "ADD with normalize" if normalize else "SCALE"
            raise InvalidArgument(
                f"{f}.value", f"|{value:g}| > {r:g}: {what} may change a token by at most "
                f"{r:g}× its own norm (max_edit_norm_ratio)",
            )  # fmt: skip
        return
    limit = bounds.limit(hook)
    added = abs(value) * norm if not math.isinf(norm) else math.inf
    if added > limit:
        raise InvalidArgument(
            f"{f}.value",
            f"this edit adds a vector of norm {added:.4g} per token at {hook}; the limit is "
            f"{limit:.4g} ({r:g}× the hook's typical norm {limit / r:.4g}, max_edit_norm_ratio)",
        )


def _lookup(ref: domain.FeatureRef, dictionaries: Mapping[str, Any], field_name: str) -> Any:
    """The feature's dictionary through the one lookup (``errors.feature_dictionary``:
    NOT_FOUND, FAILED_PRECONDITION on a stale fingerprint, INVALID_ARGUMENT on the index)."""
    return feature_dictionary(
        dictionaries, ref.dictionary_id, ref.index, ref.fingerprint, field_name
    )


def compile_steering(
    interventions: Sequence[domain.Intervention],
    dictionaries: Mapping[str, Any],
    *,
    hook_names: Collection[str],
    d_model: int,
    bounds: EditBounds | None = None,
) -> SteeringSpec:
    """Validate ``interventions`` and compile them (see the module docstring)."""
    hooks = set(hook_names)
    edits: list[Edit] = []
    seen: dict[tuple[Any, ...], str] = {}
    canon: list[dict[str, Any]] = []
    used: dict[str, str] = {}
    for i, iv in enumerate(interventions):
        f = f"interventions[{i}]"
        if not isinstance(iv.op, Op):
            raise InvalidArgument(f"{f}.op", "required: ADD, SCALE, CLAMP or ABLATE")
        value = _finite(iv.value, f"{f}.value")
        if iv.normalize and iv.op is not Op.ADD:
            raise InvalidArgument(f"{f}.normalize", "only ADD takes normalize")
        if any(p < 0 for p in iv.positions):
            raise InvalidArgument(f"{f}.positions", "positions are non-negative")
        item: dict[str, Any] = {
            "op": iv.op.value,
            "value": value.hex(),
            "normalize": iv.normalize,
            "apply_to": iv.apply_to.value,
            "positions": sorted(set(iv.positions)),
        }
        if (iv.feature is None) == (iv.vector is None):
            raise InvalidArgument(f, "set exactly one of feature or vector")
        if iv.feature is not None:
            d = _lookup(iv.feature, dictionaries, f"{f}.feature")
            if d.per_token_normalization:
                raise InvalidArgument(
                    f"{f}.feature",
                    f"dictionary {d.id!r} normalises each token "
                    f"({d.cfg.normalize_activations}); feature edits are refused for it",
                )
            hook = d.hook_name_out if d.is_transcoder else d.hook_name
            for h in {hook, d.hook_name}:
                if h not in hooks:
                    raise InvalidArgument(
                        f"{f}.feature.dictionary_id", f"this engine cannot steer at hook {h!r}"
                    )
            if bounds is not None and iv.op is not Op.ABLATE:
                norm = float(d.decoder_direction(int(iv.feature.index)).double().norm())
                _bounded(f, iv.op, value, iv.normalize, hook, norm, bounds)
            key: tuple[Any, ...] = ("feature", d.id, iv.feature.index, hook)
            edit = Edit(
                f, iv.op, value, iv.normalize, iv.apply_to, tuple(iv.positions), hook,
                d.hook_name, dictionary=d, index=int(iv.feature.index),
            )  # fmt: skip
            used[d.id] = d.fingerprint
            item["feature"] = [d.id, d.fingerprint, int(iv.feature.index)]
        else:
            assert iv.vector is not None
            hook = iv.vector.hook_name
            if hook not in hooks:
                raise InvalidArgument(
                    f"{f}.vector.hook_name", f"unknown or unsteerable hook {hook!r}"
                )
            if len(iv.vector.values) != d_model:
                raise InvalidArgument(
                    f"{f}.vector.values",
                    f"{len(iv.vector.values)} values; the hook {hook!r} is {d_model} wide",
                )
            vec = torch.tensor(iv.vector.values, dtype=torch.float32)  # [d]
            if not bool(torch.isfinite(vec).all()):
                raise InvalidArgument(f"{f}.vector.values", "must all be finite")
            v64 = vec.double()  # its norm may overflow float32 although every value is finite
            norm = float(v64.norm())
            needs_unit = iv.op is not Op.ADD or iv.normalize
            if needs_unit and norm == 0.0:
                raise InvalidArgument(f"{f}.vector.values", "a zero vector has no direction")
            if bounds is not None:  # CLAMP sets the projection on v̂: its unit norm counts
                _bounded(
                    f, iv.op, value, iv.normalize, hook, norm if iv.op is Op.ADD else 1.0, bounds
                )
            elif iv.op is Op.ADD and not iv.normalize and not math.isfinite(abs(value) * norm):
                raise InvalidArgument(f"{f}.vector.values", "the vector's norm overflows")
            unit = (v64 / norm).to(torch.float32) if norm > 0 else None  # [d]
            digest = hashlib.sha256(vec.numpy().tobytes()).hexdigest()
            key = ("vector", hook, digest)
            edit = Edit(
                f, iv.op, value, iv.normalize, iv.apply_to, tuple(iv.positions), hook, hook,
                vector=vec, unit=unit,
            )  # fmt: skip
            item["vector"] = [hook, digest]
        if key in seen:
            raise InvalidArgument(
                f"{f}.feature" if iv.feature is not None else f"{f}.vector",
                f"duplicates {seen[key]} (same target at the same hook)",
            )
        seen[key] = f
        if iv.when is not None:
            cd = _lookup(iv.when.feature, dictionaries, f"{f}.when.feature")
            if cd.per_token_normalization:
                raise InvalidArgument(
                    f"{f}.when.feature", f"dictionary {cd.id!r} normalises each token"
                )
            if cd.hook_name not in hooks:
                raise InvalidArgument(
                    f"{f}.when.feature.dictionary_id", f"cannot read hook {cd.hook_name!r}"
                )
            above = _finite(iv.when.above, f"{f}.when.above")
            if hook_order(cd.hook_name) > hook_order(hook):
                raise InvalidArgument(
                    f"{f}.when",
                    f"acausal: the condition is read at {cd.hook_name!r}, after the edit's "
                    f"hook {hook!r}",
                )
            edit = _replace(
                edit, when_dictionary=cd, when_index=int(iv.when.feature.index), when_above=above
            )
            used[cd.id] = cd.fingerprint
            item["when"] = [cd.id, cd.fingerprint, int(iv.when.feature.index), above.hex()]
        edits.append(edit)
        canon.append(item)
    if not edits:
        return SteeringSpec()
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":"))
    return _build(tuple(edits), hashlib.sha256(blob.encode()).hexdigest(), used)


def _build(edits: tuple[Edit, ...], fingerprint: str, used: dict[str, str]) -> SteeringSpec:
    by_hook: dict[str, list[Edit]] = {}
    reads: set[str] = set()
    for e in edits:
        by_hook.setdefault(e.hook, []).append(e)
        reads |= {e.hook, e.read_hook}
        if e.when_dictionary is not None:
            reads.add(e.when_dictionary.hook_name)
    return SteeringSpec(
        edits=edits,
        fingerprint=fingerprint,
        read_hooks=tuple(sorted(reads, key=hook_order)),
        edit_hooks=tuple(sorted(by_hook, key=hook_order)),
        dictionaries=dict(used),
        _by_hook={h: tuple(v) for h, v in by_hook.items()},
    )


def row_mask(e: Edit, positions: Tensor, prompt_len: int | Tensor, special: Tensor) -> Tensor:
    """[n] bool: rows the edit's scope covers (before ``when``)."""
    if e.positions:
        assert e.positions_t is not None  # built with the edit
        wanted = e.positions_t.to(device=positions.device, dtype=positions.dtype)
        return torch.isin(positions, wanted)
    if e.apply_to is ApplyTo.PROMPT:
        mask = positions < prompt_len
    elif e.apply_to is ApplyTo.GENERATED:
        mask = positions >= prompt_len
    else:
        mask = torch.ones_like(positions, dtype=torch.bool)
    return mask & ~special.to(torch.bool)


def apply(
    spec: SteeringSpec,
    hook_name: str,
    x: Tensor,
    *,
    positions: Tensor,
    prompt_len: int | Tensor,
    special: Tensor,
    captured: Mapping[str, Tensor],
) -> Tensor:
    """Edit the [n, d] rows ``x`` at ``hook_name`` (see the module docstring)."""
    edits = spec.edits_at(hook_name)
    if not edits:
        return x
    xf = x.to(torch.float32)  # [n, d]

    def pre(hook: str) -> Tensor:  # [n, d] float32 pre-edit activation at ``hook``
        if hook == hook_name:
            return xf
        if hook not in captured:
            raise RuntimeError(f"engine bug: pre-edit activation of {hook!r} was not captured")
        return captured[hook].to(torch.float32)

    codes: dict[tuple[str, str], Tensor] = {}

    def encoding(d: Any) -> Tensor:  # [n, d_sae], one encoding per dictionary and hook
        key = (d.id, d.hook_name)
        if key not in codes:
            codes[key] = d.encode(pre(d.hook_name))
        return codes[key]

    delta = torch.zeros_like(xf)  # [n, d]
    for e in edits:
        mask = row_mask(e, positions, prompt_len, special)  # [n]
        if e.when_dictionary is not None:
            mask = mask & (encoding(e.when_dictionary)[:, e.when_index] > e.when_above)
        if not bool(mask.any()):
            continue
        if e.dictionary is not None:
            d_i = e.dictionary.decoder_direction(e.index).to(xf.device)  # [d]
            if e.op is Op.ADD:
                if e.normalize:
                    unit = d_i / d_i.norm().clamp_min(1e-12)
                    step = (e.value * xf.norm(dim=-1, keepdim=True)) * unit  # [n, d]
                else:
                    step = (e.value * d_i).expand_as(xf)
            else:
                a = encoding(e.dictionary)[:, e.index]  # [n]
                target = _target(e, a)
                step = (target - a).unsqueeze(-1) * d_i  # [n, d]
        else:
            assert e.vector is not None
            if e.op is Op.ADD and not e.normalize:
                step = (e.value * e.vector.to(xf.device)).expand_as(xf)
            else:
                assert e.unit is not None
                unit = e.unit.to(xf.device)  # [d] v̂, computed in float64 at compile time
                if e.op is Op.ADD:
                    step = (e.value * xf.norm(dim=-1, keepdim=True)) * unit
                else:
                    proj = xf @ unit  # [n]
                    step = (_target(e, proj) - proj).unsqueeze(-1) * unit
        delta = delta + torch.where(mask.unsqueeze(-1), step, torch.zeros_like(step))
    return (xf + delta).to(x.dtype)


def _target(e: Edit, a: Tensor) -> Tensor:
    """a′ for SCALE / CLAMP / ABLATE given the current activation (or projection) a [n]."""
    if e.op is Op.SCALE:
        return a * e.value
    if e.op is Op.CLAMP:
        return torch.full_like(a, e.value)
    return torch.zeros_like(a)  # ABLATE


def nonfinite_rows(x: Tensor) -> Tensor:
    """[n] bool: rows of ``x`` [n, d] holding a NaN or an infinity."""
    return ~torch.isfinite(x).all(dim=-1)


# what a non-finite error names when steered rows went non-finite after the last edit hook,
# at the input of the final norm (both engines check it)
FINAL_NORM = "the final norm's input"


def nonfinite_error(spec: SteeringSpec, hook: str) -> InvalidArgument:
    """The error a request gets when its steered rows are not finite at ``hook``: names the
    edits at that hook, or every edit when the rows went non-finite downstream of them."""
    edits = spec.edits_at(hook) or spec.edits
    fields = ", ".join(e.field for e in edits)
    return InvalidArgument(
        edits[0].field if len(edits) == 1 else "interventions",
        f"steering made the activations at {hook} non-finite ({fields}); the request was "
        "aborted: use a smaller value",
    )
