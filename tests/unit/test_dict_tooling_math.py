"""Unit tests of the dictionaries tooling's math on tiny random data (no model, no corpus).

The tooling encodes with the server's dictionary runtime: ``_coder`` builds the runtime
``Dictionary`` the tooling would ship for the given weights (``artifacts.in_memory``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featuresteer_dicts.artifacts import in_memory, sae_cfg, tc_cfg
from featuresteer_dicts.corpus import _windows, is_heldout
from featuresteer_dicts.evaluate import Accumulator
from featuresteer_dicts.metadata import LEAD, WIDTH, FeatureStats, output_tokens
from featuresteer_dicts.train import CoderConfig, CoderTrainer
from featuresteer_server.dictionaries import Dictionary

pytestmark = pytest.mark.unit


def test_accumulator_matches_hand_computation() -> None:
    acts = torch.tensor([[0.0, 2.0, 0.0], [1.0, 3.0, 0.0]])  # feature 2 never fires
    y = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y_hat = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    mean = torch.tensor([0.5, 1.0])
    acc = Accumulator(3)
    acc.add(acts, y, y_hat, mean)
    res = acc.result()
    # errors: (0,-1) -> 1, (0,2) -> 4 => 5; deviations: (0.5,-1) -> 1.25, (-0.5,1) -> 1.25 => 2.5
    assert res["fvu"] == pytest.approx(5 / 2.5)
    assert res["l0"] == pytest.approx(3 / 2)
    assert res["dead_fraction"] == pytest.approx(1 / 3)
    assert res["n_eval_tokens"] == 2


def test_fvu_aggregates_over_batches() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(10, 4, generator=gen)
    y_hat = y + 0.1 * torch.randn(10, 4, generator=gen)
    mean = y.mean(0)
    one, two = Accumulator(1), Accumulator(1)
    one.add(torch.ones(10, 1), y, y_hat, mean)
    two.add(torch.ones(4, 1), y[:4], y_hat[:4], mean)
    two.add(torch.ones(6, 1), y[4:], y_hat[4:], mean)
    expected = float((y - y_hat).pow(2).sum() / (y - mean).pow(2).sum())
    assert one.result()["fvu"] == pytest.approx(expected)
    assert two.result()["fvu"] == pytest.approx(expected)


def _shipped(arch: str, w: dict[str, torch.Tensor], k: int) -> Dictionary:
    """The runtime dictionary the tooling ships for weights ``w`` (d_in = d_out)."""
    d, f = w["W_enc"].shape
    cfg = sae_cfg(d, f, k, 6, 0) if arch == "topk" else tc_cfg(d, f, 3, 0, k)
    if arch == "topk":
        w = {name: t for name, t in w.items() if name != "threshold"}
    return in_memory(cfg, w, torch.zeros(d))


def _coder(arch: str, k: int = 2) -> Dictionary:
    gen = torch.Generator().manual_seed(1)
    d, f = 4, 6
    w = {
        "W_enc": torch.randn(d, f, generator=gen),
        "b_enc": torch.randn(f, generator=gen) * 0.1,
        "W_dec": torch.randn(f, d, generator=gen),
        "b_dec": torch.randn(d, generator=gen) * 0.1,
        "threshold": torch.full((f,), 0.5),
    }
    return _shipped(arch, w, k)


def test_topk_encode_keeps_at_most_k() -> None:
    c = _coder("topk", k=2)
    x = torch.randn(20, 4)
    a = c.encode(x)
    assert ((a > 0).sum(-1) <= 2).all()
    pre = (x - c.b_dec) @ c.W_enc + c.b_enc
    top = pre.topk(2, dim=-1).values
    assert torch.allclose(a.sort(dim=-1, descending=True).values[:, :2], torch.relu(top))


def test_jumprelu_encode_thresholds() -> None:
    c = _coder("jumprelu_transcoder")
    x = torch.randn(20, 4)
    a = c.encode(x)
    pre = x @ c.W_enc + c.b_enc
    assert torch.equal(a > 0, pre > 0.5)
    assert torch.allclose(a[a > 0], pre[pre > 0.5])


@pytest.mark.parametrize("batch_topk", [False, True])
def test_export_folds_normalisation(batch_topk: bool) -> None:
    """Exported weights on raw activations reproduce the training-time coder exactly."""
    cfg = CoderConfig(d_in=8, d_sae=16, d_out=8, k=3, batch_topk=batch_topk, lr=1e-2)
    tr = CoderTrainer(cfg, total_steps=5, seed=0)
    x = torch.randn(64, 8) * 7 + 3
    y = x if not batch_topk else torch.randn(64, 8) * 0.2
    for _ in range(5):
        tr.train_step(x, y)
    w = tr.coder.export()
    coder = _shipped("jumprelu_transcoder" if batch_topk else "topk", w, k=3)
    with torch.no_grad():
        pre = tr.coder.pre_acts(x * tr.coder.scale_in)
        acts = pre * (pre > tr.coder.threshold) if batch_topk else tr.coder.sparsify(pre)
        y_hat = (acts @ tr.coder.W_dec + tr.coder.b_dec) / tr.coder.scale_out
    a = coder.encode(x)
    assert torch.allclose(a, acts, atol=1e-4)
    assert torch.allclose(coder.decode(a), y_hat, atol=1e-4)


def test_training_reduces_fvu_and_keeps_unit_decoder() -> None:
    torch.manual_seed(0)
    basis = torch.randn(12, 8)
    codes = torch.relu(torch.randn(512, 12)) * (torch.rand(512, 12) < 0.2)
    x = codes @ basis
    tr = CoderTrainer(CoderConfig(d_in=8, d_sae=24, d_out=8, k=4, lr=1e-2), 200, seed=0)
    first = tr.train_step(x, x)["fvu"]
    for _ in range(150):
        last = tr.train_step(x, x)["fvu"]
    assert last < first * 0.5
    assert torch.allclose(tr.coder.W_dec.norm(dim=1), torch.ones(24), atol=1e-5)


def test_feature_stats_tracks_top_windows_and_slices() -> None:
    acts = torch.zeros(3, 20, 2)  # 3 windows, 20 positions, 2 features
    acts[1, 10, 0] = 5.0
    acts[1, 9, 0] = 1.0
    acts[2, 3, 0] = 2.0
    stats = FeatureStats(2, n_top=2)
    stats.update(acts[:2], torch.tensor([7, 8]))
    stats.update(acts[2:], torch.tensor([9]))
    assert stats.best_win[:, 0].tolist() == [8, 9]
    assert stats.best_pos[:, 0].tolist() == [10, 3]
    assert stats.best_val[:, 0].tolist() == [5.0, 2.0]
    assert (stats.best_val[:, 1] < 0).all()  # feature 1 never fired: no examples
    assert stats.best_slice[0, LEAD, 0] == 5.0 and stats.best_slice[0, LEAD - 1, 0] == 1.0
    assert stats.best_slice.shape == (2, WIDTH, 2)
    assert stats.count.tolist() == [3, 0] and stats.n_tokens == 60


def test_output_tokens_orders_logits() -> None:
    w_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w_u = torch.tensor([[3.0, -1.0] + [0.0] * 18, [0.0, 2.0] + [0.5] * 18])
    ti, tv, bi, bv = output_tokens(w_dec, torch.ones(2), w_u)
    assert ti[0, 0] == 0 and tv[0, 0] == 3.0 and bi[0, 0] == 1 and bv[0, 0] == -1.0
    assert ti[1, 0] == 1


def test_windows_and_split_are_deterministic() -> None:
    wins = _windows([[5] * 200, [6] * 100], sep=[9])
    assert wins.shape == (2, 128) and (wins[:, 0] == 1).all()
    assert wins[0, 1] == 5 and np.count_nonzero(wins == 9) == 1
    texts = [f"document {i}" for i in range(2000)]
    held = [is_heldout(t) for t in texts]
    assert held == [is_heldout(t) for t in texts]
    assert 0.01 < np.mean(held) < 0.06


@pytest.mark.parametrize("row_cap", [0, 64])
def test_sparse_transcoder_gradients_match_autograd(row_cap: int) -> None:
    """The hand-written sparse backward equals autograd on the dense loss, AuxK included."""
    import copy

    cfg = CoderConfig(d_in=6, d_sae=400, d_out=5, k=12, batch_topk=True, row_cap=row_cap, k_aux=7)
    tr = CoderTrainer(cfg, total_steps=10, seed=3)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(32, 6, generator=gen) * 3
    y = torch.randn(32, 5, generator=gen)
    tr.coder.init_from(x, y)
    tr.coder.since_fired[:250] = 10**9  # 250 dead latents: the AuxK term is live
    dense = copy.deepcopy(tr.coder)
    loss, want = dense.loss(x, y)
    loss.backward()
    got = tr.coder.sparse_grads(x, y)
    assert got["dead"] > 0 and got["aux"] > 0
    for key in ("fvu", "l0", "dead", "aux"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        g_dense = getattr(dense, name).grad
        g_sparse = getattr(tr.coder, name).grad
        assert g_dense is not None and g_sparse is not None
        assert g_dense.abs().max() > 0, name
        assert torch.allclose(g_sparse, g_dense, atol=1e-5, rtol=1e-4), name
    assert torch.equal(tr.coder.since_fired, dense.since_fired)
    assert float(tr.coder.threshold) == pytest.approx(float(dense.threshold))


def test_sparse_fused_training_follows_dense_autograd() -> None:
    """Whole steps (sparse grads + fused Adam, as the transcoders train) track plain autograd +
    Adam; d_in == d_out makes W_enc a transposed clone, the layout fused Adam must respect."""
    import dataclasses

    base = CoderConfig(d_in=16, d_sae=96, d_out=16, k=4, batch_topk=True, row_cap=16, lr=1e-2)
    fast = CoderTrainer(dataclasses.replace(base, sparse_backward=True, fused_adam=True), 20, 0)
    slow = CoderTrainer(base, 20, 0)
    assert not fast.coder.W_enc.is_contiguous()
    gen = torch.Generator().manual_seed(2)
    for _ in range(6):
        x = torch.randn(64, 16, generator=gen)
        y = torch.randn(64, 16, generator=gen)
        got, want = fast.train_step(x, y), slow.train_step(x, y)
        assert got["fvu"] == pytest.approx(want["fvu"], rel=1e-4)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        a, b = getattr(fast.coder, name), getattr(slow.coder, name)
        assert torch.allclose(a, b, atol=1e-4), name
