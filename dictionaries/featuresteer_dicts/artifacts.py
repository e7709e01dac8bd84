"""Shipped dictionaries: their SAELens cfgs and directories, written and loaded through the
server's dictionary runtime (``featuresteer_server.dictionaries``), and the SAELens check.

There is one implementation of each dictionary's math, the runtime's ``Dictionary``: the
evaluation, the metadata and the tests encode with exactly what the server serves. The check
compares it with SAELens's own ``encode`` on the written files.
"""

from __future__ import annotations

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
    dict_id,
    repo_dict_root,
    sae_hook,
    tc_hooks,
)
from featuresteer_server.dictionaries import (
    Dictionary,
    dictionary_from_tensors,
    files,
    load_catalog,
    load_catalog_entry,
    load_dictionary,
    write_dictionary,
)

CFG, WEIGHTS, STATS = files.CFG_FILENAME, files.WEIGHTS_FILENAME, files.STATS_FILENAME

__all__ = [
    "CFG",
    "STATS",
    "WEIGHTS",
    "catalog_transcoders",
    "check_saelens",
    "in_memory",
    "load",
    "sae_cfg",
    "sae_dir",
    "tc_cfg",
    "tc_dir",
    "write_artifact",
]


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
    """cfg.json + float16 weights + float32 dataset mean; refuses to overwrite (a retrain is v2).

    ``cfg`` is a ``sae_cfg``/``tc_cfg``; its ``dtype`` ("float32") is what SAELens computes in.
    """
    if (out / WEIGHTS).exists():
        raise FileExistsError(f"{out} exists: artifacts are immutable, bump the version")
    fields = {k: v for k, v in cfg.items() if k not in ("architecture", "dtype", "metadata")}
    meta = cfg["metadata"]
    write_dictionary(
        out,
        weights,
        architecture=cfg["architecture"],
        hook_name=meta["hook_name"],
        hook_name_out=meta.get("hook_name_out"),
        model_name=meta["model_name"],
        dtype=torch.float16,
        compute_dtype=cfg["dtype"],
        dataset_mean=mean.float(),
        metadata=meta,
        **fields,
    )


def load(path: Path, dictionary_id: str | None = None) -> Dictionary:
    """A shipped directory as the runtime loads it (float32)."""
    return load_dictionary(path, dictionary_id=dictionary_id)


def in_memory(
    cfg: dict[str, Any], weights: dict[str, Tensor], mean: Tensor | None = None
) -> Dictionary:
    """The runtime dictionary that ``write_artifact(cfg, weights, mean)`` would ship, without
    writing it (weights as given, not rounded to float16)."""
    meta = cfg["metadata"]
    did = dict_id(SAE_FAMILY if cfg["architecture"] == "topk" else TC_FAMILY, meta["hook_name"])
    return dictionary_from_tensors(cfg, weights, dataset_mean=mean, dictionary_id=did)


def check_saelens(path: Path, x: Tensor) -> float:
    """Max |SAELens encode - our encode| on x; raises if SAELens cannot load the files."""
    from sae_lens import SAE

    ours = load(path)
    sae = SAE.load_from_disk(str(path), device="cpu")
    with torch.no_grad():
        theirs = sae.encode(x.float())
    return float((theirs - ours.encode(x)).abs().max())


def catalog_transcoders(n_layers: int) -> list[Dictionary]:
    """The catalog's per-layer transcoders (``dictionaries/catalog.json``), by layer, loaded
    with the catalog's ids and figures (attribution parity, its benchmark, the acceptance
    check).

    Raises:
        FileNotFoundError: the catalog lacks a transcoder for some layer.
    """
    by_layer: dict[int, Dictionary] = {}
    for entry in load_catalog(repo_dict_root() / "catalog.json"):
        if entry.hook_name_out and entry.hook_name_out != entry.hook_name:
            by_layer[int(entry.hook_name_out.split(".")[1])] = load_catalog_entry(entry)
    missing = [layer for layer in range(n_layers) if layer not in by_layer]
    if missing:
        raise FileNotFoundError(f"no shipped transcoder for layers {missing}")
    return [by_layer[layer] for layer in range(n_layers)]
