"""The catalog cannot drift from the shipped files: recompute L0, FVU and dead fraction from
the weights on the rebuilt held-out split (within 2%), check SAELens loads every directory and
encodes as we do, and replay stored top examples through the real model.

Needs the default model and the corpus packages (the corpus step apt-installs them as root).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from featuresteer_dicts.common import repo_dict_root

pytestmark = pytest.mark.e2e

DICTS = repo_dict_root()  # FEATURESTEER_DICTS_ROOT may point at another build
CATALOG = DICTS / "catalog.json"


def _entries() -> list[dict]:
    if not CATALOG.is_file():
        return []
    return json.loads(CATALOG.read_text())["dictionaries"]


@pytest.fixture(scope="module")
def model():
    import torch

    from featuresteer_dicts.common import load_model
    from featuresteer_dicts.corpus import build_corpus

    torch.set_num_threads(max(1, torch.get_num_threads()))
    build_corpus(lambda s: None)
    m, _ = load_model(torch.get_num_threads())
    return m


@pytest.mark.skipif(not _entries(), reason="no dictionaries in the catalog yet")
def test_heldout_split_is_the_catalogued_one(model) -> None:
    from featuresteer_dicts.corpus import corpus_dir

    manifest = json.loads((corpus_dir() / "manifest.json").read_text())
    corpus = json.loads(CATALOG.read_text()).get("corpus", {})
    if "heldout_sha256" in corpus:
        assert manifest["heldout_sha256"] == corpus["heldout_sha256"], (
            "the rebuilt held-out split differs (Debian package versions changed?)"
        )


@pytest.mark.skipif(not _entries(), reason="no dictionaries in the catalog yet")
def test_catalog_figures_match_shipped_weights(model) -> None:
    import torch

    from featuresteer_dicts.artifacts import load
    from featuresteer_dicts.common import EVAL_TOKENS
    from featuresteer_dicts.corpus import eval_windows
    from featuresteer_dicts.evaluate import reconstruction_metrics, run_eval_hooks

    entries = _entries()
    coders = {e["id"]: load(DICTS / e["path"], e["id"]) for e in entries}
    windows = eval_windows(EVAL_TOKENS)
    hooks = sorted({h for c in coders.values() for h in (c.hook_name, c.hook_name_out)})
    with torch.no_grad():
        batches = list(run_eval_hooks(model, windows, hooks))
    got = reconstruction_metrics(coders, batches)
    for e in entries:
        want, have = e["metrics"], got[e["id"]]
        assert have["n_eval_tokens"] == want["n_eval_tokens"], e["id"]
        assert have["l0"] == pytest.approx(want["l0"], rel=0.02), e["id"]
        assert have["fvu"] == pytest.approx(want["fvu"], rel=0.02), e["id"]
        assert have["dead_fraction"] == pytest.approx(want["dead_fraction"], rel=0.02, abs=2e-3)


@pytest.mark.skipif(not _entries(), reason="no dictionaries in the catalog yet")
def test_saelens_loads_and_encodes_like_us() -> None:
    import torch

    from featuresteer_dicts.artifacts import check_saelens

    gen = torch.Generator().manual_seed(0)
    for e in _entries():
        x = torch.randn(32, e["d_in"], generator=gen) * 4
        assert check_saelens(DICTS / e["path"], x) < 1e-3, e["id"]


@pytest.mark.skipif(not _entries(), reason="no dictionaries in the catalog yet")
def test_stored_top_examples_replay(model) -> None:
    """A stored top example, run again through the model, gives the recorded activation."""
    import torch

    from featuresteer_dicts.activations import run_hooks
    from featuresteer_dicts.artifacts import load
    from featuresteer_dicts.corpus import load_split

    train = load_split("train")
    for e in _entries():
        if not e["metadata"]:
            continue
        meta = np.load(DICTS / e["metadata"])
        coder = load(DICTS / e["path"], e["id"])
        live = np.nonzero(meta["top_len"][:, 0])[0][:3]
        for f in live:
            w, p = int(meta["top_window"][f, 0]), int(meta["top_argmax"][f, 0])
            acts = run_hooks(model, train[w : w + 1], [coder.hook_name])[coder.hook_name]
            a = coder.encode(acts[0, p - 1 : p])[0, f]  # acts drop BOS: window pos p -> p - 1
            # SAE metadata was computed from float16-cached activations: allow 3%.
            assert float(a) == pytest.approx(float(meta["top_max"][f, 0]), rel=0.03), (e["id"], f)
            assert torch.isfinite(a)


def test_transcoder_training_taps_match_hooked_engine(model) -> None:
    """Transcoders train on plain-transformers captures; they must equal the engine's hooks."""
    import torch

    from featuresteer_dicts.activations import load_hf_model, mlp_pairs, run_hooks
    from featuresteer_dicts.common import N_LAYERS, tc_hooks
    from featuresteer_dicts.corpus import eval_windows

    windows = eval_windows(2 * 127)[:2]
    hooks = [h for layer in range(N_LAYERS) for h in tc_hooks(layer)]
    ours = mlp_pairs(load_hf_model(torch.get_num_threads()), windows)
    theirs = run_hooks(model, windows, hooks)
    assert sorted(ours) == sorted(hooks)
    for h in hooks:
        want = theirs[h].reshape(-1, theirs[h].shape[-1])
        assert ours[h].shape == want.shape, h
        # float32 through different kernels (HF sdpa vs TL einsum): errors scale with the
        # hook's magnitude (measured worst ~1e-6 of max|x|); a wrong formula is off by O(1)
        err = float((ours[h] - want).abs().max())
        assert err <= 1e-4 * float(want.abs().max()), (h, err)
