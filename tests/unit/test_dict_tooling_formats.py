"""Unit tests of the on-disk formats: SAELens loads what we write and encodes like us; the
circuit-tracer export has its layout; artifacts are never overwritten; features.npz has one
writer and one reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from featuresteer_dicts.artifacts import (
    check_saelens,
    load,
    sae_cfg,
    tc_cfg,
    write_artifact,
)

pytestmark = pytest.mark.unit


def _weights(d: int, f: int, threshold: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    w = {
        "W_enc": torch.randn(d, f, generator=gen),
        "b_enc": torch.randn(f, generator=gen) * 0.1,
        "W_dec": torch.randn(f, d, generator=gen),
        "b_dec": torch.randn(d, generator=gen) * 0.1,
    }
    if threshold:
        w["threshold"] = torch.full((f,), 0.7)
    return w


def test_topk_sae_roundtrip_through_saelens(tmp_path: Path) -> None:
    out = tmp_path / "sae"
    write_artifact(out, sae_cfg(8, 32, 4, 6, 1000), _weights(8, 32, False), torch.zeros(8))
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4
    assert cfg["metadata"]["hook_name"] == "blocks.6.hook_resid_post"
    assert check_saelens(out, torch.randn(16, 8)) < 1e-4
    coder = load(out)
    assert coder.W_enc.dtype == torch.float32 and coder.W_enc.shape == (8, 32)


def test_jumprelu_transcoder_roundtrip_through_saelens(tmp_path: Path) -> None:
    out = tmp_path / "tc"
    write_artifact(out, tc_cfg(8, 32, 3, 1000, 4), _weights(8, 32, True), torch.ones(8))
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_transcoder" and cfg["d_out"] == 8
    assert cfg["metadata"]["hook_name"] == "blocks.3.ln2.hook_normalized"
    assert cfg["metadata"]["hook_name_out"] == "blocks.3.hook_mlp_out"
    assert check_saelens(out, torch.randn(16, 8) * 3) < 1e-4
    assert torch.equal(load(out).dataset_mean, torch.ones(8))


def test_artifacts_are_immutable(tmp_path: Path) -> None:
    out = tmp_path / "sae"
    write_artifact(out, sae_cfg(8, 32, 4, 6, 1000), _weights(8, 32, False), torch.zeros(8))
    with pytest.raises(FileExistsError):
        write_artifact(out, sae_cfg(8, 32, 4, 6, 1000), _weights(8, 32, False), torch.zeros(8))


def test_circuit_tracer_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    import featuresteer_dicts.build as build

    monkeypatch.setenv("FEATURESTEER_DICTS_ROOT", str(tmp_path / "dicts"))
    monkeypatch.setattr(build, "N_LAYERS", 2)
    for layer in range(2):
        write_artifact(
            build.tc_dir(layer), tc_cfg(8, 32, layer, 10, 4), _weights(8, 32, True), torch.zeros(8)
        )
    out = build.export_circuit_tracer(lambda s: None, tmp_path / "ct")
    layer0 = load_file(str(out / "layer_0.safetensors"))
    assert layer0["W_enc"].shape == (32, 8) and layer0["W_dec"].shape == (32, 8)
    assert "activation_function.threshold" in layer0
    text = (out / "config.yaml").read_text()
    assert "model_kind: transcoder_set" in text
    assert "feature_input_hook: ln2.hook_normalized" in text
    listed = [line.split("- ", 1)[1] for line in text.splitlines() if line.startswith("  - ")]
    assert listed == [str((out / f"layer_{i}.safetensors").resolve()) for i in range(2)]
    src = load_file(str(build.tc_dir(0) / "sae_weights.safetensors"))
    assert torch.equal(layer0["W_enc"], src["W_enc"].float().t())
    assert torch.equal(layer0["activation_function.threshold"], src["threshold"].float())


def test_catalog_versions_and_recorded_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retrain of one family on a fresh machine (metrics.json holds only its figures) keeps
    the other family's recorded figures without re-evaluating them, drops entries whose files
    left the tree, and ids and directories carry each family's own version."""
    import featuresteer_dicts.build as build
    from featuresteer_dicts.common import SAE_VERSION, TC_VERSION, corpus_dir, train_dir

    monkeypatch.setenv("FEATURESTEER_DICTS_ROOT", str(tmp_path / "dicts"))
    monkeypatch.setenv("FEATURESTEER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "N_LAYERS", 1)
    monkeypatch.setattr(build, "SAE_LAYERS", (6,))
    zero = torch.zeros(8)
    write_artifact(build.tc_dir(0), tc_cfg(8, 32, 0, 10, 4), _weights(8, 32, True), zero)
    write_artifact(build.sae_dir(6), sae_cfg(8, 32, 4, 6, 10), _weights(8, 32, False), zero)
    assert build.sae_dir(6).name == SAE_VERSION and build.tc_dir(0).name == TC_VERSION
    assert SAE_VERSION != TC_VERSION  # the SAEs were retrained (v2); the transcoders were not
    figures = {"l0": 4.0, "fvu": 0.2, "dead_fraction": 0.0, "ce_loss_delta": 0.1,
               "n_eval_tokens": 100, "n_ce_tokens": 50}  # fmt: skip
    tc_id = f"smollm2-135m/transcoder-2304/blocks.0.ln2.hook_normalized@{TC_VERSION}"
    sae_id = f"smollm2-135m/res-topk-4608/blocks.6.hook_resid_post@{SAE_VERSION}"
    old_sae = "smollm2-135m/res-topk-4608/blocks.6.hook_resid_post@v0"
    root = tmp_path / "dicts"
    recorded = [
        {"id": tc_id, "path": str(build.tc_dir(0).relative_to(root)), "metrics": figures},
        {"id": old_sae, "path": "smollm2-135m/gone/v0", "metrics": figures},
    ]
    (root / "catalog.json").write_text(json.dumps({"dictionaries": recorded}))
    (train_dir() / "metrics.json").write_text(json.dumps({sae_id: {**figures, "fvu": 0.1}}))
    corpus_dir().mkdir(parents=True)
    (corpus_dir() / "manifest.json").write_text(
        json.dumps({"heldout_sha256": "ab", "debian_versions": {}})
    )
    build.write_catalog(lambda s: None)
    entries = {e["id"]: e for e in json.loads((root / "catalog.json").read_text())["dictionaries"]}
    assert set(entries) == {tc_id, sae_id}
    assert entries[tc_id]["metrics"] == figures and entries[tc_id]["version"] == TC_VERSION
    assert entries[sae_id]["metrics"]["fvu"] == 0.1 and entries[sae_id]["version"] == SAE_VERSION
    assert entries[sae_id]["path"].endswith(f"blocks.6.hook_resid_post/{SAE_VERSION}")
    # the recorded figures count as evaluated (no model is loaded) and the family as written
    assert build.evaluate(lambda s: None, build.TC_FAMILY)[tc_id] == figures
    assert build.all_written(build.TC_FAMILY) and build.all_written(build.SAE_FAMILY)
    monkeypatch.setattr(build, "SAE_LAYERS", (6, 12))
    assert not build.all_written(build.SAE_FAMILY)
