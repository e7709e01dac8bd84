"""The hooked engine's generation loop: plain transformers ``generate`` on the Hugging Face
model, with torch forward hooks that map TransformerLens hook names onto the HF modules and
call ``interventions.apply`` (TransformerLens's own generate with its KV cache produced
garbage on this model; DESIGN.md "Engines").

Hook mapping: the family's rows in ``taps.py`` (Llama: ``model.model.layers[L]`` and its
``self_attn``, ``post_attention_layernorm``, ``mlp``; GPT-2 likewise). Per row kind:
    hook_resid_pre       forward pre-hook on the block (its hidden_states input)
    hook_attn_out        forward hook on the attention module (output[0])
    hook_resid_mid       the same hook: resid_pre + attn_out, edited by changing attn_out
                         (its row's ``write_via``)
    ln2.hook_normalized  forward hook on the MLP's norm: ``taps.normalized`` of its input (the
                         norm BEFORE its weight, float32 statistics as HF computes them),
                         written back as ``taps.affine``
    hook_mlp_out         forward hook on the MLP
    hook_resid_post      forward hook on the block
At each hook the pre-edit activation is captured first (for transcoder reads, ``when``
conditions and the trace), then the spec's edits at that hook are applied. Edited rows, and a
steered run's input to the final norm, must be finite: otherwise the run stops with
``interventions.nonfinite_error`` (INVALID_ARGUMENT naming the interventions).

Positions: a pre-hook on the embedding counts the tokens each forward feeds (prefill rows
0..P-1, then one row per decode step), so every row carries its absolute position; the
special-token mask comes from the input ids. One sequence per run (batch 1).

Must not: touch asyncio (``engines/hooked.py`` streams the chunks), parse protobuf.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from featuresteer_server import domain, interventions, taps
from featuresteer_server.interventions import SteeringSpec
from featuresteer_server.planning import RunPlan
from featuresteer_server.stream import TokenStream
from featuresteer_server.tokenization import Tokenizer


@dataclass
class RunResult:
    finish_reason: domain.FinishReason
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)


class HookSession:
    """Forward hooks on an HF Llama for one sequence. Use as a context manager; ``reset``
    before a forward that starts again at position 0."""

    def __init__(
        self,
        model: Any,  # a transformers causal LM of a family in taps.py
        spec: SteeringSpec,
        *,
        prompt_len: int,
        special_ids: frozenset[int],
        capture: Sequence[str] = (),
        on_capture: Callable[[str, Tensor, Tensor], None] | None = None,
        keep_logits: bool = False,
    ) -> None:
        self.model = model
        self.family = taps.hf_family(model)
        self.spec = spec
        self.prompt_len = prompt_len
        self.special_ids = torch.tensor(sorted(special_ids), dtype=torch.long)
        self.capture = set(spec.read_hooks) | set(capture)
        self.watch = set(capture)
        self.on_capture = on_capture
        self.keep_logits = keep_logits
        self.offset = 0
        self.positions = torch.zeros(0, dtype=torch.long)  # [T] of the current forward
        self.special = torch.zeros(0, dtype=torch.bool)  # [T]
        self.captured: dict[str, Tensor] = {}  # hook -> [T, d] pre-edit, this forward
        self.last_logits: Tensor | None = None  # [V] float32, the last row of the last forward
        self._resid_pre: dict[int, Tensor] = {}
        self._handles: list[Any] = []

    # -- set-up
    def __enter__(self) -> HookSession:
        hooks = self.capture | set(self.spec.edit_hooks)
        layers: dict[int, set[str]] = {}
        for h in hooks:
            layer, _ = interventions.hook_order(h)
            layers.setdefault(layer, set()).add(h.split(".", 2)[2])
        m, fam = self.model, self.family
        add = self._handles.append
        add(fam.embed_module(m).register_forward_pre_hook(self._on_embed))
        if self.keep_logits:
            add(m.lm_head.register_forward_hook(self._on_logits))
        if not self.spec.empty:  # steered rows must stay finite downstream of the edits too
            add(fam.final_norm_module(m).register_forward_pre_hook(self._on_final_norm))
        for layer, kinds in layers.items():
            pre = f"blocks.{layer}."

            def module(kind: str, layer: int = layer) -> Any:
                return fam.module(m, f"blocks.{layer}.{kind}")[0]

            if kinds & {"hook_resid_pre", "hook_resid_mid"}:
                add(
                    module("hook_resid_pre").register_forward_pre_hook(
                        self._layer_pre(layer), with_kwargs=True
                    )
                )
            if kinds & {"hook_attn_out", "hook_resid_mid"}:  # resid_mid is written via attn_out
                add(module("hook_attn_out").register_forward_hook(self._attn(layer)))
            if "ln2.hook_normalized" in kinds:
                add(
                    module("ln2.hook_normalized").register_forward_hook(
                        self._ln2(pre + "ln2.hook_normalized")
                    )
                )
            for kind in kinds & {"hook_mlp_out", "hook_resid_post"}:
                add(module(kind).register_forward_hook(self._plain(pre + kind)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.offset = 0

    # -- the one place edits happen
    def process(self, hook: str, x: Tensor) -> Tensor | None:
        """x [1, T, d] at ``hook`` -> the edited [1, T, d], or None when unchanged."""
        if x.shape[0] != 1:
            raise RuntimeError("the hooked engine generates one sequence at a time")
        rows = x[0]  # [T, d]
        if hook in self.capture:
            self.captured[hook] = rows
            if hook in self.watch and self.on_capture is not None:
                self.on_capture(hook, rows, self.positions)
        if not self.spec.edits_at(hook):
            return None
        edited = interventions.apply(
            self.spec,
            hook,
            rows,
            positions=self.positions,
            prompt_len=self.prompt_len,
            special=self.special,
            captured=self.captured,
        )
        if bool(interventions.nonfinite_rows(edited).any()):
            raise interventions.nonfinite_error(self.spec, hook)
        return edited.unsqueeze(0)

    def _on_final_norm(self, module: Any, args: tuple[Any, ...]) -> None:
        if bool(interventions.nonfinite_rows(args[0][0]).any()):  # [T, d] the last residual
            raise interventions.nonfinite_error(self.spec, interventions.FINAL_NORM)

    # -- hooks
    def _on_embed(self, module: Any, args: tuple[Any, ...]) -> None:
        ids = args[0]  # [1, T]
        t = ids.shape[-1]
        self.positions = torch.arange(self.offset, self.offset + t, device=ids.device)
        self.special = torch.isin(ids[0], self.special_ids.to(ids.device))
        self.offset += t
        self.captured = {}

    def _on_logits(self, module: Any, args: Any, out: Tensor) -> None:
        self.last_logits = out[0, -1].detach().float()

    def _layer_pre(self, layer: int) -> Callable[..., Any]:
        name = f"blocks.{layer}.hook_resid_pre"

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            positional = bool(args)
            x = args[0] if positional else kwargs["hidden_states"]
            new = self.process(name, x)
            if new is not None:
                x = new
                if positional:
                    args = (new, *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": new}
            self._resid_pre[layer] = x
            return (args, kwargs) if new is not None else None

        return hook

    def _attn(self, layer: int) -> Callable[..., Any]:
        out_name = f"blocks.{layer}.hook_attn_out"
        mid_name = f"blocks.{layer}.hook_resid_mid"

        def hook(module: Any, args: Any, out: Any) -> Any:
            attn = out[0] if isinstance(out, tuple) else out  # [1, T, d]
            changed = False
            new = self.process(out_name, attn)
            if new is not None:
                attn, changed = new, True
            if mid_name in self.capture or self.spec.edits_at(mid_name):
                resid_pre = self._resid_pre[layer]
                mid = resid_pre + attn
                new_mid = self.process(mid_name, mid)
                if new_mid is not None:
                    attn, changed = new_mid - resid_pre, True
            if not changed:
                return None
            return (attn, *out[1:]) if isinstance(out, tuple) else attn

        return hook

    def _ln2(self, name: str) -> Callable[..., Any]:
        def hook(module: Any, args: Any, out: Tensor) -> Any:
            h = args[0]  # [1, T, d]
            normed = self.family.normalized(module, h)  # [1, T, d] float32, before the weight
            new = self.process(name, normed.to(h.dtype))
            return None if new is None else taps.affine(module, new)

        return hook

    def _plain(self, name: str) -> Callable[..., Any]:
        def hook(module: Any, args: Any, out: Any) -> Any:
            x = out[0] if isinstance(out, tuple) else out
            new = self.process(name, x)
            if new is None:
                return None
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return hook


def _stopping_base() -> type:
    from transformers import StoppingCriteria

    return StoppingCriteria  # type: ignore[no-any-return]


class Generator:
    """Runs one ``RunPlan`` with ``transformers.generate`` and reports chunks to ``emit``."""

    def __init__(self, model: Any, tokenizer: Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    def run(
        self,
        plan: RunPlan,
        emit: Callable[[domain.GenerateChunk], None],
        cancel: threading.Event,
    ) -> RunResult:
        from transformers import GenerationConfig, StoppingCriteriaList

        tok = self.tokenizer
        prompt_len = len(plan.prompt_ids)
        eos = tok.eos_id
        trace_by_pos: dict[int, tuple[tuple[int, float], ...]] = {}
        trace_hook = plan.trace.dictionary.hook_name if plan.trace is not None else None

        def on_capture(hook: str, rows: Tensor, positions: Tensor) -> None:
            assert plan.trace is not None
            keep = positions >= prompt_len  # only generated tokens are traced
            if not bool(keep.any()):
                return
            with torch.no_grad():
                acts = plan.trace.dictionary.encode(rows[keep])  # [n, d_sae] float32
            for p, pairs in zip(positions[keep].tolist(), plan.trace.report(acts), strict=True):
                trace_by_pos[int(p)] = pairs

        session = HookSession(
            self.model,
            plan.spec,
            prompt_len=prompt_len,
            special_ids=tok.special_ids,
            capture=(trace_hook,) if trace_hook else (),
            on_capture=on_capture if trace_hook else None,
            keep_logits=plan.logprobs,
        )
        state = TokenStream(tok, plan, prompt_len, emit, trace_by_pos)

        class Step(_stopping_base()):  # type: ignore[misc]
            def __call__(self, input_ids: Tensor, scores: Tensor, **kw: Any) -> Tensor:
                token = int(input_ids[0, -1])
                logprob = None
                if plan.logprobs and session.last_logits is not None:
                    logprob = float(torch.log_softmax(session.last_logits, -1)[token])
                state.on_token(token, input_ids.shape[1] - 1, logprob)
                done = cancel.is_set() or state.stopped
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool)

        sample = plan.temperature > 0
        gen_cfg = GenerationConfig(
            max_new_tokens=plan.max_new_tokens,
            do_sample=sample,
            temperature=plan.temperature if sample else None,
            top_p=plan.top_p if sample and plan.top_p < 1.0 else None,
            top_k=plan.top_k if sample and plan.top_k > 0 else None,
            repetition_penalty=plan.repetition_penalty if plan.repetition_penalty != 1.0 else None,
            eos_token_id=eos,
            pad_token_id=eos if eos is not None else 0,
            bos_token_id=tok.bos_id,
        )
        ids = torch.tensor([plan.prompt_ids], dtype=torch.long)  # [1, P]
        torch.manual_seed(plan.seed)
        with session, torch.inference_mode():
            if not cancel.is_set():
                self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=gen_cfg,
                    stopping_criteria=StoppingCriteriaList([Step()]),
                )
            if cancel.is_set():
                return RunResult(domain.FinishReason.CANCELLED, len(state.ids), state.ids)
            if plan.trace is not None and state.pending is not None:
                # the last token was never fed back; one more forward (same hooks) traces it
                session.reset()
                full = torch.tensor([plan.prompt_ids + state.ids], dtype=torch.long)
                self.model(full, use_cache=False, logits_to_keep=1)
        state.flush()
        return RunResult(state.finish_reason(), len(state.ids), state.ids)
