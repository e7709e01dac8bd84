"""The vLLM worker extension: per-request steering inside vLLM's forward pass.

vLLM loads this class by qualified name (``worker_extension_cls``) into its worker (the
engine-core process; with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the server process). The
engine talks to it only through ``collective_rpc`` (``fs_*`` methods) and through each
request's ``SamplingParams.extra_args[EXTRA_KEY]`` (the request's interventions, JSON-able;
``wire.py``).

One forward of vLLM's flattened batch ``[T, d]`` holds rows of many requests. A forward
pre-hook on the top-level model reads, for this step, the scheduled requests
(``model_runner.input_batch.req_ids``), their row ranges (``model_runner.query_start_loc``,
the same array the attention metadata is built from), each row's absolute position (the
model's ``positions`` argument: correct under chunked prefill and decode alike) and input id
(for the special-token mask). Rows are grouped by steering-spec fingerprint; each spec is
compiled once per request (``interventions.compile_steering`` against the worker's own copy of
the dictionaries) and cached until the request leaves the runner. Module hooks then call
``interventions.apply`` on exactly each group's rows.

Hook mapping: the rows of ``taps.VLLM_LLAMA`` (``layers = model.model.layers``; a layer takes
and returns ``(hidden, residual)`` whose sum is the residual stream, and its norms are fused
add+RMSNorm ops that work in place):
    hook_resid_pre       forward pre-hook on layers[L]: hidden (+ residual, None at L=0)
    hook_attn_out        forward pre-hook on layers[L].post_attention_layernorm: its x
    hook_resid_mid       the same pre-hook: x + residual
    ln2.hook_normalized  the same pre-hook reads ``taps.normalized`` of resid_mid in float32
                         (before the weight); edits go into its output in a forward hook
                         (normed = ``taps.affine`` of n')
    hook_mlp_out         forward hook on layers[L].mlp
    hook_resid_post      forward hook on layers[L]: hidden + residual
An edit of a sum-valued hook writes the edited rows as (hidden = x', residual = 0), so the
next fused add yields x' exactly; rows of other requests are never written.

Per-token trace: a request whose ``extra_args[wire.TRACE_KEY]`` names a dictionary (steered or
not) has its rows at positions >= its prompt length read, PRE-edit, at that dictionary's input
hook (the same capture point steering reads use: a transcoder at ``ln2.hook_normalized``),
encoded in float32 with the worker's copy of the dictionary and reported by
``planning.TracePlan.report``; the result waits in ``{key: {position: pairs}}`` until the
engine takes it with ``fs_poll`` (a token's trace exists once the token is fed back in,
i.e. once the next token of its request has been sampled; ``fs_poll`` also returns faults).
``key`` is the engine's request id, sent in the trace and the steering payloads: vLLM gives
each request an internal id (the engine's plus a random suffix), which is what the runner
shows here. Trace reads never write a row.

Isolation guard (DESIGN.md "No request can affect another"): a request's rows land in its own
KV-cache blocks, and blocks are reused by later requests once freed, so nothing non-finite may
ever be written there. The engine bounds every edit before sending it (``EditBounds``: the
worker compiles with the same bounds); on top of that, every edited row is checked, and so are
the steered rows, from the first edited layer on, at each layer's input (the residual pair),
at its attention's input (the normed rows its keys and values are computed from: a finite but
huge residual can turn into NaN inside a norm) and at the final norm's input (one ``isfinite``
over the steered rows only). A request whose rows are not finite has those rows replaced by zeros
(finite K/V, a finite residual, sampled logits that cannot break the batch's sampler) and is
recorded as faulted with the error naming its interventions; the engine polls it
(``fs_poll``), aborts the request and answers INVALID_ARGUMENT. Other requests' rows are never
read or written by the guard.

Unsteered rows: when no request of a step is steered or traced the hooks return at once, and
each hook returns at once unless a group reads or edits it or a trace reads it; otherwise only
the steered rows are overwritten, so unsteered rows are bit-identical to the same batch with
the hooks disabled (``fs_set_enabled(False)``, used by the tests).

Layout: ``state.py`` (the typed state), ``grouping.py`` (which rows of a forward belong to
which steered/traced request: ``build_step``), this module (the RPCs, the hooks and the
isolation guard). ``fs_debug_capture`` is the one test-only switch (records final-norm rows and
applied edits); serving never turns it on.

Must not: import the engine, gRPC or asyncio; raise out of a hook for one bad request (a
spec that fails to compile here is recorded as an internal fault of that request, which the
engine aborts; the engine validated it before sending, so that only happens on a bug, and it
is logged).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from featuresteer_server import interventions, taps
from featuresteer_server.engines.vllm import grouping
from featuresteer_server.engines.vllm.state import Fault, Group, WorkerState, zero_stats

log = logging.getLogger(__name__)


class SteeringWorkerExtension:
    """Mixed into vLLM's worker class. Methods prefixed ``fs_`` are called through
    ``collective_rpc``; everything else is private to this module."""

    # -- set-up (collective_rpc) -----------------------------------------------------------

    def fs_setup(self, config: dict[str, Any]) -> dict[str, Any]:
        """Load the dictionaries and install the hooks.

        Args:
            config: {"dictionaries": [{"id", "version", "source", "fingerprint"}...],
                "special_ids": [int], "hook_names": [str], "d_model": int,
                "hook_scales": {hook: float}, "max_edit_norm_ratio": float} (the engine's
                ``EditBounds``: the worker compiles every spec with the same bounds).

        Returns:
            {"dictionaries": n, "hooks": n_hooks, "dtype": str} for the engine's log.
        """
        from featuresteer_server.dictionaries import load_dictionary

        fs = self._fs()
        model = self._fs_model()
        dtype = next(model.parameters()).dtype
        dicts: dict[str, Any] = {}
        for item in config.get("dictionaries", []):
            d = load_dictionary(
                Path(item["source"]), dictionary_id=item["id"], version=item.get("version")
            )
            if item.get("fingerprint") and d.fingerprint != item["fingerprint"]:
                raise RuntimeError(
                    f"dictionary {item['id']}: worker loaded fingerprint {d.fingerprint}, "
                    f"the engine has {item['fingerprint']} (files changed between loads?)"
                )
            dicts[d.id] = d.eval()
        fs.dictionaries = dicts
        fs.special_ids = torch.tensor(sorted(config.get("special_ids", [])), dtype=torch.long)
        fs.hook_names = tuple(config.get("hook_names", ()))
        fs.d_model = int(config["d_model"])
        scales = config.get("hook_scales")
        fs.bounds = (
            interventions.EditBounds(
                {h: float(v) for h, v in scales.items()}, float(config["max_edit_norm_ratio"])
            )
            if scales
            else None
        )
        self._fs_install(model)
        return {
            "dictionaries": len(dicts),
            "hooks": len(fs.handles),
            "dtype": str(dtype).removeprefix("torch."),
        }

    def fs_set_enabled(self, enabled: bool) -> bool:
        """Turn every hook (steering and trace) into a no-op (False) or back on; returns the
        previous state."""
        fs = self._fs()
        prev = fs.enabled
        fs.enabled = bool(enabled)
        return prev

    def fs_stats(self) -> dict[str, Any]:
        """Counters since start or the last ``fs_reset_stats``, and two gauges of trace state
        held now: ``trace_requests_stored`` (traced requests the engine has not closed) and
        ``trace_plans_cached`` (cached per-request plans that include a trace)."""
        fs = self._fs()
        out: dict[str, Any] = dict(fs.stats)
        out["trace_requests_stored"] = len(fs.traces)
        out["trace_plans_cached"] = sum(1 for _, t in fs.plans.values() if t is not None)
        return out

    def fs_poll(
        self, keys: list[str], final: bool | list[str] = False
    ) -> dict[str, dict[str, Any]]:
        """Return and clear what the worker holds for ``keys`` (the engine's request ids):
        {"traces": {key: [[position, [[index, activation], ...]], ...]},
         "faults": {key: [field, reason, internal]}} (plain lists: the reply crosses processes as
        msgpack). A fault stays until a final poll. ``final`` (True: every key; or the keys):
        the request is over (finished or aborted): everything of it is dropped, nothing stays
        in the worker."""
        fs = self._fs()
        finals = set(keys) if final is True else set(final or ())
        traces: dict[str, list[Any]] = {}
        faults: dict[str, list[Any]] = {}
        for key in keys:
            fault = fs.faults.get(key)
            if fault is not None:
                faults[key] = [fault.field_name, fault.reason, fault.internal]
                if key in finals:
                    del fs.faults[key]
                    fs.plans.pop(fault.req_id, None)
            store = fs.traces.get(key)
            if store is None:
                continue
            if store.rows:
                traces[key] = [[p, pairs] for p, pairs in sorted(store.rows.items())]
                store.rows = {}
            if key in finals:
                del fs.traces[key]
                fs.plans.pop(store.req_id, None)
        return {"traces": traces, "faults": faults}

    def fs_reset_stats(self) -> None:
        self._fs().stats = zero_stats()

    def fs_debug_capture(self, enabled: bool) -> dict[str, list[Any]]:
        """Tests only (the one debug switch; never in serving). Start (True) or stop (False)
        recording the final-norm hidden state of every row, keyed by request id:
        [(positions, [n, d] float32 as lists)] per forward, and every edit as applied, keyed
        "edits:<fingerprint>": [(hook, positions, x, x')] (lists: the RPC reply crosses
        processes as msgpack). Stopping returns and clears the record (logits = rows @
        lm_head.T)."""
        fs = self._fs()
        out = fs.debug_capture or {}
        fs.debug_capture = {} if enabled else None
        fs.capture_rows = None
        return out

    # -- internals --------------------------------------------------------------------------

    def _fs(self) -> WorkerState:
        state = self.__dict__.get("_fs_state")
        if state is None:
            state = self.__dict__["_fs_state"] = WorkerState()
        return state  # type: ignore[no-any-return]

    def _fs_model(self) -> Any:
        runner = self.model_runner  # type: ignore[attr-defined]
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        return model

    def _fs_install(self, model: Any) -> None:
        fs = self._fs()
        for h in fs.handles:
            h.remove()
        handles = fs.handles = []
        fam = taps.VLLM_LLAMA
        handles.append(model.register_forward_pre_hook(self._fs_on_step, with_kwargs=True))
        final = fam.final_norm_module(model)
        handles.append(final.register_forward_hook(self._fs_on_final_norm))
        handles.append(final.register_forward_pre_hook(self._fs_final_norm_pre))
        for layer in range(fam.n_layers(model)):

            def module(kind: str, layer: int = layer) -> Any:
                return fam.module(model, f"blocks.{layer}.{kind}")[0]

            attn = getattr(fam.block(model, layer), taps.VLLM_LLAMA_ATTN)
            ln2 = module("ln2.hook_normalized")  # also carries attn_out and resid_mid
            handles += [
                module("hook_resid_pre").register_forward_pre_hook(self._fs_layer_pre(layer)),
                attn.register_forward_pre_hook(self._fs_attn_pre(layer), with_kwargs=True),
                ln2.register_forward_pre_hook(self._fs_ln2_pre(layer)),
                ln2.register_forward_hook(self._fs_ln2_post(layer)),
                module("hook_mlp_out").register_forward_hook(self._fs_mlp(layer)),
                module("hook_resid_post").register_forward_hook(self._fs_layer_post(layer)),
            ]

    def _fs_on_step(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        st = self._fs()
        st.step = None
        if not st.enabled:
            return
        runner = self.model_runner  # type: ignore[attr-defined]
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not runner.input_batch.req_ids or positions is None or input_ids is None:
            return  # a warm-up / profiling run (or embeddings input: not steerable here)
        st.step = grouping.build_step(st, runner, positions, input_ids)

    def _fs_trace_read(self, hook: str, x: Tensor) -> None:
        """Encode the traced rows of ``x`` (pre-edit, at ``hook``) in float32 and store each
        request's report by position. Only reads x."""
        fs = self._fs()
        step = fs.step
        assert step is not None
        for tr in step.traces:
            if tr.hook != hook:
                continue
            try:
                d = tr.dictionary
                rows = x.index_select(0, tr.rows.to(x.device))
                acts = d.encode(rows.to(d.W_enc.device)).cpu()  # [n, d_sae] float32
                now = time.monotonic()
                for st, a, b in tr.owners:
                    reports = st.plan.report(acts[a:b])
                    for p, pairs in zip(tr.positions[a:b], reports, strict=True):
                        st.rows[p] = [[i, v] for i, v in pairs]
                    st.touched = now
                fs.stats["trace_rows_total"] += len(tr.positions)
            except Exception:  # noqa: BLE001 - never raise out of a hook
                log.exception("trace of dictionary %s failed in the worker", tr.dictionary.id)
                fs.stats["trace_errors_total"] += 1

    def _fs_process(self, hook: str, x: Tensor) -> dict[int, Tensor]:
        """Capture pre-edit rows at ``hook`` and edit them; returns {group index: [n, d] new
        rows} for the groups that have edits here (x itself is never written)."""
        step = self._fs().step
        out: dict[int, Tensor] = {}
        if step is None:
            return out
        if step.traces:
            self._fs_trace_read(hook, x)
        for gi, g in enumerate(step.groups):
            spec = g.spec
            reads = hook in spec.read_hooks
            edits = bool(spec.edits_at(hook))
            if not reads and not edits:
                continue
            rows = x.index_select(0, g.rows.to(x.device))  # [n, d]
            if reads:
                g.captured[hook] = rows.to(torch.float32)
            if edits:
                out[gi] = self._fs_guard(
                    g,
                    hook,
                    interventions.apply(
                        spec,
                        hook,
                        rows,
                        positions=g.positions.to(x.device),
                        prompt_len=g.prompt_len.to(x.device),
                        special=g.special.to(x.device),
                        captured=g.captured,
                    ),
                )
                record = self._fs().debug_capture
                if record is not None:  # tests: the edit exactly as applied
                    record.setdefault("edits:" + spec.fingerprint, []).append(
                        (
                            hook,
                            g.positions.tolist(),
                            rows.float().tolist(),
                            out[gi].float().tolist(),
                        )
                    )
        return out

    def _fs_wants(self, hooks: tuple[str, ...]) -> bool:
        step = self._fs().step
        if step is None:
            return False
        return any(h in g.spec.read_hooks for g in step.groups for h in hooks) or any(
            t.hook in hooks for t in step.traces
        )

    def _fs_edit_sum(
        self, hook: str, hidden: Tensor, residual: Tensor | None
    ) -> tuple[Tensor, Tensor | None] | None:
        """A hook whose value is hidden + residual: edited rows become (x', 0)."""
        step = self._fs().step
        assert step is not None
        total = hidden if residual is None else hidden + residual  # [T, d]
        new = self._fs_process(hook, total)
        if not new:
            return None
        hidden = hidden.clone()
        residual = residual.clone() if residual is not None else None
        for gi, rows_new in new.items():
            idx = step.groups[gi].rows.to(hidden.device)
            hidden.index_copy_(0, idx, rows_new.to(hidden.dtype))
            if residual is not None:
                residual.index_fill_(0, idx, 0)
        return hidden, residual

    # -- the isolation guard

    def _fs_fault(self, g: Group, bad: Tensor, hook: str) -> None:
        """Record every request owning a True row of ``bad`` [n] (group rows) as faulted."""
        fs = self._fs()
        hit = set(bad.nonzero().flatten().tolist())
        runner_ids = {key: rid for rid, key in fs.keys.items()}
        for key, a, b in g.owners:
            if key in fs.faults or not any(a <= r < b for r in hit):
                continue
            err = interventions.nonfinite_error(g.spec, hook)
            fs.faults[key] = Fault(err.field, err.reason, runner_ids.get(key, key))
            fs.stats["nonfinite_requests_total"] += 1
            log.warning("request %s: steered rows non-finite at %s; aborting it", key, hook)

    def _fs_guard(self, g: Group, hook: str, rows: Tensor) -> Tensor:
        """Edited rows [n, d] of one group -> the same rows, with every row that is not
        finite zeroed and its request faulted."""
        bad = interventions.nonfinite_rows(rows)  # [n]
        if not bool(bad.any()):
            return rows
        self._fs_fault(g, bad.cpu(), hook)
        return torch.where(bad.unsqueeze(-1), torch.zeros_like(rows), rows)

    def _fs_guard_sum(
        self, hook: str, hidden: Tensor, residual: Tensor | None
    ) -> tuple[Tensor, Tensor | None] | None:
        """The steered rows of a (hidden, residual) pair (or of ``hidden`` alone): any
        non-finite row becomes (0, 0) and its request is faulted; None when every steered row
        is finite (nothing written). Other requests' rows are neither read nor written."""
        step = self._fs().step
        assert step is not None
        out: tuple[Tensor, Tensor | None] | None = None
        for g in step.groups:
            idx = g.rows.to(hidden.device)
            total = hidden.index_select(0, idx)
            if residual is not None:
                total = total + residual.index_select(0, idx)
            bad = interventions.nonfinite_rows(total)  # [n]
            if not bool(bad.any()):
                continue
            self._fs_fault(g, bad.cpu(), hook)
            if out is None:
                out = (hidden.clone(), residual.clone() if residual is not None else None)
            zero_rows = idx[bad]
            out[0].index_fill_(0, zero_rows, 0)
            if out[1] is not None:
                out[1].index_fill_(0, zero_rows, 0)
        return out

    def _fs_attn_pre(self, layer: int) -> Callable[..., Any]:
        hook = f"blocks.{layer}.ln1.hook_normalized"  # the attention's (weighted) input

        def fn(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            step = self._fs().step
            if step is None or step.guard_from is None or layer < step.guard_from:
                return None
            if "hidden_states" in kwargs:
                res = self._fs_guard_sum(hook, kwargs["hidden_states"], None)
                return None if res is None else (args, {**kwargs, "hidden_states": res[0]})
            res = self._fs_guard_sum(hook, args[1], None)  # (positions, hidden_states)
            return None if res is None else ((args[0], res[0], *args[2:]), kwargs)

        return fn

    def _fs_final_norm_pre(self, module: Any, args: tuple[Any, ...]) -> Any:
        step = self._fs().step
        if step is None or step.guard_from is None:
            return None
        hidden, residual = args[0], args[1] if len(args) > 1 else None
        res = self._fs_guard_sum(interventions.FINAL_NORM, hidden, residual)
        if res is None:
            return None
        return (res[0], res[1], *args[2:]) if len(args) > 1 else (res[0], *args[1:])

    def _fs_layer_pre(self, layer: int) -> Callable[..., Any]:
        hook = f"blocks.{layer}.hook_resid_pre"

        def fn(module: Any, args: tuple[Any, ...]) -> Any:
            step = self._fs().step
            if step is None:
                return None
            guard = step.guard_from is not None and layer >= step.guard_from
            if hook not in step.hooks and not guard:
                return None
            positions, hidden, residual = args[0], args[1], args[2] if len(args) > 2 else None
            changed = False
            if guard:  # the rows this layer's attention writes to the KV cache
                res = self._fs_guard_sum(hook, hidden, residual)
                if res is not None:
                    (hidden, residual), changed = res, True
            if hook in step.hooks:
                res = self._fs_edit_sum(hook, hidden, residual)
                if res is not None:
                    (hidden, residual), changed = res, True
            if not changed:
                return None
            return (positions, hidden, residual, *args[3:])

        return fn

    def _fs_ln2_pre(self, layer: int) -> Callable[..., Any]:
        attn_hook = f"blocks.{layer}.hook_attn_out"
        mid_hook = f"blocks.{layer}.hook_resid_mid"
        norm_hook = f"blocks.{layer}.ln2.hook_normalized"

        def fn(module: Any, args: tuple[Any, ...]) -> Any:
            step = self._fs().step
            if step is None or not (step.hooks & {attn_hook, mid_hook, norm_hook}):
                return None
            attn, residual = args[0], args[1] if len(args) > 1 else None
            changed = False
            new = self._fs_process(attn_hook, attn) if attn_hook in step.hooks else {}
            if new:
                attn, changed = attn.clone(), True
                for gi, rows_new in new.items():
                    attn.index_copy_(0, step.groups[gi].rows, rows_new.to(attn.dtype))
            res = self._fs_edit_sum(mid_hook, attn, residual) if mid_hook in step.hooks else None
            if res is not None:
                (attn, residual), changed = res, True
            if self._fs_wants((norm_hook,)):
                mid = attn if residual is None else attn + residual
                normed = taps.VLLM_LLAMA.normalized(module, mid)  # [T, d] float32
                self._fs_process_read_only(norm_hook, normed)
            if not changed:
                return None
            return (attn, residual, *args[2:])

        return fn

    def _fs_process_read_only(self, hook: str, x: Tensor) -> None:
        """Capture only (edits at this hook happen in the matching post-hook)."""
        step = self._fs().step
        assert step is not None
        if step.traces:
            self._fs_trace_read(hook, x)
        for g in step.groups:
            if hook in g.spec.read_hooks:
                g.captured[hook] = x.index_select(0, g.rows.to(x.device))

    def _fs_ln2_post(self, layer: int) -> Callable[..., Any]:
        norm_hook = f"blocks.{layer}.ln2.hook_normalized"

        def fn(module: Any, args: Any, out: Any) -> Any:
            step = self._fs().step
            if step is None:
                return None
            normed_w = out[0] if isinstance(out, tuple) else out  # [T, d] = n·weight
            changed = False
            for g in step.groups:
                if not g.spec.edits_at(norm_hook):
                    continue
                n_rows = g.captured[norm_hook]  # [n, d] float32 pre-edit
                edited = interventions.apply(
                    g.spec,
                    norm_hook,
                    n_rows,
                    positions=g.positions,
                    prompt_len=g.prompt_len,
                    special=g.special,
                    captured=g.captured,
                )
                edited = self._fs_guard(g, norm_hook, edited)
                if not changed:
                    normed_w, changed = normed_w.clone(), True
                new_rows = taps.affine(module, edited).to(normed_w.dtype)
                normed_w.index_copy_(0, g.rows, new_rows)
            if not changed:
                return None
            return (normed_w, *out[1:]) if isinstance(out, tuple) else normed_w

        return fn

    def _fs_mlp(self, layer: int) -> Callable[..., Any]:
        hook = f"blocks.{layer}.hook_mlp_out"

        def fn(module: Any, args: Any, out: Tensor) -> Any:
            step = self._fs().step
            if step is None or hook not in step.hooks:
                return None
            new = self._fs_process(hook, out)
            if not new:
                return None
            out = out.clone()
            for gi, rows_new in new.items():
                out.index_copy_(0, step.groups[gi].rows, rows_new.to(out.dtype))
            return out

        return fn

    def _fs_layer_post(self, layer: int) -> Callable[..., Any]:
        hook = f"blocks.{layer}.hook_resid_post"

        def fn(module: Any, args: Any, out: Any) -> Any:
            step = self._fs().step
            if step is None or hook not in step.hooks:
                return None
            hidden, residual = out
            res = self._fs_edit_sum(hook, hidden, residual)
            return res

        return fn

    def _fs_on_final_norm(self, module: Any, args: Any, out: Any) -> None:
        fs = self._fs()
        if fs.debug_capture is None or fs.capture_rows is None:
            return
        hidden = out[0] if isinstance(out, tuple) else out  # [T, d]
        (req_ids, qsl, pos), fs.capture_rows = fs.capture_rows, None
        for i, rid in enumerate(req_ids):
            a, b = qsl[i], qsl[i + 1]
            fs.debug_capture.setdefault(rid, []).append(
                (pos[a:b], hidden[a:b].detach().to(torch.float32).tolist())
            )
