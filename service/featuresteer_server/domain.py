"""Domain requests and results: frozen dataclasses, validated once at the boundary
(``convert.py``). Engines take and return only these; no protobuf crosses this line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from featuresteer_server.dictionaries.info import DictionaryInfo as DictionaryInfo  # re-exported
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
    max_tokens: int | None = None  # beyond: INVALID_ARGUMENT, before token records are built


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
    # the answer must fit in this many encoded bytes (the server's send limit); None: no bound
    max_response_bytes: int | None = None


# Upper bounds of the encoded size of a DecodeFeatures answer, per record of
# convert.decode_result_to_pb (tests/unit/test_decode.py holds them to a real encoding).
DECODE_ENTRY_BYTES = 13  # FeatureActivation: index, activation, its tag and length
DECODE_POSITION_BYTES = 24  # PositionFeatures without its entries
DECODE_TOKEN_BYTES = 32  # Token without text/bytes; add 4 per raw byte (bytes + text ≤ 3/byte)
DECODE_RESULT_BYTES = 16  # DictionaryResult without its id and positions
DECODE_FIXED_BYTES = 1024  # provenance and framing, plus ~100 per dictionary (its fingerprint)


def decode_response_bytes(
    tokens: Sequence[Sequence[Token]], dictionary_ids: Sequence[str], entries: Sequence[int]
) -> int:
    """Upper bound of the encoded answer: every token of every input, per dictionary one
    position record with ``entries[d]`` feature entries (top_k + selected features)."""
    n_tokens = sum(len(item) for item in tokens)
    raw = sum(len(t.bytes) for item in tokens for t in item)
    per_position = sum(DECODE_POSITION_BYTES + e * DECODE_ENTRY_BYTES for e in entries)
    per_item = sum(DECODE_RESULT_BYTES + len(d.encode()) for d in dictionary_ids) + 16
    return (
        n_tokens * (DECODE_TOKEN_BYTES + per_position)
        + 4 * raw
        + len(tokens) * per_item
        + DECODE_FIXED_BYTES
        + sum(100 + len(d.encode()) for d in dictionary_ids)
    )


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


# -- Generate and interventions


class Op(StrEnum):
    """What an intervention does to its target (DESIGN.md "Interventions")."""

    ADD = "add"
    SCALE = "scale"
    CLAMP = "clamp"
    ABLATE = "ablate"


class ApplyTo(StrEnum):
    """Which input positions an intervention covers: PROMPT < len(prompt) <= GENERATED."""

    ALL = "all"
    PROMPT = "prompt"
    GENERATED = "generated"


class FinishReason(StrEnum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class VectorTarget:
    """A raw direction at a hook (width checked against the hook by the engine)."""

    hook_name: str
    values: tuple[float, ...]


@dataclass(frozen=True)
class Condition:
    """Apply only where ``feature``'s pre-edit activation is strictly above ``above``."""

    feature: FeatureRef
    above: float


@dataclass(frozen=True)
class Intervention:
    """One edit. Exactly one of ``feature`` / ``vector`` (checked in convert)."""

    op: Op
    value: float = 0.0
    feature: FeatureRef | None = None
    vector: VectorTarget | None = None
    normalize: bool = False
    apply_to: ApplyTo = ApplyTo.ALL
    positions: tuple[int, ...] = ()
    when: Condition | None = None


@dataclass(frozen=True)
class TraceSpec:
    """Per-generated-token trace: top-k of one dictionary and/or chosen features."""

    dictionary_id: str = ""
    top_k: int = 0
    features: tuple[FeatureRef, ...] = ()


@dataclass(frozen=True)
class GenerateRequest:
    """Exactly one of ``prompt`` / ``messages`` (checked in convert). Sampling: temperature 0
    is greedy; top_p 1.0, top_k 0 and repetition_penalty 1.0 are off."""

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] = ()
    prepend_bos: bool = True
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    interventions: tuple[Intervention, ...] = ()
    trace: TraceSpec | None = None
    compare_baseline: bool = False


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerateChunk:
    """One streamed chunk: a token (``token`` set), or the final chunk of a run
    (``finish_reason`` and ``usage`` set; ``provenance`` on the last chunk of the stream)."""

    token: Token | None = None
    text: str = ""
    position: int = 0
    logprob: float | None = None
    trace: tuple[tuple[int, float], ...] = ()
    baseline: bool = False
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    provenance: Provenance | None = None


# -- Attribute


@dataclass(frozen=True)
class AttributeRequest:
    prompt: str
    prepend_bos: bool = True
    mode: str = "graph"  # "graph" | "logit_ranking"
    target_token_ids: tuple[int, ...] = ()
    max_logit_targets: int = 10
    desired_logit_prob: float = 0.95
    max_feature_nodes: int = 500
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    dictionary_id: str = ""
    batch_size: int = 64
    detach: bool = False


@dataclass(frozen=True)
class GraphNode:
    kind: str  # "embedding" | "feature" | "error" | "logit"
    layer: int
    position: int
    feature: FeatureRef | None
    activation: float
    influence: float
    label: str
    token_id: int
    probability: float
    constant: float


@dataclass(frozen=True)
class AttributionResult:
    """A finished graph (mode graph) or ranking (mode logit_ranking)."""

    tokens: tuple[Token, ...]
    provenance: Provenance
    nodes: tuple[GraphNode, ...] = ()
    edges: tuple[tuple[int, int, float], ...] = ()
    replacement_score: float = 0.0
    completeness_score: float = 0.0
    ranking: tuple[tuple[FeatureRef, int, float], ...] = ()


# -- Feature catalog (GetFeature / SearchFeatures)


@dataclass(frozen=True)
class FeatureExample:
    """One stored top-activating context: its tokens and the feature's activation on each."""

    tokens: tuple[Token, ...]
    activations: tuple[float, ...]


@dataclass(frozen=True)
class TokenValue:
    token: Token
    value: float


@dataclass(frozen=True)
class Feature:
    """What a feature means. Without a metadata file only the weight-derived parts are set:
    ``label`` is "", ``density``/``max_activation`` are 0 and ``top_examples`` is empty."""

    feature: FeatureRef
    label: str = ""
    density: float = 0.0
    max_activation: float = 0.0
    top_examples: tuple[FeatureExample, ...] = ()
    top_logits: tuple[TokenValue, ...] = ()
    bottom_logits: tuple[TokenValue, ...] = ()


@dataclass(frozen=True)
class SearchRequest:
    """Exactly one of ``query`` / ``token_id`` is set (checked in convert); an empty
    ``dictionary_id`` searches every loaded dictionary."""

    query: str | None = None
    token_id: int | None = None
    dictionary_id: str = ""
    limit: int = 20


@dataclass(frozen=True)
class FeatureMatch:
    feature: FeatureRef
    label: str
    score: float


@dataclass(frozen=True)
class SearchResult:
    matches: tuple[FeatureMatch, ...]
