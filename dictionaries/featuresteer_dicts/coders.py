"""Shipped dictionaries: SAELens-format writing/reading and the encode/decode rules we ship.

The encode rules here are the reference the evaluation, the metadata and the tests use; a
check compares them with SAELens's own ``encode`` on the written files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from featuresteer_dicts.common import (
    CORPUS_VERSION,
    FAMILY_VERSION,
    MODEL_NAME,
    SAE_FAMILY,
    TC_FAMILY,
    artifact_rel,
    repo_dict_root,
    sae_hook,
    tc_hooks,
)

WEIGHTS = "sae_weights.safetensors"
STATS = "dataset_stats.safetensors"
CFG = "cfg.json"


@dataclass
class Coder:
    """A loaded dictionary in float32 (SAELens orientation)."""

    architecture: str  # "topk" | "jumprelu_transcoder"
    hook_name: str
    hook_name_out: str
    W_enc: Tensor  # [d_in, d_sae]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_sae, d_out]
    b_dec: Tensor  # [d_out]
    mean: Tensor  # [d_out] dataset mean of the target, for FVU
    k: int = 0
    threshold: Tensor | None = None  # [d_sae]

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def encode(self, x: Tensor) -> Tensor:
        """[n, d_in] -> [n, d_sae] feature activations, float32."""
        x = x.float()
        if self.architecture == "topk":
            pre = (x - self.b_dec) @ self.W_enc + self.b_enc
            vals, idx = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))
        pre = torch.relu(x @ self.W_enc + self.b_enc)
        assert self.threshold is not None
        return pre * (pre > self.threshold)

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec


def sae_cfg(d_in: int, d_sae: int, k: int, layer: int, train_tokens: int) -> dict[str, Any]:
    return {
        "architecture": "topk",
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "rescale_acts_by_decoder_norm": False,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": _metadata(SAE_FAMILY, sae_hook(layer), None, layer, train_tokens),
    }


def tc_cfg(d_in: int, d_sae: int, layer: int, train_tokens: int, k: int) -> dict[str, Any]:
    h_in, h_out = tc_hooks(layer)
    meta = _metadata(TC_FAMILY, h_in, h_out, layer, train_tokens)
    meta["training_rule"] = f"BatchTopK k={k}, exported as JumpReLU with one global threshold"
    return {
        "architecture": "jumprelu_transcoder",
        "d_in": d_in,
        "d_sae": d_sae,
        "d_out": d_in,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    }


def _metadata(
    family: str, hook: str, hook_out: str | None, layer: int, tokens: int
) -> dict[str, Any]:
    import sae_lens

    meta: dict[str, Any] = {
        "sae_lens_version": sae_lens.__version__,
        "sae_lens_training_version": None,
        "model_name": MODEL_NAME,
        "hook_name": hook,
        "hook_layer": layer,
        "hook_head_index": None,
        "prepend_bos": True,
        "context_size": 128,
        "dataset_path": f"featuresteer offline corpus {CORPUS_VERSION} (dictionaries/README.md)",
        "training_tokens": tokens,
        "trained_by": "featuresteer_dicts",
        "version": FAMILY_VERSION[family],
    }
    if hook_out is not None:
        meta["hook_name_out"] = hook_out
        meta["hook_layer_out"] = layer
    return meta


def sae_dir(layer: int) -> Path:
    return repo_dict_root() / artifact_rel(SAE_FAMILY, sae_hook(layer))


def tc_dir(layer: int) -> Path:
    return repo_dict_root() / artifact_rel(TC_FAMILY, tc_hooks(layer)[0])


def write_artifact(
    out: Path, cfg: dict[str, Any], weights: dict[str, Tensor], mean: Tensor
) -> None:
    """cfg.json + float16 weights + float32 dataset mean; refuses to overwrite (a retrain is v2)."""
    from safetensors.torch import save_file

    if (out / WEIGHTS).exists():
        raise FileExistsError(f"{out} exists: artifacts are immutable, bump the version")
    out.mkdir(parents=True, exist_ok=True)
    (out / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({k: v.contiguous().to(torch.float16) for k, v in weights.items()}, str(out / WEIGHTS))
    save_file({"mean": mean.float().contiguous()}, str(out / STATS))


def load_coder(path: Path) -> Coder:
    """Load a shipped directory into a float32 Coder."""
    from safetensors.torch import load_file

    cfg = json.loads((path / CFG).read_text())
    w = {k: v.float() for k, v in load_file(str(path / WEIGHTS)).items()}
    mean = load_file(str(path / STATS))["mean"].float()
    meta = cfg["metadata"]
    return Coder(
        architecture=cfg["architecture"],
        hook_name=meta["hook_name"],
        hook_name_out=meta.get("hook_name_out") or meta["hook_name"],
        W_enc=w["W_enc"],
        b_enc=w["b_enc"],
        W_dec=w["W_dec"],
        b_dec=w["b_dec"],
        mean=mean,
        k=int(cfg.get("k", 0)),
        threshold=w.get("threshold"),
    )


def check_saelens(path: Path, x: Tensor) -> float:
    """Max |SAELens encode - our encode| on x; raises if SAELens cannot load the files."""
    from sae_lens import SAE

    coder = load_coder(path)
    sae = SAE.load_from_disk(str(path), device="cpu")
    with torch.no_grad():
        theirs = sae.encode(x.float())
    return float((theirs - coder.encode(x)).abs().max())
