"""``cfg.json``: parsing a SAELens config and checking it against the model.

Owns: parsing ``cfg.json`` (SAELens 6 layout, with the hook under ``metadata``, and the older
flat layout) into a ``DictionaryConfig``, and every check that a config fits the model
(architecture, d_in/d_out, hooks, transcoder hook pairing).

Decisions:
    * Hooks: SAEs read and write one hook (``hook_name_out`` == ``hook_name``); transcoders
      must read ``blocks.L.ln2.hook_normalized`` and write ``blocks.L.hook_mlp_out`` of the
      same L. A transcoder cfg without ``hook_name_out`` gets that output hook of its layer.
    * ``normalize_activations="expected_average_only_in"`` is accepted only when the cfg
      carries ``norm_scaling_factor`` (top level or metadata), which ``files`` folds into the
      weights (SAELens's ``fold_activation_norm_scaling_factor``); SAELens's own disk loader
      would silently ignore it. "covariance_whitening" is refused (SAELens folds it before
      saving). Per-token modes load for SAEs (see ``base.py``) and are refused for
      transcoders, whose SAELens semantics normalise the input but not the output.
    * Widths: d_in/d_out are checked against ``hook_dims`` when the engine gives them,
      else against ``d_model`` for hooks known to be residual-width; other hooks are
      checked for existence only.

Must not: read files, import gRPC, or touch a live model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from .base import PER_TOKEN_NORMALIZATIONS, DictionaryConfig
from .errors import DictionaryLoadError
from .registry import architecture_class

_TRANSCODER_IN = re.compile(r"^blocks\.(\d+)\.ln2\.hook_normalized$")
_TRANSCODER_OUT = re.compile(r"^blocks\.(\d+)\.hook_mlp_out$")
# hooks whose width is d_model in a TransformerLens decoder-only model
_RESIDUAL_WIDTH = re.compile(
    r"^(hook_embed|hook_pos_embed|ln_final\.hook_normalized|"
    r"blocks\.\d+\.(hook_resid_(pre|mid|post)|hook_(attn|mlp)_out|"
    r"ln(1|2)\.hook_normalized))$"
)
_KNOWN_NORMALIZATIONS = {"none", "expected_average_only_in", *PER_TOKEN_NORMALIZATIONS}


def _as_int(raw: Mapping[str, Any], key: str, name: str) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DictionaryLoadError(
            f"{name}: cfg.json needs a positive integer {key!r}, got {value!r}"
        )
    return value


def normalize_activations(raw: Mapping[str, Any]) -> str:
    """The cfg's ``normalize_activations`` as a string ("none" when absent)."""
    value = raw.get("normalize_activations")
    if value is None or value is False:
        return "none"
    if value is True:  # pre-6 SAELens spelling
        return "expected_average_only_in"
    return str(value)


def scaling_factor(raw: Mapping[str, Any], metadata: Mapping[str, Any]) -> float | None:
    """``norm_scaling_factor`` (top level or metadata), None when absent."""
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

    normalization = normalize_activations(raw)
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
        if scaling_factor(raw, metadata) is None:
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
    if is_transcoder(cfg):
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


def is_transcoder(cfg: DictionaryConfig) -> bool:
    """Whether the cfg's architecture reads one hook and writes another."""
    return architecture_class(cfg.architecture).is_transcoder
