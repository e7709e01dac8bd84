"""A dictionary's directory in SAELens's format: reading, checking, fingerprinting, writing.

Owns: ``sae_weights.safetensors`` (any float dtype, converted to float32), the optional
``dataset_stats.safetensors`` (key ``mean``: [d_out], the FVU centre), the tensor checks
(names, shapes, finite values), the content fingerprint, the default id and version,
``load_dictionary`` (files -> checked ``Dictionary``), ``dictionary_from_tensors`` (the same
from tensors in memory, for the tooling's not-yet-written dictionaries) and
``write_dictionary``, which writes the same format (for the tooling and tests).

Decisions:
    * Fingerprint: sha256 over the canonical JSON of cfg.json (sorted keys, no spaces), then
      every tensor of sae_weights.safetensors and dataset_stats.safetensors in name order as
      stored on disk (name, dtype, shape, raw bytes); the first 16 hex digits. Anything that
      changes the math or the FVU changes it; re-serialising the same content does not.

Must not: import gRPC, touch a live model, or fetch anything from a hub.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .base import Dictionary, DictionaryConfig
from .cfg import check_hooks, normalize_activations, parse_config, scaling_factor
from .errors import DictionaryLoadError
from .registry import architecture_class

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
STATS_FILENAME = "dataset_stats.safetensors"
FINGERPRINT_HEX_DIGITS = 16


# -- weights ----------------------------------------------------------------------------------


def _expected_shapes(cls: type[Dictionary], cfg: DictionaryConfig) -> dict[str, tuple[int, ...]]:
    dims = {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "d_out": cfg.d_out}
    shapes = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_out),
        "b_dec": (cfg.d_out,),
    }
    for param, spec in cls.extra_parameters.items():
        shapes[param] = tuple(dims[d] for d in spec.split(","))
    return shapes


def _read_tensors(path: Path, name: str) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises several types for a bad file
        raise DictionaryLoadError(f"{name}: cannot read {path.name}: {exc}") from exc


def _check_weights(
    cls: type[Dictionary], cfg: DictionaryConfig, weights: dict[str, Tensor], name: str
) -> dict[str, Tensor]:
    weights = dict(weights)
    legacy = weights.pop("scaling_factor", None)
    if legacy is not None and not torch.all(legacy == 1):
        raise DictionaryLoadError(f"{name}: a finetuning scaling_factor is not supported")
    expected = _expected_shapes(cls, cfg)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise DictionaryLoadError(
            f"{name}: {cfg.architecture} expects tensors {sorted(expected)}; "
            f"missing {missing}, unexpected {extra}"
        )
    for key, shape in expected.items():
        tensor = weights[key]
        if tuple(tensor.shape) != shape:
            raise DictionaryLoadError(
                f"{name}: {key} has shape {tuple(tensor.shape)}, expected {shape} "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}, d_out={cfg.d_out})"
            )
        if not tensor.is_floating_point():
            raise DictionaryLoadError(f"{name}: {key} has non-float dtype {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise DictionaryLoadError(f"{name}: {key} holds NaN or infinite values")
    return {k: weights[k].to(torch.float32) for k in expected}


# -- identity ---------------------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def fingerprint(cfg_raw: Mapping[str, Any], *tensor_groups: Mapping[str, Tensor]) -> str:
    """Content hash of a dictionary: canonical cfg JSON + tensors as stored (see module doc)."""
    h = hashlib.sha256()
    h.update(canonical_json(cfg_raw))
    for group_index, group in enumerate(tensor_groups):
        h.update(f"\0group{group_index}".encode())
        for key in sorted(group):
            tensor = group[key].detach().cpu().contiguous()
            h.update(f"\0{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:FINGERPRINT_HEX_DIGITS]


def default_dictionary_id(cfg: DictionaryConfig, version: str) -> str:
    """``<model>/<architecture>-<d_sae>/<hook>@<version>`` from the cfg's metadata."""
    model = cfg.model_name or "unknown-model"
    return f"{model}/{cfg.architecture}-{cfg.d_sae}/{cfg.hook_name}@{version}"


def _resolve_version(
    dictionary_id: str | None, version: str | None, cfg_raw: Mapping[str, Any]
) -> str:
    from_id = dictionary_id.rpartition("@")[2] if dictionary_id and "@" in dictionary_id else None
    if version and from_id and version != from_id:
        raise DictionaryLoadError(
            f"{dictionary_id}: version {version!r} disagrees with the id's version {from_id!r}"
        )
    meta_version = (cfg_raw.get("metadata") or {}).get("version")
    return version or from_id or (str(meta_version) if meta_version else "v0")


# -- load -------------------------------------------------------------------------------------


def load_dictionary(
    path: str | Path,
    *,
    dictionary_id: str | None = None,
    version: str | None = None,
    expected_hooks: Iterable[str] | None = None,
    d_model: int | None = None,
    hook_dims: Mapping[str, int] | None = None,
    metrics: Mapping[str, float | int | None] | None = None,
    description: str | None = None,
) -> Dictionary:
    """Load one SAELens-format dictionary directory, checked against the model.

    Args:
        path: directory holding cfg.json + sae_weights.safetensors (+ dataset_stats.safetensors).
        dictionary_id: the id to serve it under; default ``default_dictionary_id``.
        version: its version; default the id's ``@`` suffix, cfg metadata ``version``, or v0.
        expected_hooks: the hook names the engine exposes (None: not checked).
        d_model: the model's residual width (None: not checked).
        hook_dims: hook name -> width, when the engine knows it (overrides d_model).
        metrics: quality figures from the catalog (l0, fvu, dead_fraction, ce_loss_delta, ...).
        description: human text (default: one made from the cfg).

    Raises:
        DictionaryLoadError: the files are missing or malformed, or do not fit the model.
    """
    directory = Path(path)
    name = dictionary_id or str(directory)
    cfg_path = directory / CFG_FILENAME
    weights_path = directory / WEIGHTS_FILENAME
    for needed in (cfg_path, weights_path):
        if not needed.is_file():
            raise DictionaryLoadError(f"{name}: {needed} does not exist")
    try:
        cfg_raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise DictionaryLoadError(f"{name}: cannot parse {cfg_path}: {exc}") from exc
    if not isinstance(cfg_raw, dict):
        raise DictionaryLoadError(f"{name}: {cfg_path} is not a JSON object")

    cfg = parse_config(cfg_raw, name=name)
    check_hooks(cfg, name=name, expected_hooks=expected_hooks, d_model=d_model, hook_dims=hook_dims)
    stored = _read_tensors(weights_path, name)
    stats: dict[str, Tensor] = {}
    if (directory / STATS_FILENAME).is_file():
        stats = _read_tensors(directory / STATS_FILENAME, name)
    return _build(
        cfg,
        cfg_raw,
        stored,
        stats,
        name=name,
        source=str(directory.resolve()),
        dictionary_id=dictionary_id,
        version=version,
        metrics=metrics,
        description=description,
    )


def dictionary_from_tensors(
    cfg_raw: Mapping[str, Any],
    weights: Mapping[str, Tensor],
    *,
    dataset_mean: Tensor | None = None,
    dictionary_id: str | None = None,
    version: str | None = None,
    source: str = "memory",
    metrics: Mapping[str, float | int | None] | None = None,
    description: str | None = None,
) -> Dictionary:
    """The ``Dictionary`` that ``write_dictionary`` + ``load_dictionary`` would give, built
    from a cfg.json object and tensors in memory (same checks; the fingerprint hashes the
    tensors as given, so it equals the written files' when they are given in the stored dtype).

    Args:
        cfg_raw: the cfg.json object.
        weights: SAELens names and orientation.
        dataset_mean: [d_out] the FVU centre (``dataset_stats.safetensors``'s ``mean``).
        dictionary_id, version, metrics, description: as for ``load_dictionary``.
        source: what ``Dictionary.source`` says (no directory holds it).
    """
    name = dictionary_id or source
    stats = {} if dataset_mean is None else {"mean": dataset_mean.detach().cpu()}
    return _build(
        parse_config(cfg_raw, name=name),
        dict(cfg_raw),
        {k: v.detach().cpu() for k, v in weights.items()},
        stats,
        name=name,
        source=source,
        dictionary_id=dictionary_id,
        version=version,
        metrics=metrics,
        description=description,
    )


def _build(
    cfg: DictionaryConfig,
    cfg_raw: Mapping[str, Any],
    stored: dict[str, Tensor],
    stats: dict[str, Tensor],
    *,
    name: str,
    source: str,
    dictionary_id: str | None,
    version: str | None,
    metrics: Mapping[str, float | int | None] | None = None,
    description: str | None = None,
) -> Dictionary:
    """Check the tensors (as stored) against the parsed cfg and construct the dictionary."""
    cls = architecture_class(cfg.architecture, name=name)

    weights = _check_weights(cls, cfg, stored, name)
    factor = scaling_factor(cfg_raw, cfg_raw.get("metadata") or {})
    if normalize_activations(cfg_raw) == "expected_average_only_in" and factor is not None:
        weights["W_enc"] = weights["W_enc"] * factor
        weights["W_dec"] = weights["W_dec"] / factor
        weights["b_dec"] = weights["b_dec"] / factor

    dataset_mean = None
    if "mean" in stats:
        dataset_mean = stats["mean"].to(torch.float32)
        if tuple(dataset_mean.shape) != (cfg.d_out,):
            raise DictionaryLoadError(
                f"{name}: {STATS_FILENAME} 'mean' has shape {tuple(dataset_mean.shape)}, "
                f"expected ({cfg.d_out},)"
            )

    resolved_version = _resolve_version(dictionary_id, version, cfg_raw)
    resolved_id = dictionary_id or default_dictionary_id(cfg, resolved_version)
    if description is None:
        description = str((cfg_raw.get("metadata") or {}).get("description") or "") or (
            f"{cfg.architecture} dictionary, {cfg.d_sae} features, "
            f"{cfg.hook_name}" + (f" -> {cfg.hook_name_out}" if cls.is_transcoder else "")
        )
    clean_metrics = {k: None if v is None else float(v) for k, v in (metrics or {}).items()}
    try:
        return cls(
            cfg,
            weights,
            dictionary_id=resolved_id,
            version=resolved_version,
            fingerprint=fingerprint(cfg_raw, stored, stats),
            source=source,
            metrics=clean_metrics,
            description=description,
            dataset_mean=dataset_mean,
        )
    except ValueError as exc:
        raise DictionaryLoadError(f"{name}: {exc}") from exc


# -- write ------------------------------------------------------------------------------------


def write_dictionary(
    path: str | Path,
    weights: Mapping[str, Tensor],
    *,
    architecture: str,
    hook_name: str,
    hook_name_out: str | None = None,
    model_name: str = "",
    dtype: torch.dtype | None = None,
    compute_dtype: str | None = None,
    dataset_mean: Tensor | None = None,
    apply_b_dec_to_input: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
    **cfg_fields: Any,
) -> Path:
    """Write a dictionary in the SAELens 6 on-disk format (cfg.json + sae_weights.safetensors).

    Args:
        path: target directory (created).
        weights: SAELens names and orientation (W_enc [d_in, d_sae], W_dec [d_sae, d_out], ...).
        architecture: SAELens architecture string.
        hook_name / hook_name_out: TransformerLens hook names (hook_name_out for transcoders).
        model_name: recorded in metadata (used by the default id).
        dtype: storage dtype (default: as given).
        compute_dtype: the cfg's ``dtype``, what SAELens casts to on load (default: the
            storage dtype's name; "float32" keeps SAELens in float32 for float16 files).
        dataset_mean: [d_out] written to dataset_stats.safetensors as ``mean``.
        apply_b_dec_to_input: default True for SAEs, False for transcoders.
        metadata: extra metadata entries.
        **cfg_fields: further top-level cfg fields (k, rescale_acts_by_decoder_norm, ...).
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    cls = architecture_class(architecture)
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    d_in, d_sae = tensors["W_enc"].shape
    d_out = tensors["W_dec"].shape[1]
    meta: dict[str, Any] = {"hook_name": hook_name, "model_name": model_name}
    if cls.is_transcoder:
        meta["hook_name_out"] = hook_name_out
    meta.update(metadata or {})
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": compute_dtype or str(tensors["W_enc"].dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": (not cls.is_transcoder)
        if apply_b_dec_to_input is None
        else apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    }
    if cls.is_transcoder:
        cfg["d_out"] = int(d_out)
    cfg.update(cfg_fields)
    save_file(tensors, str(directory / WEIGHTS_FILENAME))
    (directory / CFG_FILENAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if dataset_mean is not None:
        save_file(
            {"mean": dataset_mean.detach().cpu().contiguous()}, str(directory / STATS_FILENAME)
        )
    return directory
