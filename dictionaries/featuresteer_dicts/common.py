"""Shared constants, paths and small helpers for the dictionaries tooling.

Why one module: every step (corpus, activations, training, evaluation, metadata) must agree on
the model, context length, seeds and cache layout, or figures stop being comparable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

SEED = 1234
CTX = 128  # tokens per window, BOS included
BOS_ID = 1  # <|im_start|>; the tokenizer does not add it, we do
MODEL_NAME = "smollm2-135m-instruct"
MODEL_SHORT = "smollm2-135m"
SAE_LAYERS = (6, 12, 18, 24)
SAE_WIDTH = 4608
SAE_K = 48
TC_WIDTH = 2304
TC_K = 32  # BatchTopK budget per token; exported as a JumpReLU threshold
N_LAYERS = 30
D_MODEL = 576
SAE_FAMILY = f"res-topk-{SAE_WIDTH}"
TC_FAMILY = f"transcoder-{TC_WIDTH}"
# Versions. A retrain is a new version (artifacts are immutable); the corpus and the
# activation cache have their own, so a dictionary retrain reuses them.
CORPUS_VERSION = "v1"
SAE_VERSION = "v2"  # v1 (538,480 tokens, a compute cut-off) is in the git history
TC_VERSION = "v1"
FAMILY_VERSION = {SAE_FAMILY: SAE_VERSION, TC_FAMILY: TC_VERSION}
EVAL_TOKENS = 20_000  # held-out tokens (BOS excluded) behind every catalog figure
CE_EVAL_TOKENS = 20_000

Progress = Callable[[str], None]


def cache_root() -> Path:
    """``~/.cache/featuresteer`` (or ``FEATURESTEER_CACHE_DIR``), shared with the server."""
    root = os.environ.get("FEATURESTEER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "featuresteer"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def corpus_dir() -> Path:
    return cache_root() / "corpus" / CORPUS_VERSION


def train_dir() -> Path:
    path = cache_root() / "train"
    path.mkdir(parents=True, exist_ok=True)
    return path


def repo_dict_root() -> Path:
    """``dictionaries/`` in the checkout (this package lives inside it: ``make setup`` installs
    it editable); ``FEATURESTEER_DICTS_ROOT`` redirects (tests, a non-editable install)."""
    override = os.environ.get("FEATURESTEER_DICTS_ROOT")
    return Path(override) if override else Path(__file__).resolve().parent.parent


def sae_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def tc_hooks(layer: int) -> tuple[str, str]:
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


def dict_id(family: str, hook: str, version: str | None = None) -> str:
    return f"{MODEL_SHORT}/{family}/{hook}@{version or FAMILY_VERSION[family]}"


def artifact_rel(family: str, hook: str, version: str | None = None) -> str:
    """Artifact directory relative to ``dictionaries/``."""
    return f"{MODEL_SHORT}/{family}/{hook}/{version or FAMILY_VERSION[family]}"


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def load_model(n_threads: int | None = None) -> tuple[Any, Any]:
    """(HookedTransformer, tokenizer) for the default model in float32, as the server builds it.

    ``n_threads`` None keeps torch's current setting (the CLI sets it from
    FEATURESTEER_DICTS_THREADS)."""
    import torch

    from featuresteer_server.models import build_hooked, load_hf, prepare_default_model

    if n_threads is not None:
        torch.set_num_threads(n_threads)
    model_dir = prepare_default_model()
    hf, tok = load_hf(model_dir, torch.float32)
    model = build_hooked(hf, tok, torch.float32)
    del hf
    return model, tok
