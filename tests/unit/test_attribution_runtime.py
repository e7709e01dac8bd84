"""Attribution with transcoders loaded by the dictionaries runtime (SAELens format on disk):
ReLU, JumpReLU and skip transcoders, and the export to circuit-tracer's layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from featuresteer_server.attribution import attribute, export_transcoder_set, logit_ranking
from featuresteer_server.attribution.replacement import collect_features, run_frozen_forward
from featuresteer_server.attribution.testing import tiny_llama
from featuresteer_server.attribution.verify import completeness_errors, error_vectors
from featuresteer_server.dictionaries import load_dictionary, write_dictionary

pytestmark = pytest.mark.unit

TOKENS = [1, 8, 21, 40, 3, 77, 15, 60]


def _weights(d: int, d_sae: int, seed: int, arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(d, d_sae, generator=g) / d**0.5,
        "b_enc": torch.randn(d_sae, generator=g) * 0.1 - 1.5,
        "W_dec": torch.randn(d_sae, d, generator=g) * 0.05,
        "b_dec": torch.randn(d, generator=g) * 0.05,
    }
    if "jumprelu" in arch:
        w["threshold"] = torch.rand(d_sae, generator=g) * 0.3
    if "skip" in arch:
        w["W_skip"] = torch.randn(d, d, generator=g) * 0.01
    return w


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_llama()[1]


def _load_set(root: Path, model, arch: str) -> list:
    d = model.cfg.d_model
    out = []
    for layer in range(model.cfg.n_layers):
        path = write_dictionary(
            root / f"{arch}-{layer}",
            _weights(d, 128, layer, arch),
            architecture=arch,
            hook_name=f"blocks.{layer}.ln2.hook_normalized",
            hook_name_out=f"blocks.{layer}.hook_mlp_out",
            model_name="tiny",
        )
        out.append(load_dictionary(path, expected_hooks=set(model.hook_dict), d_model=d))
    return out


@pytest.mark.parametrize("arch", ["transcoder", "jumprelu_transcoder", "skip_transcoder"])
def test_runtime_transcoders(tmp_path: Path, model, arch: str) -> None:
    tcs = _load_set(tmp_path, model, arch)
    graph = attribute(
        model, tcs, TOKENS, max_feature_nodes=40, batch_size=16,
        dictionary_ids=[tc.id for tc in tcs],
    )  # fmt: skip
    raw = graph.raw
    assert (completeness_errors(raw) <= 1e-4 * raw.logit_values.abs()).all()
    feats = collect_features(run_frozen_forward(model, TOKENS), tcs)
    assert torch.allclose(feats.errors, error_vectors(model, tcs, TOKENS), atol=1e-5)
    for node in graph.nodes:
        if node.kind.value == "FEATURE":
            assert node.dictionary_id == tcs[node.layer].id
    ranking = logit_ranking(model, tcs[0], TOKENS, int(raw.logit_token_ids[0]), limit=5)
    assert len(ranking) <= 5

    cfg = export_transcoder_set(tcs, tmp_path / "ct", scan="tiny")
    text = cfg.read_text()
    assert "feature_input_hook: ln2.hook_normalized" in text
    assert "feature_output_hook: hook_mlp_out" in text
    layer0 = load_file(str(tmp_path / "ct" / "layer_0.safetensors"))
    assert torch.equal(layer0["W_enc"], tcs[0].W_enc.T)
    assert torch.equal(layer0["W_dec"], tcs[0].W_dec)
    assert ("activation_function.threshold" in layer0) == ("jumprelu" in arch)
    assert ("W_skip" in layer0) == ("skip" in arch)


def test_logit_ranking_with_a_residual_sae(tmp_path: Path, model) -> None:
    d = model.cfg.d_model
    path = write_dictionary(
        tmp_path / "sae",
        _weights(d, 96, 7, "standard"),
        architecture="standard",
        hook_name="blocks.1.hook_resid_post",
        model_name="tiny",
    )
    sae = load_dictionary(path, expected_hooks=set(model.hook_dict), d_model=d)
    ranking = logit_ranking(model, sae, TOKENS, 5, limit=None)
    assert ranking and all(1 <= pos < len(TOKENS) for _, pos, _ in ranking)
    # every active feature outside BOS is ranked (limit=None)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([TOKENS]))
    acts = sae.encode(cache["blocks.1.hook_resid_post"][0])
    assert len(ranking) == int((acts[1:] > 0).sum())
