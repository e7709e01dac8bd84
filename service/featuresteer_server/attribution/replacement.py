"""The local replacement model: one forward pass, then exact linear backward passes.

Owns: capturing what the local replacement model freezes for one prompt (attention
patterns, RMSNorm scales), the transcoder activations, error vectors and constant terms,
and computing batches of attribution rows by backward passes with injected gradients.

The method (Anthropic's circuit tracing; circuit-tracer's ``attribute``): with attention
patterns and normalisation scales frozen at their values on the prompt, and every MLP
replaced by its transcoder plus an error node (MLP output − reconstruction), the residual
stream is linear in the node outputs (feature decoder vectors a_s·d_s, error vectors,
token embeddings) plus constants (decoder biases, attention biases, everything at the BOS
position). A backward pass from a target's input direction (a feature's encoder row at its
MLP-input hook, or a demeaned unembedding column after the final norm) therefore yields
every direct effect A(s→t) = a_s·w(s→t) as a dot product of the gradient at the source's
write site with the source's output vector.

Because the replacement model is linear, its backward pass is computed here in closed form
per layer (the transposes of the frozen OV circuits, the frozen norm scales, and the
transcoders' skip paths) rather than by autograd over a batch-replicated forward pass:
a batch of 64 rows costs no forward pass at all, and no autograd graph is held.
``tests/unit/test_attribution.py`` checks these rows against autograd through the real
HookedTransformer with stop-gradient hooks on ``hook_pattern`` and ``ln*.hook_scale``.

Supported models: TransformerLens Llama-family configs (RMSNorm pre-norm, rotary or no
positional embedding, sequential attention → MLP, optional GQA). Others are refused.

Must not: prune, rank, or know about the wire format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .types import AttributionError

BOS_POSITIONS = 1  # positions [0, BOS_POSITIONS) carry no feature or error nodes


def check_supported(model: Any) -> None:
    """Refuse models whose residual stream the closed-form backward does not describe."""
    cfg = model.cfg
    problems = []
    if cfg.normalization_type not in ("RMS",):
        problems.append(f"normalization_type={cfg.normalization_type!r} (need 'RMS')")
    if cfg.positional_embedding_type not in ("rotary",):
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r}")
    for flag in (
        "parallel_attn_mlp",
        "attn_only",
        "use_normalization_before_and_after",
        "use_split_qkv_input",
        "use_attn_result",
    ):
        if getattr(cfg, flag, False):
            problems.append(f"{flag}=True")
    if getattr(cfg, "output_logits_soft_cap", 0.0) and cfg.output_logits_soft_cap > 0:
        problems.append("output_logits_soft_cap")
    if problems:
        raise AttributionError(
            "attribution supports Llama-family TransformerLens models only: " + ", ".join(problems)
        )


def check_transcoders(model: Any, transcoders: Sequence[Any]) -> None:
    """One transcoder per layer, reading ``ln2.hook_normalized`` and writing ``hook_mlp_out``."""
    n_layers = model.cfg.n_layers
    if len(transcoders) != n_layers:
        raise AttributionError(
            f"attribution needs one transcoder per layer: got {len(transcoders)}, "
            f"the model has {n_layers} layers"
        )
    d_model = model.cfg.d_model
    for layer, tc in enumerate(transcoders):
        want_in = f"blocks.{layer}.ln2.hook_normalized"
        want_out = f"blocks.{layer}.hook_mlp_out"
        hin = getattr(tc, "hook_name", want_in)
        hout = getattr(tc, "hook_name_out", want_out)
        if hin != want_in or hout != want_out:
            raise AttributionError(
                f"transcoder for layer {layer} reads {hin!r} and writes {hout!r}; "
                f"attribution needs {want_in!r} -> {want_out!r}"
            )
        if tuple(tc.W_enc.shape)[0] != d_model or tuple(tc.W_dec.shape)[1] != d_model:
            raise AttributionError(
                f"transcoder for layer {layer} has W_enc {tuple(tc.W_enc.shape)}, "
                f"W_dec {tuple(tc.W_dec.shape)}; the model's d_model is {d_model}"
            )
        if getattr(tc, "per_token_normalization", False):
            raise AttributionError(
                f"transcoder for layer {layer} normalises each token; its features are not "
                "affine in the MLP input, so it cannot enter a linear attribution graph"
            )


def skip_weight(tc: Any) -> Tensor | None:
    """W_skip [d_out, d_in] (skip term x @ W_skip.T), or None."""
    w = getattr(tc, "W_skip", None)
    return None if w is None else w.detach().to(torch.float32)


def decoder_rows(tc: Any, index: Tensor) -> Tensor:
    """Effective decoder rows [n, d_out] for features ``index`` (TopK decoder-norm rescale
    folded in when the dictionary has one)."""
    rows = tc.W_dec.detach().to(torch.float32)[index]
    scale_fn = getattr(tc, "_feature_scale", None)
    scale = scale_fn() if callable(scale_fn) else None
    if scale is not None:
        rows = rows * scale.detach().to(torch.float32)[index, None]
    return rows


@dataclass
class FrozenForward:
    """Everything one forward pass of the prompt fixes for the local replacement model.

    Shapes: P prompt positions, L layers, d d_model, H query heads.
    """

    tokens: Tensor  # [P] long
    logits: Tensor  # [d_vocab] float32, last position
    embed: Tensor  # [P, d] hook_embed (the embedding nodes' vectors)
    ln1_scale: list[Tensor]  # L x [P, 1]
    ln2_scale: list[Tensor]  # L x [P, 1]
    final_scale: Tensor  # [P, 1]
    patterns: list[Tensor]  # L x [H, P, P]
    mlp_in: list[Tensor]  # L x [P, d] ln2.hook_normalized (transcoder inputs)
    mlp_out: list[Tensor]  # L x [P, d] hook_mlp_out


def run_frozen_forward(model: Any, token_ids: Sequence[int]) -> FrozenForward:
    """One plain forward pass of the prompt, caching the frozen quantities (no autograd)."""
    n_layers = model.cfg.n_layers
    names = {"hook_embed", "ln_final.hook_scale"}
    for layer in range(n_layers):
        names |= {
            f"blocks.{layer}.ln1.hook_scale",
            f"blocks.{layer}.ln2.hook_scale",
            f"blocks.{layer}.attn.hook_pattern",
            f"blocks.{layer}.ln2.hook_normalized",
            f"blocks.{layer}.hook_mlp_out",
        }
    cache: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> Tensor:
        cache[hook.name] = act.detach()  # ln1 fires for q, k and v: same values each time
        return act

    tokens = torch.tensor(list(token_ids), dtype=torch.long)
    with torch.no_grad():
        logits = model.run_with_hooks(
            tokens[None], fwd_hooks=[(lambda n: n in names, keep)], return_type="logits"
        )
    f32 = torch.float32
    return FrozenForward(
        tokens=tokens,
        logits=logits[0, -1].to(f32),
        embed=cache["hook_embed"][0].to(f32),
        ln1_scale=[cache[f"blocks.{i}.ln1.hook_scale"][0].to(f32) for i in range(n_layers)],
        ln2_scale=[cache[f"blocks.{i}.ln2.hook_scale"][0].to(f32) for i in range(n_layers)],
        final_scale=cache["ln_final.hook_scale"][0].to(f32),
        patterns=[cache[f"blocks.{i}.attn.hook_pattern"][0].to(f32) for i in range(n_layers)],
        mlp_in=[cache[f"blocks.{i}.ln2.hook_normalized"][0].to(f32) for i in range(n_layers)],
        mlp_out=[cache[f"blocks.{i}.hook_mlp_out"][0].to(f32) for i in range(n_layers)],
    )


@dataclass
class ActiveFeatures:
    """The prompt's active transcoder features, in (layer, pos, feature) order."""

    index: Tensor  # [n, 3] long: layer, pos, feature
    values: Tensor  # [n] float32 activations
    w_enc: list[Tensor]  # L x [d, d_sae] encoder weights (columns gathered per batch)
    decoder: Tensor  # [n, d] a_s · d_s (the source's output vector)
    layer_slices: list[tuple[int, int]]  # L x [start, end) into the n features
    errors: Tensor  # [L, P, d] MLP output − reconstruction (zero at BOS positions)
    constants: Tensor  # [L, P, d] the rest of the MLP output that no node carries (no skip)

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    def encoders(self, idx: Tensor) -> Tensor:
        """[len(idx), d] encoder columns W_enc[:, i] of features ``idx`` (gathered lazily:
        only visited features need one, so the n × d matrix is never held)."""
        rows = self.index[idx]
        out = torch.empty(int(idx.shape[0]), self.decoder.shape[1])
        for layer in rows[:, 0].unique().tolist():
            m = rows[:, 0] == layer
            out[m] = self.w_enc[layer][:, rows[m, 2]].T
        return out


def collect_features(
    fwd: FrozenForward, transcoders: Sequence[Any], *, check_decode: bool = True
) -> ActiveFeatures:
    """Encode every layer's MLP input, and split each MLP output into nodes and constants.

    At positions < ``BOS_POSITIONS`` nothing is a node (as in circuit-tracer): the BOS
    token's computation is the same for every prompt, so its MLP output is a constant.
    """
    idx_parts, val_parts, dec_parts = [], [], []
    errors, constants, slices = [], [], []
    start = 0
    for layer, tc in enumerate(transcoders):
        x = fwd.mlp_in[layer]  # [P, d]
        with torch.no_grad():
            acts = tc.encode(x).to(torch.float32)  # [P, d_sae]
        acts[:BOS_POSITIONS] = 0
        pos, feat = acts.nonzero(as_tuple=True)  # row-major: (pos, feat) sorted
        vals = acts[pos, feat]
        dec = decoder_rows(tc, feat)  # [n_l, d]
        feature_sum = torch.zeros_like(x).index_add_(0, pos, dec * vals[:, None])
        b_dec = tc.b_dec.detach().to(torch.float32)
        if check_decode and hasattr(tc, "decode"):
            with torch.no_grad():
                ref = tc.decode(acts).to(torch.float32)
            if not torch.allclose(ref, feature_sum + b_dec, rtol=1e-4, atol=1e-4):
                raise AttributionError(
                    f"transcoder for layer {layer}: decode() is not acts @ W_dec + b_dec; "
                    "its features cannot be read as decoder vectors"
                )
        w_skip = skip_weight(tc)
        skip = x @ w_skip.T if w_skip is not None else torch.zeros_like(x)
        out = fwd.mlp_out[layer]
        err = out - feature_sum - b_dec - skip
        const = b_dec.expand_as(x).clone()
        const[:BOS_POSITIONS] = (out - skip)[:BOS_POSITIONS]
        err[:BOS_POSITIONS] = 0
        errors.append(err)
        constants.append(const)
        idx_parts.append(torch.stack([torch.full_like(pos, layer), pos, feat], dim=1))
        val_parts.append(vals)
        dec_parts.append(dec * vals[:, None])
        slices.append((start, start + int(vals.shape[0])))
        start += int(vals.shape[0])
    return ActiveFeatures(
        index=torch.cat(idx_parts),
        values=torch.cat(val_parts),
        w_enc=[tc.W_enc.detach().to(torch.float32) for tc in transcoders],
        decoder=torch.cat(dec_parts).contiguous(),
        layer_slices=slices,
        errors=torch.stack(errors),
        constants=torch.stack(constants),
    )


class LinearReplacement:
    """Closed-form backward passes of the local replacement model for one prompt.

    ``rows(targets)`` returns, for each target, its direct effects from every source node:
    columns ``[active features (n) | errors (L·P, layer-major) | embeddings (P)]``, plus the
    target's constant (bias terms and BOS-position MLP outputs carried to it).
    """

    def __init__(self, model: Any, fwd: FrozenForward, feats: ActiveFeatures, transcoders: Any):
        cfg = model.cfg
        self.n_layers = cfg.n_layers
        self.n_pos = int(fwd.tokens.shape[0])
        self.d_model = cfg.d_model
        self.fwd = fwd
        self.feats = feats
        f32 = torch.float32
        self.w_ln1, self.w_ln2, self.w_v, self.w_o, self.attn_bias = [], [], [], [], []
        self.w_skip: list[Tensor | None] = []
        self.inv_s1 = [1.0 / s for s in fwd.ln1_scale]  # [P, 1]
        self.inv_s2 = [1.0 / s for s in fwd.ln2_scale]
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            w_v = getattr(attn, "_W_V", attn.W_V).detach().to(f32)  # [n_kv, d, dh]
            b_v = getattr(attn, "_b_V", attn.b_V).detach().to(f32)  # [n_kv, dh]
            w_o = attn.W_O.detach().to(f32)  # [H, dh, d]
            rep = w_o.shape[0] // w_v.shape[0]
            # pattern rows sum to 1, so b_V reaches the output unchanged at every position
            b_v_full = torch.repeat_interleave(b_v, rep, dim=0)  # [H, dh]
            bias = torch.einsum("hk,hkd->d", b_v_full, w_o) + attn.b_O.detach().to(f32)
            self.w_ln1.append(block.ln1.w.detach().to(f32))
            self.w_ln2.append(block.ln2.w.detach().to(f32))
            # transposed once: [n_kv * dh, d] and [H * dh, d]
            self.w_v.append(w_v.permute(0, 2, 1).reshape(-1, w_v.shape[1]).contiguous())
            self.w_o.append(w_o.reshape(-1, w_o.shape[2]).contiguous())
            self.n_kv = w_v.shape[0]
            self.attn_bias.append(bias)
            self.w_skip.append(skip_weight(transcoders[layer]))
        self.w_final = model.ln_final.w.detach().to(f32)
        self.inv_sf = 1.0 / fwd.final_scale
        self.row_size = feats.n + (self.n_layers + 1) * self.n_pos
        # per layer, the active features' (pos segments) for reading gradients
        self._segments: list[list[tuple[int, int, int]]] = []
        pos_all = feats.index[:, 1]
        for start, end in feats.layer_slices:
            segs = []
            if end > start:
                pos = pos_all[start:end]
                uniq, counts = torch.unique_consecutive(pos, return_counts=True)
                s = start
                for p, c in zip(uniq.tolist(), counts.tolist(), strict=True):
                    segs.append((p, s, s + c))
                    s += c
            self._segments.append(segs)

    def logit_injection(self, vectors: Tensor) -> Tensor:
        """Gradients at resid_final (last position) for demeaned unembedding vectors [k, d]."""
        return vectors * self.w_final * self.inv_sf[-1]

    def rows(self, layers: Tensor, positions: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
        """Direct-effect rows for a batch of targets.

        Args:
            layers: [B] long: a feature target's layer (its encoder reads ln2 of that layer),
                or ``n_layers`` for a logit target.
            positions: [B] long.
            vectors: [B, d]: a feature's encoder column ``W_enc[:, i]``, or a logit's demeaned
                unembedding column (applied after the final norm's weight).

        Returns:
            (rows [B, row_size], constants [B]).
        """
        n_b = int(layers.shape[0])
        n_pos, n_layers, d = self.n_pos, self.n_layers, self.d_model
        feats = self.feats
        # Targets sorted by layer, deepest first: at layer l only the first k rows (targets
        # at l or above) carry gradient, so each layer works on a prefix of the batch.
        order = torch.argsort(layers, descending=True, stable=True)
        layers, positions, vectors = layers[order], positions[order], vectors[order]
        rows = torch.zeros(n_b, self.row_size)
        const = torch.zeros(n_b)
        err_off = feats.n
        emb_off = feats.n + n_layers * n_pos
        g = torch.zeros(n_b, n_pos, d)  # gradient w.r.t. resid_post of the current layer
        m = layers == n_layers
        if bool(m.any()):
            idx = torch.where(m)[0]
            g[idx, positions[idx]] = self.logit_injection(vectors[idx])
        for layer in range(min(int(layers[0]), n_layers - 1), -1, -1):
            k = int((layers >= layer).sum())
            gk = g[:k]
            # sources writing at this layer's MLP output: features, the error, constants
            for p, s, e in self._segments[layer]:
                rows[:k, s:e] = gk[:, p] @ feats.decoder[s:e].T
            base = err_off + layer * n_pos
            rows[:k, base : base + n_pos] = torch.einsum("bpd,pd->bp", gk, feats.errors[layer])
            const[:k] += torch.einsum("bpd,pd->b", gk, feats.constants[layer])
            # resid_mid: the residual path, the skip path, and injected feature targets
            inv_s2 = self.inv_s2[layer]
            w_skip = self.w_skip[layer]
            g_mid = gk + (gk @ w_skip) * inv_s2 if w_skip is not None else gk.clone()
            idx = torch.where(layers[:k] == layer)[0]
            if idx.numel():
                g_mid[idx, positions[idx]] += vectors[idx] * inv_s2[positions[idx]]
            # attention with a frozen pattern: out = Σ_h A_h (ln1(x) W_V) W_O + bias
            const[:k] += torch.einsum("bpd,d->b", g_mid, self.attn_bias[layer])
            g[:k] = g_mid + self._attn_backward(layer, g_mid)
        rows[:, emb_off : emb_off + n_pos] = torch.einsum("bpd,pd->bp", g, self.fwd.embed)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n_b)
        return rows[inverse], const[inverse]

    def _attn_backward(self, layer: int, g_out: Tensor) -> Tensor:
        """Gradient w.r.t. resid_pre through the frozen-pattern OV circuit: [B, P, d]."""
        w_o, w_v = self.w_o[layer], self.w_v[layer]  # [H * dh, d], [n_kv * dh, d]
        n_kv = self.n_kv
        n_heads = self.fwd.patterns[layer].shape[0]
        d_head = w_o.shape[0] // n_heads
        n_b, n_pos, d = g_out.shape
        g_z = (g_out.reshape(n_b * n_pos, d) @ w_o.T).reshape(n_b, n_pos, n_heads, d_head)
        # z[q, h] = Σ_k A[h, q, k] v[k, h]  ->  g_v[k, h] = Σ_q A[h, q, k] g_z[q, h]
        g_v = torch.einsum("hqk,bqhe->bkhe", self.fwd.patterns[layer], g_z)
        g_v = g_v.reshape(n_b, n_pos, n_kv, n_heads // n_kv, d_head).sum(dim=3)
        g_n = g_v.reshape(n_b * n_pos, n_kv * d_head) @ w_v
        return g_n.reshape(n_b, n_pos, d) * self.w_ln1[layer] * self.inv_s1[layer]


def demeaned_unembed(model: Any, token_ids: Tensor) -> Tensor:
    """[k, d] unembedding columns minus the mean column (circuit-tracer's logit vectors)."""
    w_u = model.W_U.detach().to(torch.float32)  # [d, V]
    return (w_u[:, token_ids] - w_u.mean(dim=1, keepdim=True)).T.contiguous()


def demeaned_bias(model: Any, token_ids: Tensor) -> Tensor:
    """[k] b_U[t] − mean(b_U): the unembedding bias's share of the demeaned logit."""
    b_u = getattr(model, "b_U", None)
    if b_u is None:
        return torch.zeros(int(token_ids.shape[0]))
    b_u = b_u.detach().to(torch.float32)
    return b_u[token_ids] - b_u.mean()
