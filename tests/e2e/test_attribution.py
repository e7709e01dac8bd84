"""Attribution graphs on the real SmolLM2-135M-Instruct with random per-layer transcoders of
the real shapes (576 -> 2304), checked against forward passes of the real model and a plain
transformers softmax. About 40 s, most of it loading the model."""

from __future__ import annotations

import pytest
import torch

from featuresteer_server.attribution import NodeKind, attribute, logit_ranking, to_graph_json
from featuresteer_server.attribution.pruning import prune
from featuresteer_server.attribution.replacement import collect_features, run_frozen_forward
from featuresteer_server.attribution.testing import random_transcoders
from featuresteer_server.attribution.verify import (
    clean_run,
    completeness_errors,
    error_vectors,
    frozen_forward,
)

pytestmark = pytest.mark.e2e

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def real():
    torch.set_num_threads(1)
    from featuresteer_server.models import build_hooked, load_hf, prepare_default_model

    hf, tok = load_hf(prepare_default_model(), torch.float32)
    model = build_hooked(hf, tok, torch.float32)
    tokens = [tok.bos_token_id or 1] + tok(PROMPT, add_special_tokens=False).input_ids
    tcs = random_transcoders(
        model.cfg.n_layers, model.cfg.d_model, 2304, density=0.01, skip=True, seed=3
    )
    graph = attribute(model, tcs, tokens, max_feature_nodes=500, batch_size=64)
    return hf, tok, model, tcs, tokens, graph


def test_completeness_and_errors(real):
    _, _, model, tcs, tokens, graph = real
    raw = graph.raw
    errs = completeness_errors(raw)
    rel = (errs / raw.logit_values.abs()).max()
    assert rel <= 1e-4, float(rel)
    fwd = run_frozen_forward(model, tokens)
    feats = collect_features(fwd, tcs)
    assert torch.allclose(feats.errors, error_vectors(model, tcs, tokens), atol=1e-4, rtol=1e-4)


def test_interventions_top_nodes(real):
    _, _, model, tcs, tokens, graph = real
    raw = graph.raw
    fwd = run_frozen_forward(model, tokens)
    feats = collect_features(fwd, tcs)
    clean = clean_run(model, tokens)
    n_act = raw.active_features.shape[0]
    n_err = raw.n_layers * raw.n_pos
    row = raw.logit_rows_full[0]
    tok = int(raw.logit_token_ids[0])
    tol = 1e-4 * abs(float(raw.logit_values[0]))

    def effect(**kw):
        logits, _ = frozen_forward(model, tcs, tokens, clean, **kw)
        return float(clean.demeaned_logits[tok] - logits[tok])

    f = int(row[:n_act].abs().argmax())
    layer, pos, idx = raw.active_features[f].tolist()
    vec = raw.activation_values[f] * tcs[layer].W_dec[idx]
    assert abs(effect(remove_at_mlp_out=(layer, pos, vec)) - float(row[f])) <= tol
    e = int(row[n_act : n_act + n_err].abs().argmax())
    layer, pos = divmod(e, raw.n_pos)
    got = effect(remove_at_mlp_out=(layer, pos, feats.errors[layer, pos]))
    assert abs(got - float(row[n_act + e])) <= tol
    m = int(row[n_act + n_err :].abs().argmax())
    assert abs(effect(remove_at_embed=(m, fwd.embed[m])) - float(row[n_act + n_err + m])) <= tol


def test_logit_probabilities_match_transformers(real):
    hf, _, _, _, tokens, graph = real
    with torch.no_grad():
        probs = torch.softmax(hf(torch.tensor([tokens])).logits[0, -1].float(), dim=-1)
    logits = [n for n in graph.nodes if n.kind is NodeKind.LOGIT]
    assert logits and sum(n.probability for n in logits) <= 1.0
    for node in logits:
        assert abs(node.probability - float(probs[node.token_id])) <= 1e-4


def test_graph_shape_and_export(real):
    _, tok, _, _, tokens, graph = real
    assert graph.raw.n_selected == min(500, graph.n_active_features)
    # random transcoders explain little, so the default thresholds may keep no feature;
    # with everything kept, the selected features are all there
    assert int(prune(graph.raw, 1.0, 1.0).node_mask[: graph.raw.n_selected].sum()) > 0
    assert graph.edges
    data = to_graph_json(graph, slug="capital", scan="random", decode=tok.decode, prompt=PROMPT)
    assert data["metadata"]["prompt_tokens"][1:] == [tok.decode(t) for t in tokens[1:]]
    assert graph.stats["total_s"] < 60


def test_logit_ranking_real(real):
    _, tok, model, tcs, tokens, graph = real
    target = int(graph.raw.logit_token_ids[0])
    ranking = logit_ranking(model, tcs[10], tokens, target, limit=20)
    assert 0 < len(ranking) <= 20
    assert all(1 <= pos < len(tokens) for _, pos, _ in ranking)
