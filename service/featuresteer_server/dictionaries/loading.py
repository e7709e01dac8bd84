"""Loading dictionaries from disk (SAELens format) and reading the catalog.

Owns: parsing ``cfg.json`` (SAELens 6 layout, with the hook under ``metadata``, and the older
flat layout), reading ``sae_weights.safetensors`` (any float dtype, converted to float32),
the optional ``dataset_stats.safetensors`` (key ``mean``: [d_out], the FVU centre), every
check that a dictionary fits the model (architecture, tensor names and shapes, d_in, hooks,
transcoder hook pairing), the content fingerprint, the default id, and ``catalog.json``.
Also ``write_dictionary``, which writes the same format (for tooling and tests).

Decisions:
    * Fingerprint: sha256 over the canonical JSON of cfg.json (sorted keys, no spaces), then
      every tensor of sae_weights.safetensors and dataset_stats.safetensors in name order as
      stored on disk (name, dtype, shape, raw bytes); the first 16 hex digits. Anything that
      changes the math or the FVU changes it; re-serialising the same content does not.
    * Hooks: SAEs read and write one hook (``hook_name_out`` == ``hook_name``); transcoders
      must read ``blocks.L.ln2.hook_normalized`` and write ``blocks.L.hook_mlp_out`` of the
      same L. A transcoder cfg without ``hook_name_out`` gets that output hook of its layer.
    * ``normalize_activations="expected_average_only_in"`` is accepted only when the cfg
      carries ``norm_scaling_factor`` (top level or metadata), which is folded into the
      weights (SAELens's ``fold_activation_norm_scaling_factor``); SAELens's own disk loader
      would silently ignore it. "covariance_whitening" is refused (SAELens folds it before
      saving). Per-token modes load for SAEs (see ``base.py``) and are refused for
      transcoders, whose SAELens semantics normalise the input but not the output.
    * Widths: d_in/d_out are checked against ``hook_dims`` when the engine gives them,
      else against ``d_model`` for hooks known to be residual-width; other hooks are
      checked for existence only.

Must not: import gRPC, touch a live model, or fetch anything from a hub.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .base import PER_TOKEN_NORMALIZATIONS, Dictionary, DictionaryConfig
from .errors import DictionaryLoadError, DictionaryNotFound
from .registry import DictionaryRegistry, architecture_class

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
STATS_FILENAME = "dataset_stats.safetensors"
FINGERPRINT_HEX_DIGITS = 16
METRIC_KEYS = ("l0", "fvu", "dead_fraction", "ce_loss_delta", "n_eval_tokens")

_TRANSCODER_IN = re.compile(r"^blocks\.(\d+)\.ln2\.hook_normalized$")
_TRANSCODER_OUT = re.compile(r"^blocks\.(\d+)\.hook_mlp_out$")
# hooks whose width is d_model in a TransformerLens decoder-only model
_RESIDUAL_WIDTH = re.compile(
    r"^(hook_embed|hook_pos_embed|ln_final\.hook_normalized|"
    r"blocks\.\d+\.(hook_resid_(pre|mid|post)|hook_(attn|mlp)_out|"
    r"ln(1|2)\.hook_normalized))$"
)
_KNOWN_NORMALIZATIONS = {"none", "expected_average_only_in", *PER_TOKEN_NORMALIZATIONS}


# -- cfg.json ---------------------------------------------------------------------------------


def _as_int(raw: Mapping[str, Any], key: str, name: str) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DictionaryLoadError(
            f"{name}: cfg.json needs a positive integer {key!r}, got {value!r}"
        )
    return value


def _normalization(raw: Mapping[str, Any]) -> str:
    value = raw.get("normalize_activations")
    if value is None or value is False:
        return "none"
    if value is True:  # pre-6 SAELens spelling
        return "expected_average_only_in"
    return str(value)


def _scaling_factor(raw: Mapping[str, Any], metadata: Mapping[str, Any]) -> float | None:
    value = raw.get("norm_scaling_factor", metadata.get("norm_scaling_factor"))
    return None if value is None else float(value)


def parse_config(raw: Mapping[str, Any], *, name: str = "dictionary") -> DictionaryConfig:
    """Parse a SAELens cfg.json (v6 or older) into a ``DictionaryConfig``; refuse what we can't run.

    Args:
        raw: the JSON object.
        name: how error messages name the dictionary (its path or id).
    """
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise DictionaryLoadError(f"{name}: cfg.json 'metadata' must be an object")

    def meta(key: str, *old: str) -> Any:
        for source, k in [(metadata, key), (raw, key), *((raw, o) for o in old)]:
            if source.get(k) is not None:
                return source[k]
        return None

    fn_kwargs = raw.get("activation_fn_kwargs") or {}
    architecture = raw.get("architecture")
    if architecture is None:  # pre-6 cfgs
        is_topk = raw.get("activation_fn") == "topk" and fn_kwargs.get("k") is not None
        architecture = "topk" if is_topk else "standard"
    cls = architecture_class(str(architecture), name=name)

    d_in = _as_int(raw, "d_in", name)
    d_sae = _as_int(raw, "d_sae", name)
    d_out = _as_int(raw, "d_out", name) if raw.get("d_out") is not None else d_in
    if not cls.is_transcoder and d_out != d_in:
        raise DictionaryLoadError(f"{name}: an SAE must have d_out == d_in, got {d_out} != {d_in}")

    hook_name = meta("hook_name", "hook_point")
    if not isinstance(hook_name, str) or not hook_name:
        raise DictionaryLoadError(f"{name}: cfg.json names no hook (metadata.hook_name)")
    if meta("hook_head_index", "hook_point_head_index") is not None:
        raise DictionaryLoadError(
            f"{name}: per-head dictionaries (hook_head_index) are not supported"
        )
    if raw.get("reshape_activations") not in (None, "none"):
        raise DictionaryLoadError(
            f"{name}: reshape_activations={raw.get('reshape_activations')!r} is not supported"
        )
    hook_name_out = meta("hook_name_out")
    if cls.is_transcoder:
        if hook_name_out is None:
            m = _TRANSCODER_IN.match(hook_name)
            hook_name_out = f"blocks.{m.group(1)}.hook_mlp_out" if m else ""
    elif hook_name_out not in (None, hook_name):
        raise DictionaryLoadError(
            f"{name}: an SAE reads and writes one hook, but cfg.json says hook_name={hook_name!r}"
            f" and hook_name_out={hook_name_out!r}"
        )
    else:
        hook_name_out = hook_name

    apply_b_dec = raw.get("apply_b_dec_to_input")
    apply_b_dec = (not cls.is_transcoder) if apply_b_dec is None else bool(apply_b_dec)
    if cls.is_transcoder and apply_b_dec:
        raise DictionaryLoadError(
            f"{name}: apply_b_dec_to_input is not defined for transcoders (b_dec is [d_out])"
        )

    normalization = _normalization(raw)
    if normalization not in _KNOWN_NORMALIZATIONS:
        raise DictionaryLoadError(
            f"{name}: normalize_activations={normalization!r} is not supported (supported: "
            f"{', '.join(sorted(_KNOWN_NORMALIZATIONS))}; fold whitening into the weights first)"
        )
    if normalization == "expected_average_only_in":
        if cls.is_transcoder:
            raise DictionaryLoadError(
                f"{name}: normalize_activations='expected_average_only_in' is not supported "
                "for transcoders; fold the scaling factor into the weights"
            )
        if _scaling_factor(raw, metadata) is None:
            raise DictionaryLoadError(
                f"{name}: normalize_activations='expected_average_only_in' but cfg.json has no "
                "norm_scaling_factor; fold it into the weights (SAELens "
                "fold_activation_norm_scaling_factor) or add norm_scaling_factor to cfg.json"
            )
    if cls.is_transcoder and normalization in PER_TOKEN_NORMALIZATIONS:
        raise DictionaryLoadError(
            f"{name}: per-token normalisation ({normalization}) is not supported for transcoders"
        )

    k = raw.get("k", fn_kwargs.get("k"))
    if architecture == "topk":
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= d_sae:
            raise DictionaryLoadError(
                f"{name}: topk needs an integer 0 < k <= d_sae={d_sae}, got {k!r}"
            )
    else:
        k = None

    return DictionaryConfig(
        architecture=str(architecture),
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        hook_name=hook_name,
        hook_name_out=str(hook_name_out),
        model_name=str(meta("model_name") or ""),
        apply_b_dec_to_input=apply_b_dec,
        normalize_activations="none"
        if normalization == "expected_average_only_in"
        else normalization,
        k=k,
        rescale_acts_by_decoder_norm=bool(raw.get("rescale_acts_by_decoder_norm", False))
        and architecture == "topk",
        raw=dict(raw),
    )


# -- checks against the model -----------------------------------------------------------------


def check_hooks(
    cfg: DictionaryConfig,
    *,
    name: str,
    expected_hooks: Iterable[str] | None = None,
    d_model: int | None = None,
    hook_dims: Mapping[str, int] | None = None,
) -> None:
    """Refuse a dictionary whose hooks or widths do not fit the model (DictionaryLoadError)."""
    if _is_transcoder(cfg):
        m_in = _TRANSCODER_IN.match(cfg.hook_name)
        m_out = _TRANSCODER_OUT.match(cfg.hook_name_out)
        if m_in is None:
            raise DictionaryLoadError(
                f"{name}: a transcoder must read 'blocks.L.ln2.hook_normalized' (the MLP input),"
                f" not {cfg.hook_name!r}"
            )
        if m_out is None:
            raise DictionaryLoadError(
                f"{name}: a transcoder must write 'blocks.L.hook_mlp_out' (the MLP output), "
                f"not {cfg.hook_name_out!r}"
            )
        if m_in.group(1) != m_out.group(1):
            raise DictionaryLoadError(
                f"{name}: transcoder hooks are in different layers: reads {cfg.hook_name!r}, "
                f"writes {cfg.hook_name_out!r}"
            )
    if expected_hooks is not None:
        hooks = set(expected_hooks)
        for role, hook in (("input", cfg.hook_name), ("output", cfg.hook_name_out)):
            if hook not in hooks:
                raise DictionaryLoadError(
                    f"{name}: its {role} hook {hook!r} is not a hook of this model"
                )
    for role, hook, width in (
        ("d_in", cfg.hook_name, cfg.d_in),
        ("d_out", cfg.hook_name_out, cfg.d_out),
    ):
        expected = None
        if hook_dims is not None and hook in hook_dims:
            expected = hook_dims[hook]
        elif d_model is not None and _RESIDUAL_WIDTH.match(hook):
            expected = d_model
        if expected is not None and expected != width:
            raise DictionaryLoadError(
                f"{name}: {role}={width} does not match the model's width {expected} at {hook!r}"
            )


def _is_transcoder(cfg: DictionaryConfig) -> bool:
    return architecture_class(cfg.architecture).is_transcoder


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
    cls = architecture_class(cfg.architecture, name=name)
    check_hooks(cfg, name=name, expected_hooks=expected_hooks, d_model=d_model, hook_dims=hook_dims)

    stored = _read_tensors(weights_path, name)
    weights = _check_weights(cls, cfg, stored, name)
    factor = _scaling_factor(cfg_raw, cfg_raw.get("metadata") or {})
    if _normalization(cfg_raw) == "expected_average_only_in" and factor is not None:
        weights["W_enc"] = weights["W_enc"] * factor
        weights["W_dec"] = weights["W_dec"] / factor
        weights["b_dec"] = weights["b_dec"] / factor

    stats: dict[str, Tensor] = {}
    dataset_mean = None
    if (directory / STATS_FILENAME).is_file():
        stats = _read_tensors(directory / STATS_FILENAME, name)
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
            source=str(directory.resolve()),
            metrics=clean_metrics,
            description=description,
            dataset_mean=dataset_mean,
        )
    except ValueError as exc:
        raise DictionaryLoadError(f"{name}: {exc}") from exc


# -- catalog ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogEntry:
    """One dictionary listed in ``dictionaries/catalog.json`` (paths resolved)."""

    id: str
    path: Path
    model: str = ""
    architecture: str | None = None
    hook_name: str | None = None
    hook_name_out: str | None = None
    d_in: int | None = None
    d_sae: int | None = None
    version: str | None = None
    description: str = ""
    metrics: dict[str, float | None] = field(default_factory=dict)
    metadata: Path | None = None
    default: bool = False


def load_catalog(catalog_json_path: str | Path) -> list[CatalogEntry]:
    """Read a catalog file; entry paths are relative to the catalog's directory.

    Raises:
        DictionaryLoadError: unreadable JSON, a missing id/path, or a duplicate id.
    """
    catalog_path = Path(catalog_json_path)
    try:
        data = json.loads(catalog_path.read_text())
    except (OSError, ValueError) as exc:
        raise DictionaryLoadError(f"catalog {catalog_path}: cannot read: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("dictionaries"), list):
        raise DictionaryLoadError(f"catalog {catalog_path}: needs a 'dictionaries' list")
    root = catalog_path.parent
    entries: list[CatalogEntry] = []
    seen: set[str] = set()
    for position, item in enumerate(data["dictionaries"]):
        where = f"catalog {catalog_path}, entry {position}"
        if not isinstance(item, dict) or not item.get("id") or not item.get("path"):
            raise DictionaryLoadError(f"{where}: every entry needs 'id' and 'path'")
        entry_id = str(item["id"])
        if entry_id in seen:
            raise DictionaryLoadError(f"{where}: duplicate id {entry_id!r}")
        seen.add(entry_id)
        metrics_raw = item.get("metrics") or {}
        try:
            metrics = {
                k: None if metrics_raw.get(k) is None else float(metrics_raw[k])
                for k in METRIC_KEYS
                if k in metrics_raw
            }
        except (TypeError, ValueError) as exc:
            raise DictionaryLoadError(f"{where} ({entry_id}): bad metrics: {exc}") from exc
        entries.append(
            CatalogEntry(
                id=entry_id,
                path=(root / item["path"]).resolve(),
                model=str(data.get("model") or ""),
                architecture=item.get("architecture"),
                hook_name=item.get("hook_name"),
                hook_name_out=item.get("hook_name_out"),
                d_in=item.get("d_in"),
                d_sae=item.get("d_sae"),
                version=item.get("version"),
                description=str(item.get("description") or ""),
                metrics=metrics,
                metadata=(root / item["metadata"]).resolve() if item.get("metadata") else None,
                default=bool(item.get("default", False)),
            )
        )
    return entries


def load_catalog_entry(
    entry: CatalogEntry,
    *,
    expected_hooks: Iterable[str] | None = None,
    d_model: int | None = None,
    hook_dims: Mapping[str, int] | None = None,
) -> Dictionary:
    """Load an entry's dictionary and refuse it if the files disagree with the catalog."""
    dictionary = load_dictionary(
        entry.path,
        dictionary_id=entry.id,
        version=entry.version,
        expected_hooks=expected_hooks,
        d_model=d_model,
        hook_dims=hook_dims,
        metrics=entry.metrics,
        description=entry.description or None,
    )
    declared = {
        "architecture": entry.architecture,
        "hook_name": entry.hook_name,
        "hook_name_out": entry.hook_name_out,
        "d_in": entry.d_in,
        "d_sae": entry.d_sae,
    }
    for key, value in declared.items():
        actual = getattr(dictionary, key)
        if value is not None and value != "" and value != actual:
            raise DictionaryLoadError(
                f"{entry.id}: the catalog says {key}={value!r} but {entry.path} has {actual!r}"
            )
    return dictionary


def load_catalog_dictionaries(
    catalog_json_path: str | Path,
    *,
    ids: Iterable[str] | None = None,
    expected_hooks: Iterable[str] | None = None,
    d_model: int | None = None,
    hook_dims: Mapping[str, int] | None = None,
    registry: DictionaryRegistry | None = None,
) -> DictionaryRegistry:
    """Load the catalog's dictionaries (all, or those in ``ids``) into a registry."""
    entries = load_catalog(catalog_json_path)
    by_id = {e.id: e for e in entries}
    wanted = list(by_id) if ids is None else list(ids)
    for wanted_id in wanted:
        if wanted_id not in by_id:
            raise DictionaryNotFound(wanted_id, list(by_id))
    registry = registry if registry is not None else DictionaryRegistry()
    for wanted_id in wanted:
        entry = by_id[wanted_id]
        dictionary = load_catalog_entry(
            entry, expected_hooks=expected_hooks, d_model=d_model, hook_dims=hook_dims
        )
        registry.add(dictionary, default=entry.default)
    return registry


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
        "dtype": str(tensors["W_enc"].dtype).removeprefix("torch."),
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
