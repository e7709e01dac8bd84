"""The hooked engine: the model wrapped by TransformerLens so every hook point is
addressable and autograd works. Serves DecodeFeatures, and Generate when vLLM is absent (on the
source transformers model kept beside the hooked one, with forward hooks: ``generation.py``).

Compute runs on one dedicated worker thread: TransformerLens adds hooks to the shared
module for the duration of a call, so two calls must never overlap. The asyncio loop stays
free to serve other RPCs meanwhile (torch releases the GIL).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from featuresteer_server import domain, generation, interventions, planning
from featuresteer_server.engines import hooked_attribution
from featuresteer_server.engines.base import Engine
from featuresteer_server.engines.hooked_attribution import AttributionSettings
from featuresteer_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    feature_dictionary,
    pinned_dictionary,
)
from featuresteer_server.tokenization import Token, Tokenizer

log = logging.getLogger(__name__)
_DONE = object()  # end of a generation stream
T = TypeVar("T")
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")
# the text each hook's typical norm is measured on (EditBounds); ordinary English prose
HOOK_SCALE_TEXT = (
    "The museum opened its new wing last spring, and visitors have been arriving ever since. "
    "Most of them come for the paintings, but many stay for the garden behind the building, "
    "where a small cafe serves tea and cake. In the evening the lights along the river make "
    "the old bridge look brighter than it does during the day."
)


def hook_layer(hook_name: str) -> int | None:
    """Block index of a ``blocks.{L}.…`` hook, None for hooks outside the blocks."""
    m = _BLOCK_HOOK.match(hook_name)
    return int(m.group(1)) if m else None


class HookedEngine(Engine):
    name = "hooked"

    def __init__(
        self,
        model: Any,  # transformer_lens.HookedTransformer
        tokenizer: Tokenizer,
        dictionaries: Iterable[Any] = (),
        *,
        model_name: str,
        weights_hash: str,
        source: str = "",
        generation_engine: str = "hooked",
        engines: Sequence[str] = ("hooked",),
        max_tokens_per_input: int | None = None,
        decode_dictionaries: Sequence[str] = (),
        max_dictionaries_per_call: int = 8,
        hf_model: Any = None,
        attribution: AttributionSettings | None = None,
        max_edit_norm_ratio: float = interventions.DEFAULT_MAX_EDIT_RATIO,
    ) -> None:
        self.model = model
        # the source transformers model: generation runs on it (TransformerLens's generate
        # with its KV cache produced garbage on this model); None: Generate is unavailable
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.weights_hash = weights_hash
        self.source = source
        self.dtype = str(model.cfg.dtype).removeprefix("torch.")
        self.hook_names: tuple[str, ...] = tuple(model.hook_dict)
        self.dictionaries: dict[str, Any] = {}
        for d in dictionaries:
            self.add_dictionary(d)
        self.max_tokens = min(int(model.cfg.n_ctx), max_tokens_per_input or int(model.cfg.n_ctx))
        self.max_dictionaries_per_call = max_dictionaries_per_call
        self.decode_dictionaries = tuple(decode_dictionaries)
        if len(self.decode_dictionaries) > max_dictionaries_per_call:
            raise ValueError(
                f"decode_dictionaries names {len(self.decode_dictionaries)} dictionaries > "
                f"max_dictionaries_per_call {max_dictionaries_per_call}"
            )
        for d_id in self.decode_dictionaries:
            if d_id not in self.dictionaries:
                raise ValueError(f"decode_dictionaries: {d_id!r} is not loaded")
        self.generation_engine = generation_engine
        self.engines = tuple(engines)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hooked-engine")
        # attribution runs beside decode/generate; TransformerLens adds hooks to the shared
        # module during a forward, so forwards on self.model take this lock
        self.model_lock = threading.Lock()
        self.attribution = attribution or AttributionSettings()
        self._attr_executor = ThreadPoolExecutor(
            max_workers=self.attribution.max_concurrent, thread_name_prefix="attribution"
        )
        # what one steering edit may add, relative to each hook's typical norm (measured once)
        self.edit_bounds = interventions.EditBounds(
            self._measure_hook_scales(), max_edit_norm_ratio
        )
        # what Generate planning needs, shared with the vLLM engine (planning.PlanContext)
        self.plan_context = planning.PlanContext(
            dictionaries=self.dictionaries,
            tokenizer=self.tokenizer,
            steering_hooks=self.steering_hooks(),
            d_model=int(model.cfg.d_model),
            n_ctx=int(model.cfg.n_ctx),
            max_tokens=self.max_tokens,
            bounds=self.edit_bounds,
            model_name=model_name,
            weights_hash=weights_hash,
        )

    # -- dictionaries
    def add_dictionary(self, d: Any) -> None:
        # loading.py checks widths and hooks against the model; this guards directly built ones
        for hook in {d.hook_name, d.hook_name_out}:
            if hook not in self.model.hook_dict:
                raise ValueError(f"dictionary {d.id}: hook {hook!r} is not a hook of this model")
        if d.id in self.dictionaries:
            raise ValueError(f"dictionary id {d.id!r} loaded twice")
        self.dictionaries[d.id] = d

    def dictionary(self, dictionary_id: str, field: str, fingerprint: str | None = None) -> Any:
        return pinned_dictionary(self.dictionaries, dictionary_id, field, fingerprint)

    def feature(self, ref: domain.FeatureRef, field: str) -> Any:
        return feature_dictionary(
            self.dictionaries, ref.dictionary_id, ref.index, ref.fingerprint, field
        )

    # -- info
    def info(self) -> domain.EngineInfo:
        cfg = self.model.cfg
        return domain.EngineInfo(
            model=domain.ModelInfo(
                name=self.model_name,
                weights_hash=self.weights_hash,
                n_layers=cfg.n_layers,
                d_model=cfg.d_model,
                d_vocab=cfg.d_vocab,
                n_heads=cfg.n_heads,
                d_mlp=cfg.d_mlp or 0,
                dtype=self.dtype,
                bos_token_id=self.tokenizer.bos_id,
                source=self.source,
                hook_names=self.hook_names,
            ),
            dictionaries=tuple(d.info() for d in self.dictionaries.values()),
            engines=self.engines,
            generation_engine=self.generation_engine,
        )

    def provenance(self, dicts: Iterable[Any] = (), **extra: Any) -> domain.Provenance:
        return self.plan_context.provenance(self.name, self.dtype, dicts, **extra)

    # -- compute
    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the engine's worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def decode_defaults(self) -> list[Any]:
        """The dictionaries of a DecodeFeatures request that names none (and no features):
        ``decode_dictionaries`` when configured, else the loaded SAEs (transcoders only when
        there is no SAE), the first ``max_dictionaries_per_call`` in load order."""
        if self.decode_dictionaries:
            return [self.dictionary(d, "decode_dictionaries") for d in self.decode_dictionaries]
        saes = [d for d in self.dictionaries.values() if not d.is_transcoder]
        return (saes or list(self.dictionaries.values()))[: self.max_dictionaries_per_call]

    def _input_tokens(self, req: domain.DecodeRequest) -> list[tuple[Token, ...]]:
        out: list[tuple[Token, ...]] = []
        for i, inp in enumerate(req.inputs):
            if inp.token_ids is not None:
                self.tokenizer.check_ids(inp.token_ids, f"inputs[{i}].token_ids")
                toks = self.tokenizer.tokens(inp.token_ids)
            else:
                toks = self.tokenizer.tokenize(
                    inp.text or "",
                    req.prepend_bos,
                    max_tokens=self.max_tokens,
                    field=f"inputs[{i}]",
                )
            if not toks:
                raise InvalidArgument(
                    f"inputs[{i}]", "no tokens (empty text and prepend_bos false)"
                )
            if len(toks) > self.max_tokens:
                raise InvalidArgument(
                    f"inputs[{i}]", f"{len(toks)} tokens > max_tokens_per_input {self.max_tokens}"
                )
            out.append(tuple(toks))
        return out

    def _sized_input_tokens(
        self, req: domain.DecodeRequest, dicts: list[Any], selected: dict[str, list[int]]
    ) -> list[tuple[Token, ...]]:
        """The inputs' tokens, once the answer is known to fit ``req.max_response_bytes``."""
        tokens = self._input_tokens(req)
        if req.max_response_bytes is None:
            return tokens
        entries = [min(req.top_k, d.d_sae) + len(selected.get(d.id, ())) for d in dicts]
        size = domain.decode_response_bytes(tokens, [d.id for d in dicts], entries)
        if size > req.max_response_bytes:
            n_tokens = sum(len(t) for t in tokens)
            raise InvalidArgument(
                "inputs, dictionary_ids, top_k, features",
                f"the answer would take up to {size} bytes ({n_tokens} tokens × {len(dicts)} "
                f"dictionaries × (top_k {req.top_k} + selected features) × "
                f"{domain.DECODE_ENTRY_BYTES} bytes per entry, plus tokens) > the server's "
                f"send limit of {req.max_response_bytes} bytes; send fewer inputs or "
                "dictionaries, or a smaller top_k",
            )
        return tokens

    async def decode(self, req: domain.DecodeRequest) -> domain.DecodeResult:
        # empty dictionary_ids: the decode defaults, or only the named features' dictionaries
        dicts = [
            self.dictionary(d, f"dictionary_ids[{i}]") for i, d in enumerate(req.dictionary_ids)
        ]
        if not dicts and not req.features:
            dicts = self.decode_defaults()
        selected: dict[str, list[int]] = {}
        for i, ref in enumerate(req.features):
            d = self.feature(ref, f"features[{i}]")
            if d not in dicts:
                dicts.append(d)
            selected.setdefault(d.id, []).append(ref.index)
        if not dicts:
            raise InvalidArgument("dictionary_ids", "no dictionary is loaded or named")
        # tokenizing is CPU work: a worker thread (not the model's), so the event loop keeps
        # answering health checks while a large text is tokenized
        tokens = await asyncio.to_thread(self._sized_input_tokens, req, dicts, selected)
        items = await self.run(self._decode_sync, tokens, req, dicts, selected)
        return domain.DecodeResult(items=items, provenance=self.provenance(dicts))

    def forward_cache(
        self, seqs: Sequence[Sequence[int]], hooks: set[str]
    ) -> dict[str, torch.Tensor]:
        """Activations at ``hooks`` for right-padded ``seqs``; causal attention means padding
        never reaches the real positions, so a batch equals its items run alone."""
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.eos_id or 0
        tokens = torch.full((len(seqs), width), pad, dtype=torch.long)  # [batch, pos]
        for b, s in enumerate(seqs):
            tokens[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        layers = [hook_layer(h) for h in hooks]
        block_layers = [layer for layer in layers if layer is not None]
        # stop after the deepest block we need, unless a hook lies outside the blocks
        stop = max(block_layers) + 1 if len(block_layers) == len(layers) else None
        with self.model_lock, torch.inference_mode():
            _, cache = self.model.run_with_cache(
                tokens,
                names_filter=lambda n: n in hooks,
                stop_at_layer=stop,
                return_type=None if stop is None else "logits",
            )
        return {h: cache[h] for h in hooks}  # each [batch, pos, d]

    def _decode_sync(
        self,
        inputs: list[tuple[Token, ...]],
        req: domain.DecodeRequest,
        dicts: list[Any],
        selected: dict[str, list[int]],
    ) -> tuple[domain.DecodeItem, ...]:
        hooks = {d.hook_name for d in dicts}
        if req.include_error:
            hooks |= {d.hook_name_out for d in dicts if d.is_transcoder}
        acts = self.forward_cache([[t.id for t in toks] for toks in inputs], hooks)
        items = []
        for b, tokens in enumerate(inputs):
            n = len(tokens)
            results = []
            for d in dicts:
                x = acts[d.hook_name][b, :n].float()  # [pos, d_in]
                feats = d.encode(x)  # [pos, d_sae]
                results.append(
                    self._positions(d, feats, x, acts, b, n, req, selected.get(d.id, []))
                )
            items.append(domain.DecodeItem(tokens=tokens, results=tuple(results)))
        return tuple(items)

    def _positions(
        self,
        d: Any,
        feats: torch.Tensor,
        x: torch.Tensor,
        acts: dict[str, torch.Tensor],
        b: int,
        n: int,
        req: domain.DecodeRequest,
        sel: list[int],
    ) -> domain.DictionaryResult:
        n_pos = feats.shape[0]
        top_vals: list[list[float]] | None = None
        top_idx: list[list[int]] | None = None
        if req.top_k > 0:
            vals, idx = torch.topk(feats, min(req.top_k, d.d_sae), dim=-1)  # [pos, k]
            top_vals, top_idx = vals.tolist(), idx.tolist()
        sel_vals = feats[:, sel].tolist() if sel else None  # [pos, n_sel]
        err_norm = fvu = None
        if req.include_error:
            x_out = acts[d.hook_name_out][b, :n].float() if d.is_transcoder else None
            err_t, fvu_t = d.error_stats(x, x_out, acts=feats)  # [pos], [pos]
            err_norm, fvu = err_t.tolist(), fvu_t.tolist()
        positions = []
        for p in range(n_pos):
            top: tuple[tuple[int, float], ...] = ()
            if top_vals is not None and top_idx is not None:
                top = tuple((i, v) for i, v in zip(top_idx[p], top_vals[p], strict=True) if v > 0)
            chosen = tuple(zip(sel, sel_vals[p], strict=True)) if sel_vals is not None else ()
            positions.append(
                domain.PositionFeatures(
                    position=p,
                    top=top,
                    selected=chosen,
                    error_norm=err_norm[p] if err_norm is not None else 0.0,
                    fvu=fvu[p] if fvu is not None else 0.0,
                )
            )
        return domain.DictionaryResult(dictionary_id=d.id, positions=tuple(positions))

    # -- feature catalog: what can be computed from the weights alone
    def _unembed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``ln_final.w`` [d_model] and ``W_U`` [d_model, d_vocab] in float32 (read only)."""
        ln = getattr(self.model, "ln_final", None)
        w_ln = getattr(ln, "w", None)
        w_u = self.model.W_U.detach().float()  # [d_model, d_vocab]
        if w_ln is None:  # LayerNorm folded away (or none): the unembedding alone
            w_ln = torch.ones(w_u.shape[0])
        return w_ln.detach().float(), w_u

    def _feature_logits_sync(
        self, d: Any, index: int, k: int
    ) -> tuple[tuple[tuple[int, float], ...], tuple[tuple[int, float], ...]]:
        w_ln, w_u = self._unembed()
        with torch.inference_mode():
            # a transcoder's decoder row already lives in the residual stream (MLP output)
            row = d.W_dec[index].float()  # [d_model]
            logits = (row * w_ln) @ w_u  # [d_vocab]
            k = min(k, logits.shape[0])
            top = torch.topk(logits, k)
            bottom = torch.topk(-logits, k)
        return (
            tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)),
            tuple(zip(bottom.indices.tolist(), (-bottom.values).tolist(), strict=True)),
        )

    async def feature_logits(
        self, dictionary_id: str, index: int, k: int
    ) -> tuple[tuple[tuple[int, float], ...], tuple[tuple[int, float], ...]]:
        """Decoder row through ``ln_final.w`` and ``W_U`` (the tooling's metadata uses the same
        formula; the final norm's 1/rms scale is left out, as it depends on the token)."""
        d = self.dictionary(dictionary_id, "feature.dictionary_id")
        # not the engine's worker thread: no hooks are involved, and a lookup must not wait
        # behind a generation
        return await asyncio.to_thread(self._feature_logits_sync, d, index, k)

    def _token_promoters_sync(
        self, d: Any, token_id: int, limit: int
    ) -> tuple[tuple[int, float], ...]:
        w_ln, w_u = self._unembed()
        with torch.inference_mode():
            direction = w_ln * w_u[:, token_id]  # [d_model]
            scores = d.W_dec.float() @ direction  # [d_sae]
            top = torch.topk(scores, min(limit, scores.shape[0]))
        return tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True))

    async def token_promoters(
        self, dictionary_id: str, token_id: int, limit: int
    ) -> tuple[tuple[int, float], ...]:
        """``W_dec · (ln_final.w ⊙ W_U[:, token_id])``, the largest ``limit`` entries."""
        d = self.dictionary(dictionary_id, "dictionary_id")
        self.tokenizer.check_ids([token_id], "token_id")
        return await asyncio.to_thread(self._token_promoters_sync, d, token_id, limit)

    # -- generate
    def _measure_hook_scales(self) -> dict[str, float]:
        """Median per-token ‖x‖ at every steerable hook over a fixed calibration text
        (special tokens left out: BOS has an outsized norm); the unit of ``EditBounds``."""
        hooks = set(self.steering_hooks())
        if not hooks:
            return {}
        ids = self.tokenizer.encode(HOOK_SCALE_TEXT, True)
        keep = torch.tensor([i not in self.tokenizer.special_ids for i in ids])  # [pos]
        acts = self.forward_cache([ids], hooks)
        scales = {}
        for h, x in acts.items():
            norms = x[0].float().norm(dim=-1)[keep]  # [pos]
            scales[h] = max(float(norms.median()), 1e-6)
        return scales

    def steering_hooks(self) -> tuple[str, ...]:
        """Hooks generation can read and edit (forward order)."""
        have = set(self.hook_names)
        hooks = interventions.steerable_hooks(int(self.model.cfg.n_layers))
        return tuple(h for h in hooks if h in have)

    def prepare_generate(
        self, req: domain.GenerateRequest
    ) -> tuple[list[planning.RunPlan], domain.Provenance]:
        """Validate and plan a request (tokenizes the prompt: callers run it in a thread)."""
        if self.hf_model is None:
            raise Unavailable("this engine was built without its transformers model")
        return self.plan_generate(req)

    def plan_generate(
        self, req: domain.GenerateRequest
    ) -> tuple[list[planning.RunPlan], domain.Provenance]:
        """``planning.plan_generate`` on this engine's context (provenance: this engine)."""
        return planning.plan_generate(req, self.plan_context, engine=self.name, dtype=self.dtype)

    def _generate_sync(
        self,
        plans: list[planning.RunPlan],
        prov: domain.Provenance,
        emit: Callable[[Any], None],
        cancel: threading.Event,
    ) -> None:
        try:
            gen = generation.Generator(self.hf_model, self.tokenizer)
            for k, plan in enumerate(plans):
                if cancel.is_set():
                    return
                result = gen.run(plan, emit, cancel)
                if result.finish_reason is domain.FinishReason.CANCELLED:
                    return
                emit(
                    domain.GenerateChunk(
                        baseline=plan.baseline,
                        finish_reason=result.finish_reason,
                        usage=domain.Usage(len(plan.prompt_ids), result.completion_tokens),
                        provenance=prov if k == len(plans) - 1 else None,
                    )
                )
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            emit(exc)
        finally:
            emit(_DONE)

    async def generate(self, req: domain.GenerateRequest) -> AsyncIterator[domain.GenerateChunk]:
        """Stream the steered run's chunks (then the baseline's, with ``compare_baseline``).
        One request at a time on the worker thread; a cancelled or expired call sets a flag
        the generation loop checks every step, which frees the worker."""
        plans, prov = await asyncio.to_thread(self.prepare_generate, req)  # tokenizes
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                cancel.set()

        fut = loop.run_in_executor(self._executor, self._generate_sync, plans, prov, emit, cancel)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()

    # -- attribution
    def transcoder_set(self) -> list[Any]:
        """One transcoder per layer (the replacement model needs every MLP replaced)."""
        by_layer: dict[int, Any] = {}
        for d in self.dictionaries.values():
            layer = hook_layer(d.hook_name)
            if d.is_transcoder and layer is not None:
                by_layer.setdefault(layer, d)
        missing = [layer for layer in range(self.model.cfg.n_layers) if layer not in by_layer]
        if missing:
            raise FailedPrecondition(
                f"mode: GRAPH needs a transcoder for every layer; none is loaded for layers "
                f"{missing[:8]}{'…' if len(missing) > 8 else ''}"
            )
        return [by_layer[layer] for layer in range(self.model.cfg.n_layers)]

    async def attribute(
        self,
        req: domain.AttributeRequest,
        progress: Callable[[str, float], None],
        cancel: threading.Event,
    ) -> domain.AttributionResult:
        tokens = tuple(  # CPU work: off the event loop
            await asyncio.to_thread(
                self.tokenizer.tokenize,
                req.prompt,
                req.prepend_bos,
                max_tokens=self.attribution.max_tokens,
                field="prompt",
            )
        )
        if len(tokens) < 2 and req.mode == "graph":
            raise InvalidArgument("prompt", "needs at least one token after BOS")
        self.tokenizer.check_ids(req.target_token_ids, "target_token_ids")
        if req.mode == "logit_ranking":
            d = self.dictionary(req.dictionary_id, "dictionary_id")
            if not req.target_token_ids:
                raise InvalidArgument("target_token_ids", "LOGIT_RANKING needs one target token")
            loop = asyncio.get_running_loop()
            ranking = await loop.run_in_executor(
                self._attr_executor, self._rank_sync, d, tokens, req.target_token_ids[0], cancel
            )
            return domain.AttributionResult(
                tokens=tokens, provenance=self.provenance([d]), ranking=ranking
            )
        tcs = self.transcoder_set()
        loop = asyncio.get_running_loop()
        graph = await loop.run_in_executor(
            self._attr_executor, self._attribute_sync, req, tokens, tcs, progress, cancel
        )
        return hooked_attribution.graph_result(graph, tokens, self.provenance(tcs))

    def _rank_sync(
        self, d: Any, tokens: tuple[Token, ...], target: int, cancel: threading.Event
    ) -> tuple[tuple[domain.FeatureRef, int, float], ...]:
        from featuresteer_server.attribution import logit_ranking

        with self.model_lock:  # a forward and one backward on the shared module
            rows = logit_ranking(
                self.model, d, [t.id for t in tokens], target, limit=100, cancel=cancel
            )
        return tuple((domain.FeatureRef(d.id, i, d.fingerprint), p, a) for i, p, a in rows)

    def _attribute_sync(
        self,
        req: domain.AttributeRequest,
        tokens: tuple[Token, ...],
        tcs: list[Any],
        progress: Callable[[str, float], None],
        cancel: threading.Event,
    ) -> Any:
        from featuresteer_server.attribution import attribute

        return attribute(
            self.model,
            tcs,
            [t.id for t in tokens],
            target_token_ids=list(req.target_token_ids) or None,
            max_logit_targets=req.max_logit_targets,
            desired_logit_prob=req.desired_logit_prob,
            max_feature_nodes=req.max_feature_nodes,
            node_threshold=req.node_threshold,
            edge_threshold=req.edge_threshold,
            batch_size=req.batch_size or self.attribution.batch_size,
            progress=progress,
            cancel=cancel,
            memory_budget_bytes=self.attribution.memory_budget_bytes,
            keep_raw=False,
            dictionary_ids=[d.id for d in tcs],
            model_lock=self.model_lock,
        )

    async def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._attr_executor.shutdown(wait=True, cancel_futures=True)
