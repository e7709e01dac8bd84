"""The ``Dictionary`` base class: one sparse dictionary (SAE or transcoder) held in float32.

Owns: the shared math of every architecture (input normalisation, the affine encoder, the
decoder, reconstruction, per-feature contributions, reconstruction-error statistics) and the
parsed, validated config (``DictionaryConfig``). Subclasses (one file per SAELens
``architecture`` string) only choose the activation function and any extra parameters.

Conventions (SAELens's names and orientation, converted once at load):
    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out],
    threshold [d_sae] (JumpReLU), W_skip [d_out, d_in] (skip transcoders: out += x @ W_skip.T).
All parameters are float32 and frozen (``requires_grad=False``); every method casts its input
to float32 first, whatever the model's dtype (bf16 flips JumpReLU threshold tests). Outputs
stay float32: callers cast back to the model's dtype.

Normalisation (SAELens ``normalize_activations``):
    "none"                    nothing.
    "expected_average_only_in" a constant input scale; folded into the weights at load
                               (W_enc·s, W_dec/s, b_dec/s), so at run time it is "none".
    "constant_norm_rescale",  per-token: x is rescaled / layer-normed before encoding and the
    "layer_norm"              reconstruction mapped back with the same token's statistics.
                              ``per_token_normalization`` is True: ``decode`` needs the input
                              ``x``, and ``contrib``/``decoder_direction`` refuse, because a
                              feature's contribution then depends on the token (DESIGN.md:
                              such dictionaries refuse feature edits).

Must not: read files (``files.py`` does), know about hooks of a live model, or import gRPC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .errors import FeatureEditRefused
from .info import DictionaryInfo

PER_TOKEN_NORMALIZATIONS = frozenset({"constant_norm_rescale", "layer_norm"})
_LAYER_NORM_EPS = 1e-5  # SAELens's run_time_activation_ln_in default


@dataclass(frozen=True)
class DictionaryConfig:
    """What the runtime needs from a ``cfg.json``, parsed and checked by ``cfg.py``.

    Attributes:
        architecture: SAELens architecture string (the registry key).
        d_in: width of the input hook.
        d_sae: number of features.
        d_out: width of the output (== d_in for SAEs).
        hook_name: TransformerLens name of the input hook.
        hook_name_out: output hook (== hook_name for SAEs, the MLP-out hook for transcoders).
        model_name: the model the dictionary was fitted on, as its cfg says ("" if unknown).
        apply_b_dec_to_input: subtract b_dec from the input before encoding (SAEs only).
        normalize_activations: "none" or one of ``PER_TOKEN_NORMALIZATIONS`` at run time.
        k: TopK's k (None for other architectures).
        rescale_acts_by_decoder_norm: TopK option (see ``topk.py``).
        raw: the cfg.json as read, for provenance.
    """

    architecture: str
    d_in: int
    d_sae: int
    d_out: int
    hook_name: str
    hook_name_out: str
    model_name: str = ""
    apply_b_dec_to_input: bool = False
    normalize_activations: str = "none"
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


class Dictionary(nn.Module):
    """A loaded sparse dictionary. Subclasses set ``architecture`` and ``_activate``.

    Attributes (the contract other modules code against):
        id, version, architecture, hook_name, hook_name_out, d_in, d_sae, d_out,
        fingerprint, source, is_transcoder, k, dataset_mean ([d_out] or None), metrics,
        description, per_token_normalization, has_skip.
    """

    architecture: ClassVar[str] = ""
    is_transcoder: ClassVar[bool] = False
    has_skip: ClassVar[bool] = False
    # extra parameters beyond W_enc/b_enc/W_dec/b_dec, name -> shape given the config
    extra_parameters: ClassVar[dict[str, str]] = {}

    W_enc: nn.Parameter  # [d_in, d_sae]
    b_enc: nn.Parameter  # [d_sae]
    W_dec: nn.Parameter  # [d_sae, d_out]
    b_dec: nn.Parameter  # [d_out]

    def __init__(
        self,
        cfg: DictionaryConfig,
        weights: dict[str, Tensor],
        *,
        dictionary_id: str,
        version: str,
        fingerprint: str,
        source: str,
        metrics: dict[str, float | None] | None = None,
        description: str = "",
        dataset_mean: Tensor | None = None,
    ) -> None:
        """Build from already-validated float tensors (``files.load_dictionary`` checks them).

        Args:
            cfg: the parsed config.
            weights: name -> tensor with SAELens names and orientation; converted to float32.
            dictionary_id: the versioned id (``<model>/<kind>-<d_sae>/<hook>@<version>``).
            version: the version part of the id.
            fingerprint: content hash (``files.fingerprint``).
            source: where it was loaded from (a directory path).
            metrics: quality figures (l0, fvu, dead_fraction, ce_loss_delta, ...) if known.
            description: human text; a note is appended when FVU falls back to 0-centred.
            dataset_mean: [d_out] mean of the target activations (FVU's μ), or None.
        """
        super().__init__()
        self.cfg = cfg
        self.id = dictionary_id
        self.version = version
        self.fingerprint = fingerprint
        self.source = source
        self.hook_name = cfg.hook_name
        self.hook_name_out = cfg.hook_name_out
        self.d_in = cfg.d_in
        self.d_sae = cfg.d_sae
        self.d_out = cfg.d_out
        self.k = cfg.k
        self.metrics: dict[str, float | None] = dict(metrics or {})
        self.per_token_normalization = cfg.normalize_activations in PER_TOKEN_NORMALIZATIONS
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", *self.extra_parameters):
            tensor = weights[name].detach().to(torch.float32).contiguous()
            setattr(self, name, nn.Parameter(tensor, requires_grad=False))
        self.dataset_mean: Tensor | None  # [d_out]; a buffer, so .to(device) moves it
        self.register_buffer(
            "dataset_mean",
            None if dataset_mean is None else dataset_mean.detach().to(torch.float32),
            persistent=False,
        )
        if self.dataset_mean is None:
            note = "FVU is 0-centred (no dataset mean stored with this dictionary)"
            description = f"{description} [{note}]" if description else note
        self.description = description
        self._post_init()

    # -- hooks for subclasses -------------------------------------------------------------

    def _post_init(self) -> None:
        """Precompute derived buffers (weights are immutable after construction)."""

    def _activate(self, hidden_pre: Tensor) -> Tensor:
        """Activation function: [..., d_sae] pre-activations -> [..., d_sae] activations."""
        raise NotImplementedError

    def _feature_scale(self) -> Tensor | None:
        """[d_sae] factor applied to activations before W_dec (TopK's decoder-norm rescale)."""
        return None

    # -- normalisation --------------------------------------------------------------------

    def _normalize_in(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., d_in] in the space the encoder was trained on."""
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            return x * (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True))
        if mode == "layer_norm":
            centred = x - x.mean(dim=-1, keepdim=True)
            return centred / (centred.std(dim=-1, keepdim=True) + _LAYER_NORM_EPS)
        return x

    def _denormalize_out(self, y: Tensor, x: Tensor) -> Tensor:
        """Map [..., d_out] back to model space with the statistics of the input [..., d_in]."""
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            return y / (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True))
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            return y * (x - mu).std(dim=-1, keepdim=True) + mu
        return y

    # -- the public math ------------------------------------------------------------------

    def pre_activations(self, x: Tensor) -> Tensor:
        """Pre-activations (before the nonlinearity): [..., d_in] -> [..., d_sae] float32."""
        sae_in = self._normalize_in(x.to(torch.float32))
        if self.cfg.apply_b_dec_to_input:
            sae_in = sae_in - self.b_dec
        return sae_in @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations: [..., d_in] -> [..., d_sae] float32."""
        return self._activate(self.pre_activations(x))

    def decode(self, acts: Tensor, x: Tensor | None = None) -> Tensor:
        """Features + b_dec: [..., d_sae] -> [..., d_out] float32 (no W_skip term).

        Args:
            acts: [..., d_sae] feature activations.
            x: [..., d_in] the input they came from; needed only by dictionaries with
                per-token normalisation, to map the output back to model space.
        """
        acts = acts.to(torch.float32)
        scale = self._feature_scale()
        if scale is not None:
            acts = acts * scale
        out = acts @ self.W_dec + self.b_dec
        if self.per_token_normalization:
            if x is None:
                raise ValueError(
                    f"dictionary {self.id!r} normalises each token "
                    f"({self.cfg.normalize_activations}); decode needs the input x"
                )
            out = self._denormalize_out(out, x.to(torch.float32))
        return out

    def skip(self, x: Tensor) -> Tensor:
        """The skip-connection term [..., d_in] -> [..., d_out]; zeros when there is none."""
        return x.new_zeros((*x.shape[:-1], self.d_out), dtype=torch.float32)

    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(encode(x)) + skip term: [..., d_in] -> [..., d_out] float32."""
        x = x.to(torch.float32)
        return self.reconstruct_from(self.encode(x), x)

    def reconstruct_from(self, acts: Tensor, x: Tensor) -> Tensor:
        """What the dictionary writes for activations ``acts`` of input ``x``: decode + skip.

        Args:
            acts: [..., d_sae] ``encode(x)`` (or an edited copy).
            x: [..., d_in] the input (per-token statistics, skip path).

        Returns:
            [..., d_out] float32.
        """
        out = self.decode(acts, x=x)
        if self.has_skip:
            out = out + self.skip(x)
        return out

    def _refuse_edit(self, what: str) -> None:
        if self.per_token_normalization:
            raise FeatureEditRefused(
                f"dictionary {self.id!r} normalises each token "
                f"({self.cfg.normalize_activations}), so a feature's {what} depends on the "
                "token; feature edits are refused for it"
            )

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.d_sae:
            raise IndexError(
                f"feature index {index} is out of range for dictionary {self.id!r} "
                f"(d_sae={self.d_sae})"
            )
        return index

    def decoder_direction(self, index: int) -> Tensor:
        """[d_out] the vector d_i with contrib_i(v) = v·d_i (decoder-norm rescale applied)."""
        self._refuse_edit("decoder direction")
        index = self._check_index(index)
        row = self.W_dec[index]
        scale = self._feature_scale()
        return row * scale[index] if scale is not None else row

    def contrib(self, index: int, value: Tensor) -> Tensor:
        """Feature ``index``'s own decoded contribution at activation ``value``.

        Args:
            index: feature index.
            value: [...] activation values (any shape).

        Returns:
            [..., d_out] float32: value·d_i (no bias, no skip term).
        """
        direction = self.decoder_direction(index)  # [d_out]
        return value.to(torch.float32).unsqueeze(-1) * direction

    def error_stats(
        self, x: Tensor, x_out: Tensor | None = None, acts: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-token reconstruction error norm and FVU.

        Args:
            x: [..., d_in] activations at the input hook.
            x_out: [..., d_out] activations at the output hook (required for transcoders:
                the target is the MLP output; ignored for SAEs, whose target is x).
            acts: [..., d_sae] ``encode(x)`` when the caller already has it (saves a second
                encoding on the decode hot path).

        Returns:
            (error_norm [...], fvu [...]) float32: ‖t−x̂‖ and ‖t−x̂‖²/‖t−μ‖², μ the dataset
            mean (0 when none is stored). A zero denominator gives NaN (FVU undefined).
        """
        x = x.to(torch.float32)
        if self.is_transcoder:
            if x_out is None:
                raise ValueError(
                    f"transcoder {self.id!r} needs the output activations ({self.hook_name_out})"
                    " to compute its reconstruction error"
                )
            target = x_out.to(torch.float32)
        else:
            target = x
        recon = self.reconstruct(x) if acts is None else self.reconstruct_from(acts, x)
        err_sq = (target - recon).pow(2).sum(dim=-1)
        centred = target if self.dataset_mean is None else target - self.dataset_mean
        denom = centred.pow(2).sum(dim=-1)
        fvu = torch.where(denom > 0, err_sq / denom.clamp_min(1e-30), torch.nan)
        return err_sq.sqrt(), fvu

    def info(self) -> DictionaryInfo:
        """The torch-free summary the servicer returns (ListDictionaries, GetInfo)."""
        return DictionaryInfo(
            id=self.id,
            version=self.version,
            fingerprint=self.fingerprint,
            architecture=self.architecture,
            hook_name=self.hook_name,
            hook_name_out=self.hook_name_out,
            d_in=self.d_in,
            d_sae=self.d_sae,
            d_out=self.d_out,
            source=self.source,
            is_transcoder=self.is_transcoder,
            k=self.k,
            per_token_normalization=self.per_token_normalization,
            description=self.description,
            l0=self.metrics.get("l0"),
            fvu=self.metrics.get("fvu"),
            dead_fraction=self.metrics.get("dead_fraction"),
            ce_loss_delta=self.metrics.get("ce_loss_delta"),
        )

    def extra_repr(self) -> str:
        return (
            f"id={self.id!r}, architecture={self.architecture!r}, d_in={self.d_in}, "
            f"d_sae={self.d_sae}, d_out={self.d_out}, hook={self.hook_name!r}"
        )
