"""The shipped catalog keeps the issue's training contract (reads the repository's files only;
the e2e tier recomputes the figures from the weights)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.unit


def test_shipped_catalog_meets_the_training_contract() -> None:
    """Every catalogued dictionary: files present, id/path/cfg agree on the version, trained on
    about 1M tokens; the residual SAEs meet their quality targets (FVU <= 0.25 at L0 <= 64,
    dead <= 10%). The figures themselves are recomputed from the files by the e2e tier."""
    from featuresteer_dicts.artifacts import STATS, WEIGHTS
    from featuresteer_dicts.common import FAMILY_VERSION, SAE_FAMILY, dict_id, repo_dict_root

    root = repo_dict_root()
    entries = json.loads((root / "catalog.json").read_text())["dictionaries"]
    assert len(entries) == 34  # 4 residual SAEs + 30 transcoders
    for e in entries:
        path = root / e["path"]
        assert (path / WEIGHTS).is_file() and (path / STATS).is_file(), e["id"]
        meta = json.loads((path / "cfg.json").read_text())["metadata"]
        family = e["id"].split("/")[1]
        assert e["version"] == meta["version"] == FAMILY_VERSION[family] == path.name, e["id"]
        assert e["id"] == dict_id(family, meta["hook_name"]), e["id"]
        # >= 1M tokens, up to one 8-window forward batch: the transcoder run rounds its 7,875
        # windows down to whole batches (7,872 windows = 999,744 tokens, dictionaries/README.md)
        assert meta["training_tokens"] > 1_000_000 - 8 * 127, e["id"]
        assert f"{meta['training_tokens']:,} tokens" in e["description"], e["id"]
        if family == SAE_FAMILY:
            assert meta["training_tokens"] >= 1_000_000, e["id"]
            m = e["metrics"]
            assert m["l0"] <= 64 and m["fvu"] <= 0.25 and m["dead_fraction"] <= 0.10, e["id"]
