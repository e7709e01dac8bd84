"""Attribution graphs on a tiny random Llama with random transcoders (ground-truth checks).

Every check here compares the graph (built by closed-form backward passes) against forward
passes of the real HookedTransformer or of plain transformers.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

from featuresteer_server.attribution import (
    AttributionBudgetExceeded,
    AttributionCancelled,
    AttributionError,
    NodeKind,
    attribute,
    logit_ranking,
    to_graph_json,
)
from featuresteer_server.attribution.pruning import (
    _threshold_value,
    graph_scores,
    normalize_rows,
    prune,
    total_influence,
)
from featuresteer_server.attribution.replacement import collect_features, run_frozen_forward
from featuresteer_server.attribution.testing import random_transcoders, tiny_llama
from featuresteer_server.attribution.verify import (
    clean_run,
    completeness_errors,
    error_vectors,
    frozen_forward,
)

pytestmark = pytest.mark.unit

TOKENS = [1, 5, 17, 33, 60, 2, 9, 44, 71, 12]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models():
    return tiny_llama()


@pytest.fixture(scope="module", params=[False, True], ids=["relu", "skip"])
def setup(request, models):
    hf, model = models
    tcs = random_transcoders(
        model.cfg.n_layers, model.cfg.d_model, 256, density=0.05, skip=request.param
    )
    graph = attribute(model, tcs, TOKENS, max_feature_nodes=60, batch_size=16)
    return hf, model, tcs, graph


def _tol(raw, k: int) -> float:
    return 1e-4 * max(abs(float(raw.logit_values[k])), 1.0)


def test_completeness_on_unpruned_logit_rows(setup):
    _, _, _, graph = setup
    raw = graph.raw
    errs = completeness_errors(raw)
    for k in range(raw.n_logits):
        assert errs[k] <= 1e-4 * abs(float(raw.logit_values[k])), (k, errs[k])
    # the constant is a real share (decoder biases, BOS), not a plug of the residual
    assert raw.logit_constants.abs().max() > 1e-3


def test_error_vectors_match_plain_forward(setup):
    _, model, tcs, _ = setup
    fwd = run_frozen_forward(model, TOKENS)
    feats = collect_features(fwd, tcs)
    independent = error_vectors(model, tcs, TOKENS)
    for layer in range(model.cfg.n_layers):
        for pos in range(len(TOKENS)):
            want, got = independent[layer, pos], feats.errors[layer, pos]
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (layer, pos)
    assert feats.errors[:, 0].abs().max() == 0  # BOS carries no error node


def _top_sources(raw, row):
    n_act = raw.active_features.shape[0]
    n_err = raw.n_layers * raw.n_pos
    feat = int(row[:n_act].abs().argmax())
    err = int(row[n_act : n_act + n_err].abs().argmax())
    emb = int(row[n_act + n_err :].abs().argmax())
    return feat, err, emb


def test_intervention_agreement_logit_rows(setup):
    _, model, tcs, graph = setup
    raw = graph.raw
    fwd = run_frozen_forward(model, TOKENS)
    feats = collect_features(fwd, tcs)
    clean = clean_run(model, TOKENS)
    n_act = raw.active_features.shape[0]
    n_err = raw.n_layers * raw.n_pos
    for k in range(min(raw.n_logits, 3)):
        row = raw.logit_rows_full[k]
        tok = int(raw.logit_token_ids[k])
        feat, err, emb = _top_sources(raw, row)
        layer, pos, f = raw.active_features[feat].tolist()
        vec = raw.activation_values[feat] * tcs[layer].W_dec[f]
        logits, _ = frozen_forward(model, tcs, TOKENS, clean, remove_at_mlp_out=(layer, pos, vec))
        assert abs(float(clean.demeaned_logits[tok] - logits[tok]) - float(row[feat])) <= _tol(
            raw, k
        )
        layer, pos = divmod(err, raw.n_pos)
        logits, _ = frozen_forward(
            model, tcs, TOKENS, clean, remove_at_mlp_out=(layer, pos, feats.errors[layer, pos])
        )
        got = float(clean.demeaned_logits[tok] - logits[tok])
        assert abs(got - float(row[n_act + err])) <= _tol(raw, k)
        logits, _ = frozen_forward(model, tcs, TOKENS, clean, remove_at_embed=(emb, fwd.embed[emb]))
        got = float(clean.demeaned_logits[tok] - logits[tok])
        assert abs(got - float(row[n_act + n_err + emb])) <= _tol(raw, k)


def test_intervention_agreement_feature_rows(setup):
    _, model, tcs, graph = setup
    raw = graph.raw
    clean = clean_run(model, TOKENS)
    adj = raw.adjacency
    n_sel = raw.n_selected
    checked = 0
    for t in range(n_sel):
        if adj[t, :n_sel].abs().max() == 0:
            continue
        s = int(adj[t, :n_sel].abs().argmax())
        ls, ps, fs = raw.active_features[raw.selected[s]].tolist()
        target = tuple(raw.active_features[raw.selected[t]].tolist())
        vec = raw.activation_values[raw.selected[s]] * tcs[ls].W_dec[fs]
        _, pre0 = frozen_forward(model, tcs, TOKENS, clean, read_features=[target])
        _, pre1 = frozen_forward(
            model, tcs, TOKENS, clean, remove_at_mlp_out=(ls, ps, vec), read_features=[target]
        )
        assert abs(float(pre0 - pre1) - float(adj[t, s])) <= 1e-4 * max(abs(float(pre0)), 1.0)
        checked += 1
        if checked == 5:
            break
    assert checked > 0


def test_logit_probabilities_match_transformers(setup):
    hf, _, _, graph = setup
    with torch.no_grad():
        probs = torch.softmax(hf(torch.tensor([TOKENS])).logits[0, -1].float(), dim=-1)
    logits = [n for n in graph.nodes if n.kind is NodeKind.LOGIT]
    assert logits
    for node in logits:
        assert abs(node.probability - float(probs[node.token_id])) <= 1e-4
    top = torch.topk(probs, len(logits)).indices.tolist()
    assert [n.token_id for n in logits] == top


def test_graph_structure(setup):
    _, model, _, graph = setup
    raw = graph.raw
    kinds = {n.kind for n in graph.nodes}
    assert {NodeKind.EMBEDDING, NodeKind.LOGIT} <= kinds
    assert sum(n.kind is NodeKind.EMBEDDING for n in graph.nodes) == len(TOKENS)
    n = len(graph.nodes)
    for e in graph.edges:
        assert 0 <= e.source < n and 0 <= e.target < n
        src, dst = graph.nodes[e.source], graph.nodes[e.target]
        assert src.kind is not NodeKind.LOGIT and dst.kind not in (
            NodeKind.EMBEDDING,
            NodeKind.ERROR,
        )
        if dst.kind is NodeKind.FEATURE and src.kind in (NodeKind.FEATURE, NodeKind.ERROR):
            assert src.layer < dst.layer and src.position <= dst.position
    for node in graph.nodes:
        if node.kind in (NodeKind.FEATURE, NodeKind.ERROR):
            assert node.position >= 1  # nothing at BOS
    assert raw.n_selected <= 60
    assert 0.0 <= graph.scores.replacement <= 1.0
    assert 0.0 <= graph.scores.completeness <= 1.0
    assert graph.scores == graph_scores(raw)
    # influence of the feature nodes is non-negative and the logit rows are normalised
    assert (normalize_rows(raw.adjacency).sum(1) <= 1 + 1e-5).all()


def test_pruning_thresholds_monotone(setup):
    _, _, _, graph = setup
    raw = graph.raw
    loose = prune(raw, 0.99, 0.999)
    tight = prune(raw, 0.5, 0.9)
    assert tight.node_mask.sum() <= loose.node_mask.sum()
    full = prune(raw, 1.0, 1.0)
    assert full.node_mask[raw.embedding_offset :].all()
    with pytest.raises(ValueError):
        prune(raw, 1.5, 0.9)


def _real_edges_only(graph) -> None:  # type: ignore[no-untyped-def]
    n = len(graph.nodes)
    assert len(graph.edges) < n * n
    for e in graph.edges:
        assert e.weight != 0.0
        assert e.source != e.target
        assert graph.nodes[e.source].kind is not NodeKind.LOGIT


def test_threshold_one_keeps_only_edges_that_carry_influence(setup):
    """At node/edge thresholds 1.0 the cut-off score is 0: before, every one of the n² pairs
    passed it (zero-weight edges, self-loops, edges out of logits)."""
    _, model, tcs, graph = setup
    raw = graph.raw
    full = prune(raw, 1.0, 1.0)
    n = raw.adjacency.shape[0]
    assert int(full.edge_mask.sum()) < n * n
    weights = raw.adjacency[full.edge_mask]
    assert (weights != 0).all()
    assert not full.edge_mask.diagonal().any()
    assert not full.edge_mask[:, raw.logit_offset :].any()
    # every nonzero edge between kept nodes that leads toward the logits is still there
    kept = full.node_mask[:, None] & full.node_mask[None, :]
    assert int(full.edge_mask.sum()) <= int(((raw.adjacency != 0) & kept).sum())
    assert full.edge_mask.sum() >= prune(raw, 0.99, 0.999).edge_mask.sum()
    _real_edges_only(
        attribute(
            model,
            tcs,
            TOKENS,
            max_feature_nodes=60,
            batch_size=16,
            node_threshold=1.0,
            edge_threshold=1.0,
        )
    )
    _real_edges_only(graph)


@pytest.mark.parametrize(("node_t", "edge_t"), [(0.5, 0.9), (0.8, 0.98), (0.99, 0.999)])
def test_thresholds_below_one_keep_circuit_tracers_rule(setup, node_t, edge_t):
    """Below 1.0 the positive-score rule removes nothing: the edge mask is circuit-tracer's
    ``score >= threshold value`` before the node clean-up."""
    _, _, _, graph = setup
    raw = graph.raw
    result = prune(raw, node_t, edge_t)
    weights = torch.zeros(raw.adjacency.shape[0])
    weights[raw.logit_offset :] = raw.logit_probabilities
    node_mask = result.node_influence >= _threshold_value(result.node_influence, node_t)
    node_mask[-(raw.n_logits + raw.n_pos) :] = True
    pruned = raw.adjacency.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalize_rows(pruned)
    scores = normalized * (total_influence(normalized, weights) + weights)[:, None]
    rule = scores >= _threshold_value(scores.flatten(), edge_t)
    assert bool((scores[rule] > 0).all())  # so the added conditions drop no edge
    final = result.node_mask[:, None] & result.node_mask[None, :]
    assert torch.equal(result.edge_mask, rule & final)


def test_all_features_when_budget_allows(models):
    _, model = models
    tcs = random_transcoders(model.cfg.n_layers, model.cfg.d_model, 64, density=0.05)
    graph = attribute(model, tcs, TOKENS[:6], max_feature_nodes=10_000, batch_size=7)
    assert graph.raw.n_selected == graph.n_active_features
    assert completeness_errors(graph.raw).max() <= 1e-4 * graph.raw.logit_values.abs().max()


def test_explicit_targets_and_batch_size_invariance(models):
    _, model = models
    tcs = random_transcoders(model.cfg.n_layers, model.cfg.d_model, 128, density=0.05)
    g1 = attribute(
        model, tcs, TOKENS, target_token_ids=[3, 40], max_feature_nodes=30, batch_size=64
    )
    g2 = attribute(model, tcs, TOKENS, target_token_ids=[3, 40], max_feature_nodes=30, batch_size=5)
    assert [n.token_id for n in g1.nodes if n.kind is NodeKind.LOGIT] == [3, 40]
    # rows do not depend on how they are batched
    assert torch.allclose(g1.raw.logit_rows_full, g2.raw.logit_rows_full, atol=1e-6)
    with pytest.raises(AttributionError):
        attribute(model, tcs, TOKENS, target_token_ids=[10_000])


def test_progress_cancel_and_budget(models):
    _, model = models
    tcs = random_transcoders(model.cfg.n_layers, model.cfg.d_model, 128, density=0.05)
    seen: list[tuple[str, float]] = []
    attribute(
        model,
        tcs,
        TOKENS,
        max_feature_nodes=40,
        batch_size=8,
        progress=lambda s, f: seen.append((s, f)),
    )
    stages = [s for s, _ in seen]
    assert stages[0] == "forward" and stages[-1] == "done"
    fractions = [f for s, f in seen if s == "features"]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)

    event = threading.Event()

    def cancel_after_first(stage: str, fraction: float) -> None:
        if stage == "features" and fraction > 0:
            event.set()

    with pytest.raises(AttributionCancelled):
        attribute(
            model,
            tcs,
            TOKENS,
            max_feature_nodes=40,
            batch_size=8,
            progress=cancel_after_first,
            cancel=event,
        )
    with pytest.raises(AttributionBudgetExceeded):
        attribute(model, tcs, TOKENS, max_feature_nodes=40, memory_budget_bytes=1000)


def test_refuses_wrong_transcoders(models):
    _, model = models
    tcs = random_transcoders(model.cfg.n_layers - 1, model.cfg.d_model, 64)
    with pytest.raises(AttributionError, match="one transcoder per layer"):
        attribute(model, tcs, TOKENS)
    tcs = random_transcoders(model.cfg.n_layers, model.cfg.d_model, 64)
    tcs[1].hook_name = "blocks.1.hook_resid_mid"
    with pytest.raises(AttributionError, match="reads"):
        attribute(model, tcs, TOKENS)


def test_logit_ranking_matches_finite_difference(models):
    _, model = models
    tcs = random_transcoders(model.cfg.n_layers, model.cfg.d_model, 128, density=0.05)
    tc = tcs[1]
    target = 7
    ranking = logit_ranking(model, tc, TOKENS, target, limit=None)
    assert ranking
    assert all(abs(a[2]) >= abs(b[2]) for a, b in zip(ranking, ranking[1:], strict=False))
    assert all(pos >= 1 for _, pos, _ in ranking)
    # attribution = a · (d · ∇ℓ): check the top one against a small frozen-attention nudge
    index, pos, score = ranking[0]
    clean = clean_run(model, TOKENS)
    eps = 2e-2

    def demeaned_with(scale: float) -> float:
        def freeze(act, hook):
            return clean.cache[hook.name]

        def nudge(act, hook):
            act = act.clone()
            act[0, pos] += scale * tc.W_dec[index]
            return act

        with torch.no_grad():
            logits = model.run_with_hooks(
                torch.tensor([TOKENS]),
                fwd_hooks=[
                    (lambda n: n.endswith("hook_pattern") or n.endswith("hook_scale"), freeze),
                    ("blocks.1.hook_mlp_out", nudge),
                ],
            )[0, -1]
        return float(logits[target] - logits.mean())

    act = float(tc.encode(clean.cache["blocks.1.ln2.hook_normalized"][0, pos])[index])
    fd = act * (demeaned_with(eps) - demeaned_with(-eps)) / (2 * eps)
    assert fd == pytest.approx(score, rel=2e-2, abs=1e-4)


def test_logit_ranking_honours_cancel(models):
    _, model = models
    tcs = random_transcoders(model.cfg.n_layers, model.cfg.d_model, 128, density=0.05)
    event = threading.Event()
    event.set()
    with pytest.raises(AttributionCancelled):
        logit_ranking(model, tcs[1], TOKENS, 7, cancel=event)
    checks = 0

    def cancel_in_the_forward_pass() -> bool:
        nonlocal checks
        checks += 1
        return checks >= 2  # the first check passes, the first layer's does not

    with pytest.raises(AttributionCancelled):
        logit_ranking(model, tcs[1], TOKENS, 7, cancel=cancel_in_the_forward_pass)
    assert checks == 2  # stopped at once: no further layer, no backward pass
    assert not any(h.fwd_hooks for h in model.hook_dict.values())  # hooks removed
    never = threading.Event()
    assert logit_ranking(model, tcs[1], TOKENS, 7, cancel=never) == logit_ranking(
        model, tcs[1], TOKENS, 7
    )


def test_graph_json_schema(setup):
    _, _, _, graph = setup
    data = to_graph_json(graph, slug="unit", scan="random", decode=lambda t: f"<{t}>")
    json.dumps(data)
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    meta = data["metadata"]
    assert meta["slug"] == "unit" and meta["schema_version"] == 1
    assert len(meta["prompt_tokens"]) == len(TOKENS)
    ids = {n["node_id"] for n in data["nodes"]}
    for link in data["links"]:
        assert link["source"] in ids and link["target"] in ids
    types = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit"} <= types
    keys = {
        "node_id",
        "feature",
        "layer",
        "ctx_idx",
        "feature_type",
        "token_prob",
        "is_target_logit",
        "run_idx",
        "reverse_ctx_idx",
        "jsNodeId",
        "clerp",
        "influence",
        "activation",
    }
    for node in data["nodes"]:
        assert set(node) == keys
    assert sum(n["is_target_logit"] for n in data["nodes"]) == 1


def test_model_lock_held_only_for_the_forward_pass(models):
    _, model = models
    tcs = random_transcoders(model.cfg.n_layers, model.cfg.d_model, 64, density=0.05)
    lock = threading.Lock()
    held: list[tuple[str, bool]] = []
    attribute(
        model,
        tcs,
        TOKENS,
        max_feature_nodes=20,
        batch_size=8,
        model_lock=lock,
        progress=lambda s, f: held.append((s, lock.locked())),
    )
    assert not lock.locked()
    assert all(not locked for stage, locked in held if stage == "features")
    assert not model.hook_dict["blocks.0.hook_mlp_out"].fwd_hooks  # no hook left behind


def test_no_active_features_and_bad_arguments(models):
    _, model = models
    tcs = random_transcoders(model.cfg.n_layers, model.cfg.d_model, 32, density=1e-9)
    graph = attribute(model, tcs, TOKENS, max_feature_nodes=50)
    assert graph.n_active_features == 0
    assert not any(n.kind is NodeKind.FEATURE for n in graph.nodes)
    assert completeness_errors(graph.raw).max() <= 1e-4 * graph.raw.logit_values.abs().max()
    for kwargs in (
        {"node_threshold": 1.5},
        {"edge_threshold": -0.1},
        {"desired_logit_prob": 0.0},
        {"batch_size": 0},
        {"max_logit_targets": 0},
    ):
        with pytest.raises(AttributionError):
            attribute(model, tcs, TOKENS, **kwargs)
    with pytest.raises(AttributionError):
        attribute(model, tcs, [1])
    with pytest.raises(AttributionError):
        attribute(model, tcs, [1, 10_000])
