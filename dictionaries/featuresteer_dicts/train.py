"""Sparse coder training in plain torch: TopK SAEs and BatchTopK transcoders.

Why BatchTopK for transcoders: circuit-tracer cannot load TopK transcoders, and an L1 penalty
needs a sweep we have no compute for. BatchTopK (Bussmann et al. 2024) trains with a fixed
sparsity budget and exports as a JumpReLU with one global threshold (the running mean of the
smallest kept activation), which both SAELens and circuit-tracer load.

Training works in normalised units (inputs/targets scaled so E||x||^2 = d); ``export`` folds
the scales back so the shipped weights act on raw activations. Dead features get the AuxK
loss (Gao et al. 2024): the top ``k_aux`` dead latents reconstruct the residual error.

TopK selection (per-token TopK and the AuxK choice) is the runtime's ``topk_activation`` /
``topk_select`` (``featuresteer_server.dictionaries.topk``), the rule the shipped TopK SAEs
are served with; only BatchTopK's batch-wide choice is this trainer's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from featuresteer_server.dictionaries.topk import topk_activation, topk_select


@dataclass(frozen=True)
class CoderConfig:
    """Shapes and sparsity of one coder; ``batch_topk`` selects the transcoder rule."""

    d_in: int
    d_sae: int
    d_out: int
    k: int
    batch_topk: bool = False
    k_aux: int = 256
    aux_coef: float = 1 / 32
    dead_tokens: int = 100_000
    lr: float = 1e-3
    threshold_beta: float = 0.99
    # BatchTopK candidates per token: the batch's n*k largest are chosen among each token's
    # ``row_cap`` largest (a full-batch topk costs 3x more on CPU; caps a token at row_cap).
    row_cap: int = 0
    fused_adam: bool = False
    sparse_backward: bool = False  # SparseCoder.sparse_grads (BatchTopK transcoders only)


class SparseCoder(nn.Module):
    """x [n, d_in] -> a [n, d_sae] -> y_hat [n, d_out], decoder rows kept at unit norm."""

    scale_in: Tensor  # [] input scale (normalised units = raw * scale_in)
    scale_out: Tensor  # [] target scale
    threshold: Tensor  # [] BatchTopK's running threshold (the exported JumpReLU threshold)
    since_fired: Tensor  # [d_sae] tokens since each latent last fired
    initialised: Tensor  # [] bool

    def __init__(self, cfg: CoderConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.cfg = cfg
        w = torch.randn(cfg.d_sae, cfg.d_out, generator=generator)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)  # [d_sae, d_out]
        if cfg.d_in == cfg.d_out:
            w_enc = w.t().clone()
        else:
            w_enc = torch.randn(cfg.d_in, cfg.d_sae, generator=generator) / math.sqrt(cfg.d_in)
        self.W_enc = nn.Parameter(w_enc)  # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))
        self.register_buffer("scale_in", torch.tensor(1.0))
        self.register_buffer("scale_out", torch.tensor(1.0))
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("since_fired", torch.zeros(cfg.d_sae, dtype=torch.long))
        self.register_buffer("initialised", torch.tensor(False))

    @property
    def sae_input_bias(self) -> bool:
        """SAEs subtract b_dec before encoding (SAELens apply_b_dec_to_input); transcoders don't."""
        return not self.cfg.batch_topk

    def pre_acts(self, x: Tensor) -> Tensor:
        """[n, d_sae] ReLU pre-activations on normalised input."""
        if self.sae_input_bias:
            x = x - self.b_dec
        return torch.relu(x @ self.W_enc + self.b_enc)

    def select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """BatchTopK choice as (rows, cols, values), sorted by row then column."""
        n, k = pre.shape[0], self.cfg.k
        if self.cfg.row_cap:
            cand, cidx = pre.topk(self.cfg.row_cap, dim=-1, sorted=False)
            cidx, order = cidx.sort(dim=-1)  # CSR kernels (sampled_addmm) need sorted columns
            cand = cand.gather(-1, order)
        else:
            cand, cidx = pre, torch.arange(pre.shape[1]).expand_as(pre)
        flat = cand.flatten()
        _, idx = flat.topk(k * n, sorted=False)
        keep = torch.zeros(flat.shape, dtype=torch.bool).index_fill_(0, idx, True).view_as(cand)
        keep &= cand > 0
        rows = keep.nonzero()[:, 0]
        return rows, cidx[keep], cand[keep]

    def sparsify(self, pre: Tensor) -> Tensor:
        """Keep the k largest per token (TopK) or n*k largest over the batch (BatchTopK)."""
        k = self.cfg.k
        if self.cfg.batch_topk:
            rows, cols, vals = self.select(pre)
            return torch.zeros_like(pre).index_put((rows, cols), vals)
        return topk_activation(pre, k)

    @torch.no_grad()
    def init_from(self, x: Tensor, y: Tensor) -> None:
        """Scales so E||x||^2 = d, and b_dec at the target mean (first batch only)."""
        self.scale_in.copy_(math.sqrt(x.shape[1]) / x.norm(dim=1).mean())
        self.scale_out.copy_(math.sqrt(y.shape[1]) / y.norm(dim=1).mean())
        self.b_dec.copy_((y * self.scale_out).mean(0))
        self.initialised.fill_(True)

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        """MSE (per token, normalised units) + AuxK on dead latents."""
        xs, ys = x * self.scale_in, y * self.scale_out
        pre = self.pre_acts(xs)
        acts = self.sparsify(pre)
        y_hat = acts @ self.W_dec + self.b_dec
        err = ys - y_hat
        mse = err.pow(2).sum(-1).mean()
        total_var = (ys - ys.mean(0)).pow(2).sum(-1).mean()
        kept = acts[acts > 0].detach() if self.cfg.batch_topk else acts.new_empty(0)
        self.track(x.shape[0], (acts > 0).any(0), kept)
        dead = self.since_fired > self.cfg.dead_tokens
        loss = mse
        aux_val = 0.0
        n_dead = int(dead.sum())
        if n_dead:
            k_aux = min(self.cfg.k_aux, n_dead)
            aux_acts = topk_activation(pre.masked_fill(~dead, 0.0), k_aux)
            e_hat = aux_acts @ self.W_dec
            aux = (err.detach() - e_hat).pow(2).sum(-1).mean() / total_var.clamp_min(1e-6)
            aux_val = float(aux.detach())
            loss = loss + self.cfg.aux_coef * aux
        stats = {
            "fvu": float(mse.detach() / total_var.clamp_min(1e-6)),
            "l0": float((acts > 0).float().sum(-1).mean()),
            "dead": n_dead / self.cfg.d_sae,
            "aux": aux_val,
        }
        return loss, stats

    @torch.no_grad()
    def track(self, n_tokens: int, fired: Tensor, kept: Tensor) -> None:
        """After a batch of ``n_tokens``: reset ``since_fired`` of the latents that fired (a
        mask or indices) and, for BatchTopK, move the running threshold towards the smallest
        kept (positive) activation."""
        self.since_fired += n_tokens
        self.since_fired[fired] = 0
        if self.cfg.batch_topk and kept.numel():
            b = self.cfg.threshold_beta
            lo = kept.min()
            new = lo if float(self.threshold) == 0.0 else b * self.threshold + (1 - b) * lo
            self.threshold.copy_(new)

    @torch.no_grad()
    def sparse_grads(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """The same loss as ``loss`` for BatchTopK transcoders, with hand-written gradients
        that touch only the selected latents (sparse CSR products instead of four of the five
        dense [n, d_sae] matmuls); sets ``.grad`` and returns the same statistics.

        Checked against autograd on ``loss`` in tests/unit/test_dict_tooling_math.py.
        """
        assert self.cfg.batch_topk and not self.sae_input_bias
        n, f = x.shape[0], self.cfg.d_sae
        xs, ys = x * self.scale_in, y * self.scale_out
        pre = self.pre_acts(xs)
        rows, cols, vals = self.select(pre)
        w_dec_t = self.W_dec.t().contiguous()
        y_hat = _csr(rows, cols, vals, n, f) @ self.W_dec + self.b_dec
        err = ys - y_hat
        mse = err.pow(2).sum(-1).mean()
        total_var = (ys - ys.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-6)
        g_w_enc = torch.zeros_like(self.W_enc).t().contiguous()  # [d_sae, d_in]
        g_b_enc = torch.zeros_like(self.b_enc)
        g_w_dec = torch.zeros_like(self.W_dec)

        def backprop(r: Tensor, c: Tensor, v: Tensor, g_out: Tensor) -> None:
            """Accumulate grads for output grad ``g_out`` [n, d_out] of sum_j v_j W_dec[c_j]."""
            g_w_dec.add_(_csr_t(r, c, v, n, f) @ g_out)
            pattern = _csr(r, c, torch.ones_like(v), n, f)
            g_v = torch.sparse.sampled_addmm(pattern, g_out, w_dec_t, beta=0.0).values()
            g_v = g_v * (v > 0)  # ReLU
            g_w_enc.add_(_csr_t(r, c, g_v, n, f) @ xs)
            g_b_enc.index_add_(0, c, g_v)

        g_y = -2.0 * err / n
        backprop(rows, cols, vals, g_y)
        g_b_dec = g_y.sum(0)
        self.track(n, cols, vals)
        dead = self.since_fired > self.cfg.dead_tokens
        n_dead, aux_val = int(dead.sum()), 0.0
        if n_dead:
            k_aux = min(self.cfg.k_aux, n_dead)
            a_vals, a_idx = topk_select(pre.masked_fill(~dead, 0.0), k_aux)
            a_idx, order = a_idx.sort(dim=-1)
            a_vals = a_vals.gather(-1, order)
            a_rows = torch.arange(n).repeat_interleave(k_aux)
            a_cols, a_vals = a_idx.flatten(), a_vals.flatten()
            e_hat = _csr(a_rows, a_cols, a_vals, n, f) @ self.W_dec
            resid = err - e_hat
            aux_val = float(resid.pow(2).sum(-1).mean() / total_var)
            backprop(a_rows, a_cols, a_vals, -2.0 * resid / n * (self.cfg.aux_coef / total_var))
        # grads in their parameter's memory layout (W_enc may be a transposed clone): fused Adam
        # walks param and grad storage in step
        for param, grad in ((self.W_enc, g_w_enc.t()), (self.b_enc, g_b_enc),
                            (self.W_dec, g_w_dec), (self.b_dec, g_b_dec)):  # fmt: skip
            param.grad = torch.empty_like(param).copy_(grad)
        return {
            "fvu": float(mse / total_var),
            "l0": rows.numel() / n,
            "dead": n_dead / f,
            "aux": aux_val,
        }

    @torch.no_grad()
    def after_step(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each unit decoder row (keeps the norm constraint)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec.data
        g = self.W_dec.grad
        g -= (g * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def export(self) -> dict[str, Tensor]:
        """SAELens-named weights acting on raw activations (scales folded in), float32."""
        s_in, s_out = float(self.scale_in), float(self.scale_out)
        out = {
            "W_enc": self.W_enc.data * s_in,  # [d_in, d_sae]
            "b_enc": self.b_enc.data.clone(),
            "W_dec": self.W_dec.data / s_out,  # [d_sae, d_out]
            "b_dec": self.b_dec.data / s_out,
        }
        if self.sae_input_bias:
            # encode((x - b_dec) W_enc) must equal the training rule on x * s_in: b_dec is in
            # output units, and for SAEs input units = output units (s_in == s_out scale).
            assert abs(s_in - s_out) < 1e-6 * max(s_in, 1.0)
        if self.cfg.batch_topk:
            out["threshold"] = torch.full((self.cfg.d_sae,), float(self.threshold))
        return out


def _csr(rows: Tensor, cols: Tensor, vals: Tensor, n: int, f: int) -> Tensor:
    """[n, f] CSR from row-sorted coordinates."""
    crow = torch.zeros(n + 1, dtype=torch.long)
    crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    return torch.sparse_csr_tensor(crow, cols, vals, (n, f), check_invariants=False)


def _csr_t(rows: Tensor, cols: Tensor, vals: Tensor, n: int, f: int) -> Tensor:
    """The transpose [f, n] of the same coordinates, as CSR."""
    order = torch.argsort(cols, stable=True)
    return _csr(cols[order], rows[order], vals[order], f, n)


class CoderTrainer:
    """One coder, its Adam state and its LR schedule (warm-up, flat, linear decay)."""

    def __init__(self, cfg: CoderConfig, total_steps: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.coder = SparseCoder(cfg, gen)
        self.opt = torch.optim.Adam(
            self.coder.parameters(),
            lr=cfg.lr,
            betas=(0.9, 0.999),
            fused=True if cfg.fused_adam else None,
        )
        self.total_steps = total_steps
        self.step = 0

    def lr_at(self, step: int) -> float:
        warm, decay_from = 50, int(0.8 * self.total_steps)
        base = self.coder.cfg.lr
        if step < warm:
            return base * (step + 1) / warm
        if step >= decay_from:
            return base * max(0.0, 1 - (step - decay_from) / max(1, self.total_steps - decay_from))
        return base

    def train_step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        if not bool(self.coder.initialised):
            self.coder.init_from(x, y)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        if self.coder.cfg.sparse_backward:
            stats = self.coder.sparse_grads(x, y)
        else:
            loss, stats = self.coder.loss(x, y)
            loss.backward()
        self.coder.remove_parallel_grad()
        self.opt.step()
        self.coder.after_step()
        self.step += 1
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"coder": self.coder.state_dict(), "opt": self.opt.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coder.load_state_dict(state["coder"])
        self.opt.load_state_dict(state["opt"])
        self.step = int(state["step"])
