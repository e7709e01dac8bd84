from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]

class AttributionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTRIBUTION_MODE_UNSPECIFIED: _ClassVar[AttributionMode]
    ATTRIBUTION_MODE_GRAPH: _ClassVar[AttributionMode]
    ATTRIBUTION_MODE_LOGIT_RANKING: _ClassVar[AttributionMode]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_DONE: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_CANCELLED: FinishReason
ATTRIBUTION_MODE_UNSPECIFIED: AttributionMode
ATTRIBUTION_MODE_GRAPH: AttributionMode
ATTRIBUTION_MODE_LOGIT_RANKING: AttributionMode
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_DONE: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class FeatureRef(_message.Message):
    __slots__ = ("dictionary_id", "index", "fingerprint")
    DICTIONARY_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    dictionary_id: str
    index: int
    fingerprint: str
    def __init__(self, dictionary_id: _Optional[str] = ..., index: _Optional[int] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "text", "bytes", "start", "end", "special")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    bytes: bytes
    start: int
    end: int
    special: bool
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., bytes: _Optional[bytes] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., special: _Optional[bool] = ...) -> None: ...

class FeatureActivation(_message.Message):
    __slots__ = ("index", "activation")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    index: int
    activation: float
    def __init__(self, index: _Optional[int] = ..., activation: _Optional[float] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("model_name", "model_weights_hash", "engine", "dtype", "dictionary_fingerprints", "seed", "steering_spec_fingerprint", "server_version", "request_id")
    class DictionaryFingerprintsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_WEIGHTS_HASH_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEERING_SPEC_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_weights_hash: str
    engine: str
    dtype: str
    dictionary_fingerprints: _containers.ScalarMap[str, str]
    seed: int
    steering_spec_fingerprint: str
    server_version: str
    request_id: str
    def __init__(self, model_name: _Optional[str] = ..., model_weights_hash: _Optional[str] = ..., engine: _Optional[str] = ..., dtype: _Optional[str] = ..., dictionary_fingerprints: _Optional[_Mapping[str, str]] = ..., seed: _Optional[int] = ..., steering_spec_fingerprint: _Optional[str] = ..., server_version: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "weights_hash", "n_layers", "d_model", "d_vocab", "hook_names", "n_heads", "d_mlp", "dtype", "bos_token_id", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_HASH_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    D_VOCAB_FIELD_NUMBER: _ClassVar[int]
    HOOK_NAMES_FIELD_NUMBER: _ClassVar[int]
    N_HEADS_FIELD_NUMBER: _ClassVar[int]
    D_MLP_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    weights_hash: str
    n_layers: int
    d_model: int
    d_vocab: int
    hook_names: _containers.RepeatedScalarFieldContainer[str]
    n_heads: int
    d_mlp: int
    dtype: str
    bos_token_id: int
    source: str
    def __init__(self, name: _Optional[str] = ..., weights_hash: _Optional[str] = ..., n_layers: _Optional[int] = ..., d_model: _Optional[int] = ..., d_vocab: _Optional[int] = ..., hook_names: _Optional[_Iterable[str]] = ..., n_heads: _Optional[int] = ..., d_mlp: _Optional[int] = ..., dtype: _Optional[str] = ..., bos_token_id: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class DictionaryInfo(_message.Message):
    __slots__ = ("id", "fingerprint", "architecture", "hook_name", "hook_name_out", "d_in", "d_sae", "source", "l0", "fvu", "dead_fraction", "ce_loss_delta", "k", "version", "description")
    ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HOOK_NAME_FIELD_NUMBER: _ClassVar[int]
    HOOK_NAME_OUT_FIELD_NUMBER: _ClassVar[int]
    D_IN_FIELD_NUMBER: _ClassVar[int]
    D_SAE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    L0_FIELD_NUMBER: _ClassVar[int]
    FVU_FIELD_NUMBER: _ClassVar[int]
    DEAD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    CE_LOSS_DELTA_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    id: str
    fingerprint: str
    architecture: str
    hook_name: str
    hook_name_out: str
    d_in: int
    d_sae: int
    source: str
    l0: float
    fvu: float
    dead_fraction: float
    ce_loss_delta: float
    k: int
    version: str
    description: str
    def __init__(self, id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., architecture: _Optional[str] = ..., hook_name: _Optional[str] = ..., hook_name_out: _Optional[str] = ..., d_in: _Optional[int] = ..., d_sae: _Optional[int] = ..., source: _Optional[str] = ..., l0: _Optional[float] = ..., fvu: _Optional[float] = ..., dead_fraction: _Optional[float] = ..., ce_loss_delta: _Optional[float] = ..., k: _Optional[int] = ..., version: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_tokens_per_input", "max_inputs", "max_top_k", "max_dictionaries_per_call", "max_new_tokens", "max_interventions", "max_attribution_tokens", "max_feature_nodes", "max_concurrent_attributions", "max_message_bytes")
    MAX_TOKENS_PER_INPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_DICTIONARIES_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTRIBUTION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_FEATURE_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_ATTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_tokens_per_input: int
    max_inputs: int
    max_top_k: int
    max_dictionaries_per_call: int
    max_new_tokens: int
    max_interventions: int
    max_attribution_tokens: int
    max_feature_nodes: int
    max_concurrent_attributions: int
    max_message_bytes: int
    def __init__(self, max_tokens_per_input: _Optional[int] = ..., max_inputs: _Optional[int] = ..., max_top_k: _Optional[int] = ..., max_dictionaries_per_call: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_interventions: _Optional[int] = ..., max_attribution_tokens: _Optional[int] = ..., max_feature_nodes: _Optional[int] = ..., max_concurrent_attributions: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("model", "dictionaries", "engines", "generation_engine", "version", "limits")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DICTIONARIES_FIELD_NUMBER: _ClassVar[int]
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_ENGINE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    dictionaries: _containers.RepeatedCompositeFieldContainer[DictionaryInfo]
    engines: _containers.RepeatedScalarFieldContainer[str]
    generation_engine: str
    version: str
    limits: Limits
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., dictionaries: _Optional[_Iterable[_Union[DictionaryInfo, _Mapping]]] = ..., engines: _Optional[_Iterable[str]] = ..., generation_engine: _Optional[str] = ..., version: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class ListDictionariesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDictionariesResponse(_message.Message):
    __slots__ = ("dictionaries",)
    DICTIONARIES_FIELD_NUMBER: _ClassVar[int]
    dictionaries: _containers.RepeatedCompositeFieldContainer[DictionaryInfo]
    def __init__(self, dictionaries: _Optional[_Iterable[_Union[DictionaryInfo, _Mapping]]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text", "prepend_bos")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PREPEND_BOS_FIELD_NUMBER: _ClassVar[int]
    text: str
    prepend_bos: bool
    def __init__(self, text: _Optional[str] = ..., prepend_bos: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    def __init__(self, tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ...) -> None: ...

class DecodeInput(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeFeaturesRequest(_message.Message):
    __slots__ = ("inputs", "prepend_bos", "dictionary_ids", "top_k", "features", "include_error")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PREPEND_BOS_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ERROR_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[DecodeInput]
    prepend_bos: bool
    dictionary_ids: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    features: _containers.RepeatedCompositeFieldContainer[FeatureRef]
    include_error: bool
    def __init__(self, inputs: _Optional[_Iterable[_Union[DecodeInput, _Mapping]]] = ..., prepend_bos: _Optional[bool] = ..., dictionary_ids: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., features: _Optional[_Iterable[_Union[FeatureRef, _Mapping]]] = ..., include_error: _Optional[bool] = ...) -> None: ...

class PositionFeatures(_message.Message):
    __slots__ = ("position", "top", "selected", "error_norm", "fvu")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_NORM_FIELD_NUMBER: _ClassVar[int]
    FVU_FIELD_NUMBER: _ClassVar[int]
    position: int
    top: _containers.RepeatedCompositeFieldContainer[FeatureActivation]
    selected: _containers.RepeatedCompositeFieldContainer[FeatureActivation]
    error_norm: float
    fvu: float
    def __init__(self, position: _Optional[int] = ..., top: _Optional[_Iterable[_Union[FeatureActivation, _Mapping]]] = ..., selected: _Optional[_Iterable[_Union[FeatureActivation, _Mapping]]] = ..., error_norm: _Optional[float] = ..., fvu: _Optional[float] = ...) -> None: ...

class DictionaryResult(_message.Message):
    __slots__ = ("dictionary_id", "positions")
    DICTIONARY_ID_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    dictionary_id: str
    positions: _containers.RepeatedCompositeFieldContainer[PositionFeatures]
    def __init__(self, dictionary_id: _Optional[str] = ..., positions: _Optional[_Iterable[_Union[PositionFeatures, _Mapping]]] = ...) -> None: ...

class DecodeItem(_message.Message):
    __slots__ = ("tokens", "results")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    results: _containers.RepeatedCompositeFieldContainer[DictionaryResult]
    def __init__(self, tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., results: _Optional[_Iterable[_Union[DictionaryResult, _Mapping]]] = ...) -> None: ...

class DecodeFeaturesResponse(_message.Message):
    __slots__ = ("items", "provenance")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[DecodeItem]
    provenance: Provenance
    def __init__(self, items: _Optional[_Iterable[_Union[DecodeItem, _Mapping]]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class VectorTarget(_message.Message):
    __slots__ = ("hook_name", "values")
    HOOK_NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    hook_name: str
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, hook_name: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("feature", "above")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    ABOVE_FIELD_NUMBER: _ClassVar[int]
    feature: FeatureRef
    above: float
    def __init__(self, feature: _Optional[_Union[FeatureRef, _Mapping]] = ..., above: _Optional[float] = ...) -> None: ...

class Intervention(_message.Message):
    __slots__ = ("feature", "vector", "op", "value", "normalize", "apply_to", "positions", "when")
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OP_UNSPECIFIED: _ClassVar[Intervention.Op]
        OP_ADD: _ClassVar[Intervention.Op]
        OP_SCALE: _ClassVar[Intervention.Op]
        OP_CLAMP: _ClassVar[Intervention.Op]
        OP_ABLATE: _ClassVar[Intervention.Op]
    OP_UNSPECIFIED: Intervention.Op
    OP_ADD: Intervention.Op
    OP_SCALE: Intervention.Op
    OP_CLAMP: Intervention.Op
    OP_ABLATE: Intervention.Op
    class ApplyTo(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        APPLY_TO_UNSPECIFIED: _ClassVar[Intervention.ApplyTo]
        APPLY_TO_ALL: _ClassVar[Intervention.ApplyTo]
        APPLY_TO_PROMPT: _ClassVar[Intervention.ApplyTo]
        APPLY_TO_GENERATED: _ClassVar[Intervention.ApplyTo]
    APPLY_TO_UNSPECIFIED: Intervention.ApplyTo
    APPLY_TO_ALL: Intervention.ApplyTo
    APPLY_TO_PROMPT: Intervention.ApplyTo
    APPLY_TO_GENERATED: Intervention.ApplyTo
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    APPLY_TO_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    feature: FeatureRef
    vector: VectorTarget
    op: Intervention.Op
    value: float
    normalize: bool
    apply_to: Intervention.ApplyTo
    positions: _containers.RepeatedScalarFieldContainer[int]
    when: Condition
    def __init__(self, feature: _Optional[_Union[FeatureRef, _Mapping]] = ..., vector: _Optional[_Union[VectorTarget, _Mapping]] = ..., op: _Optional[_Union[Intervention.Op, str]] = ..., value: _Optional[float] = ..., normalize: _Optional[bool] = ..., apply_to: _Optional[_Union[Intervention.ApplyTo, str]] = ..., positions: _Optional[_Iterable[int]] = ..., when: _Optional[_Union[Condition, _Mapping]] = ...) -> None: ...

class TraceSpec(_message.Message):
    __slots__ = ("dictionary_id", "top_k", "features")
    DICTIONARY_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    dictionary_id: str
    top_k: int
    features: _containers.RepeatedCompositeFieldContainer[FeatureRef]
    def __init__(self, dictionary_id: _Optional[str] = ..., top_k: _Optional[int] = ..., features: _Optional[_Iterable[_Union[FeatureRef, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "prepend_bos", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "logprobs", "interventions", "trace", "compare_baseline", "preset", "experiment", "unit_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PREPEND_BOS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    COMPARE_BASELINE_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    UNIT_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    prepend_bos: bool
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    logprobs: bool
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    trace: TraceSpec
    compare_baseline: bool
    preset: str
    experiment: str
    unit_id: str
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., prepend_bos: _Optional[bool] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., logprobs: _Optional[bool] = ..., interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ..., trace: _Optional[_Union[TraceSpec, _Mapping]] = ..., compare_baseline: _Optional[bool] = ..., preset: _Optional[str] = ..., experiment: _Optional[str] = ..., unit_id: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "text", "position", "logprob", "trace", "baseline", "finish_reason", "usage", "arm", "provenance")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    token: Token
    text: str
    position: int
    logprob: float
    trace: _containers.RepeatedCompositeFieldContainer[FeatureActivation]
    baseline: bool
    finish_reason: FinishReason
    usage: Usage
    arm: str
    provenance: Provenance
    def __init__(self, token: _Optional[_Union[Token, _Mapping]] = ..., text: _Optional[str] = ..., position: _Optional[int] = ..., logprob: _Optional[float] = ..., trace: _Optional[_Iterable[_Union[FeatureActivation, _Mapping]]] = ..., baseline: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., arm: _Optional[str] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ...) -> None: ...

class AttributeRequest(_message.Message):
    __slots__ = ("prompt", "prepend_bos", "mode", "target_token_ids", "max_logit_targets", "desired_logit_prob", "max_feature_nodes", "node_threshold", "edge_threshold", "dictionary_id", "batch_size", "detach")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PREPEND_BOS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_LOGIT_TARGETS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_LOGIT_PROB_FIELD_NUMBER: _ClassVar[int]
    MAX_FEATURE_NODES_FIELD_NUMBER: _ClassVar[int]
    NODE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EDGE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DETACH_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    prepend_bos: bool
    mode: AttributionMode
    target_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_logit_targets: int
    desired_logit_prob: float
    max_feature_nodes: int
    node_threshold: float
    edge_threshold: float
    dictionary_id: str
    batch_size: int
    detach: bool
    def __init__(self, prompt: _Optional[str] = ..., prepend_bos: _Optional[bool] = ..., mode: _Optional[_Union[AttributionMode, str]] = ..., target_token_ids: _Optional[_Iterable[int]] = ..., max_logit_targets: _Optional[int] = ..., desired_logit_prob: _Optional[float] = ..., max_feature_nodes: _Optional[int] = ..., node_threshold: _Optional[float] = ..., edge_threshold: _Optional[float] = ..., dictionary_id: _Optional[str] = ..., batch_size: _Optional[int] = ..., detach: _Optional[bool] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "fraction")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    stage: str
    fraction: float
    def __init__(self, stage: _Optional[str] = ..., fraction: _Optional[float] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("id", "kind", "layer", "position", "feature", "activation", "influence", "label", "token_id", "probability", "constant")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Node.Kind]
        KIND_EMBEDDING: _ClassVar[Node.Kind]
        KIND_FEATURE: _ClassVar[Node.Kind]
        KIND_ERROR: _ClassVar[Node.Kind]
        KIND_LOGIT: _ClassVar[Node.Kind]
    KIND_UNSPECIFIED: Node.Kind
    KIND_EMBEDDING: Node.Kind
    KIND_FEATURE: Node.Kind
    KIND_ERROR: Node.Kind
    KIND_LOGIT: Node.Kind
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    INFLUENCE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    id: int
    kind: Node.Kind
    layer: int
    position: int
    feature: FeatureRef
    activation: float
    influence: float
    label: str
    token_id: int
    probability: float
    constant: float
    def __init__(self, id: _Optional[int] = ..., kind: _Optional[_Union[Node.Kind, str]] = ..., layer: _Optional[int] = ..., position: _Optional[int] = ..., feature: _Optional[_Union[FeatureRef, _Mapping]] = ..., activation: _Optional[float] = ..., influence: _Optional[float] = ..., label: _Optional[str] = ..., token_id: _Optional[int] = ..., probability: _Optional[float] = ..., constant: _Optional[float] = ...) -> None: ...

class Edge(_message.Message):
    __slots__ = ("source", "target", "weight")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    source: int
    target: int
    weight: float
    def __init__(self, source: _Optional[int] = ..., target: _Optional[int] = ..., weight: _Optional[float] = ...) -> None: ...

class Scores(_message.Message):
    __slots__ = ("replacement", "completeness")
    REPLACEMENT_FIELD_NUMBER: _ClassVar[int]
    COMPLETENESS_FIELD_NUMBER: _ClassVar[int]
    replacement: float
    completeness: float
    def __init__(self, replacement: _Optional[float] = ..., completeness: _Optional[float] = ...) -> None: ...

class Graph(_message.Message):
    __slots__ = ("nodes", "edges", "scores", "tokens")
    NODES_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    edges: _containers.RepeatedCompositeFieldContainer[Edge]
    scores: Scores
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ..., edges: _Optional[_Iterable[_Union[Edge, _Mapping]]] = ..., scores: _Optional[_Union[Scores, _Mapping]] = ..., tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ...) -> None: ...

class RankingEntry(_message.Message):
    __slots__ = ("feature", "position", "attribution")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    feature: FeatureRef
    position: int
    attribution: float
    def __init__(self, feature: _Optional[_Union[FeatureRef, _Mapping]] = ..., position: _Optional[int] = ..., attribution: _Optional[float] = ...) -> None: ...

class AttributeResponse(_message.Message):
    __slots__ = ("job_id", "progress", "graph", "ranking", "provenance")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    progress: Progress
    graph: Graph
    ranking: _containers.RepeatedCompositeFieldContainer[RankingEntry]
    provenance: Provenance
    def __init__(self, job_id: _Optional[str] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., graph: _Optional[_Union[Graph, _Mapping]] = ..., ranking: _Optional[_Iterable[_Union[RankingEntry, _Mapping]]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ...) -> None: ...

class GetAttributionRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetAttributionResponse(_message.Message):
    __slots__ = ("job_id", "state", "progress", "graph", "ranking", "provenance", "error")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    progress: Progress
    graph: Graph
    ranking: _containers.RepeatedCompositeFieldContainer[RankingEntry]
    provenance: Provenance
    error: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., graph: _Optional[_Union[Graph, _Mapping]] = ..., ranking: _Optional[_Iterable[_Union[RankingEntry, _Mapping]]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class GetFeatureRequest(_message.Message):
    __slots__ = ("feature",)
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    feature: FeatureRef
    def __init__(self, feature: _Optional[_Union[FeatureRef, _Mapping]] = ...) -> None: ...

class FeatureExample(_message.Message):
    __slots__ = ("tokens", "activations")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    activations: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., activations: _Optional[_Iterable[float]] = ...) -> None: ...

class TokenValue(_message.Message):
    __slots__ = ("token", "value")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    token: Token
    value: float
    def __init__(self, token: _Optional[_Union[Token, _Mapping]] = ..., value: _Optional[float] = ...) -> None: ...

class GetFeatureResponse(_message.Message):
    __slots__ = ("feature", "label", "density", "max_activation", "top_examples", "top_logits", "bottom_logits")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    TOP_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGITS_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_LOGITS_FIELD_NUMBER: _ClassVar[int]
    feature: FeatureRef
    label: str
    density: float
    max_activation: float
    top_examples: _containers.RepeatedCompositeFieldContainer[FeatureExample]
    top_logits: _containers.RepeatedCompositeFieldContainer[TokenValue]
    bottom_logits: _containers.RepeatedCompositeFieldContainer[TokenValue]
    def __init__(self, feature: _Optional[_Union[FeatureRef, _Mapping]] = ..., label: _Optional[str] = ..., density: _Optional[float] = ..., max_activation: _Optional[float] = ..., top_examples: _Optional[_Iterable[_Union[FeatureExample, _Mapping]]] = ..., top_logits: _Optional[_Iterable[_Union[TokenValue, _Mapping]]] = ..., bottom_logits: _Optional[_Iterable[_Union[TokenValue, _Mapping]]] = ...) -> None: ...

class SearchFeaturesRequest(_message.Message):
    __slots__ = ("query", "token_id", "dictionary_id", "limit")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    query: str
    token_id: int
    dictionary_id: str
    limit: int
    def __init__(self, query: _Optional[str] = ..., token_id: _Optional[int] = ..., dictionary_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class FeatureMatch(_message.Message):
    __slots__ = ("feature", "label", "score")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    feature: FeatureRef
    label: str
    score: float
    def __init__(self, feature: _Optional[_Union[FeatureRef, _Mapping]] = ..., label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class SearchFeaturesResponse(_message.Message):
    __slots__ = ("features",)
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[FeatureMatch]
    def __init__(self, features: _Optional[_Iterable[_Union[FeatureMatch, _Mapping]]] = ...) -> None: ...
