"""Domain requests and results: frozen dataclasses, validated once at the boundary
(``convert.py``). Engines take and return only these; no protobuf crosses this line."""

from __future__ import annotations

from dataclasses import dataclass, field

from featuresteer_server.tokenization import Token


@dataclass(frozen=True)
class FeatureRef:
    dictionary_id: str
    index: int
    fingerprint: str | None = None


@dataclass(frozen=True)
class Provenance:
    model_name: str
    model_weights_hash: str
    engine: str
    dtype: str
    dictionary_fingerprints: dict[str, str] = field(default_factory=dict)
    seed: int | None = None
    steering_spec_fingerprint: str = ""
    server_version: str = ""
    request_id: str = ""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    weights_hash: str
    n_layers: int
    d_model: int
    d_vocab: int
    n_heads: int
    d_mlp: int
    dtype: str
    bos_token_id: int
    source: str
    hook_names: tuple[str, ...]


@dataclass(frozen=True)
class DictionaryInfo:
    id: str
    fingerprint: str
    architecture: str
    hook_name: str
    hook_name_out: str
    d_in: int
    d_sae: int
    source: str
    version: str
    description: str = ""
    k: int | None = None
    l0: float | None = None
    fvu: float | None = None
    dead_fraction: float | None = None
    ce_loss_delta: float | None = None


@dataclass(frozen=True)
class EngineInfo:
    model: ModelInfo
    dictionaries: tuple[DictionaryInfo, ...]
    engines: tuple[str, ...]
    generation_engine: str


# -- Tokenize


@dataclass(frozen=True)
class TokenizeRequest:
    text: str
    prepend_bos: bool = True


# -- DecodeFeatures


@dataclass(frozen=True)
class DecodeInput:
    """Exactly one of ``text`` / ``token_ids`` is set (checked in convert)."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class DecodeRequest:
    inputs: tuple[DecodeInput, ...]
    prepend_bos: bool = True
    dictionary_ids: tuple[str, ...] = ()
    top_k: int = 0
    features: tuple[FeatureRef, ...] = ()
    include_error: bool = False


@dataclass(frozen=True)
class PositionFeatures:
    position: int
    top: tuple[tuple[int, float], ...]
    selected: tuple[tuple[int, float], ...]
    error_norm: float = 0.0
    fvu: float = 0.0


@dataclass(frozen=True)
class DictionaryResult:
    dictionary_id: str
    positions: tuple[PositionFeatures, ...]


@dataclass(frozen=True)
class DecodeItem:
    tokens: tuple[Token, ...]
    results: tuple[DictionaryResult, ...]


@dataclass(frozen=True)
class DecodeResult:
    items: tuple[DecodeItem, ...]
    provenance: Provenance
