"""The one frozen configuration, built once from flags, ``FEATURESTEER_*`` environment
variables and an optional config file (TOML, JSON or YAML), in that order of precedence.

Fields are flat so that every flag has the obvious environment variable
(``--metrics-host`` ⇄ ``FEATURESTEER_METRICS_HOST``); the sections below are comments
and ``Config.limits()`` groups the request limits the servicer enforces.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CATALOG = REPO_ROOT / "dictionaries" / "catalog.json"


@dataclass(frozen=True)
class Limits:
    """Request limits; exceeding one is INVALID_ARGUMENT naming the field."""

    max_tokens_per_input: int
    max_inputs: int
    max_top_k: int
    max_dictionaries_per_call: int
    max_features_per_call: int
    max_new_tokens: int
    max_interventions: int
    max_attribution_tokens: int
    max_feature_nodes: int
    max_concurrent_attributions: int
    max_message_bytes: int
    max_search_limit: int = 100
    default_search_limit: int = 20
    max_text_bytes: int = 128 * 1024
    max_messages: int = 256
    max_stop_strings: int = 16
    max_stop_bytes: int = 256
    max_vector_values: int = 16384
    max_id_bytes: int = 256


class Config(BaseSettings):
    """Server configuration. Every field is also ``FEATURESTEER_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="FEATURESTEER_", frozen=True, extra="forbid")
    _file_values: ClassVar[dict[str, Any]] = {}

    # -- server
    host: str = Field("127.0.0.1", description="gRPC bind address")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: pick a free one)")
    grace_seconds: float = Field(10.0, ge=0, description="drain time on SIGTERM")
    max_message_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="gRPC send limit; the receive limit is the largest per-method request "
        "limit (docs/SECURITY.md), never above this",
    )
    log_level: str = "INFO"

    # -- metrics
    metrics_host: str = Field("127.0.0.1", description="Prometheus exporter bind address")
    metrics_port: int = Field(9400, ge=0, le=65535, description="0: pick a free port")
    metrics_enabled: bool = True

    # -- model and engine
    model: str = Field(
        "smollm2-135m-instruct",
        description="the default model, or a local Hugging Face model directory",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_threads: int = Field(2, ge=1, description="intra-op threads (set explicitly: 2 cores)")
    torch_interop_threads: int = Field(1, ge=1)
    generation_engine: Literal["auto", "hooked", "vllm"] = Field(
        "auto", description="auto: vLLM when it is installed, else the hooked engine"
    )
    vllm_dtype: str = "float32"
    vllm_max_model_len: int = 2048
    vllm_max_num_seqs: int = 32
    vllm_max_num_batched_tokens: int = 2048
    vllm_kv_cache_gib: int = 2
    vllm_gpu_memory_utilization: float = 0.5
    vllm_enable_prefix_caching: bool = True

    # -- dictionaries
    catalog: Path | None = Field(DEFAULT_CATALOG, description="catalog file; None: no catalog")
    dictionaries: tuple[Path, ...] = Field((), description="extra SAELens-format directories")
    load_catalog_defaults: bool = True
    quickfit_fallback: bool = Field(
        True,
        description="default model only: when no catalog/extra dictionary loads, fit (once, at "
        "set-up) and serve a small labelled stand-in SAE so decode works out of the box",
    )

    # -- cache (Redis may evict or go down; the in-process LRU takes over)
    redis_url: str | None = None
    store_url: str | None = None
    cache_ttl_seconds: int = Field(3600, ge=1, description="TTL of every cache key in Redis")
    lru_size: int = Field(4096, ge=0, description="in-process LRU entries (0: none)")
    cache_key_prefix: str = Field(
        "featuresteer:v2", description="namespace of cache keys: <prefix>:<kind>:<fingerprint>:…"
    )
    cache_socket_timeout_seconds: float = Field(
        0.25, gt=0, description="Redis connect/read timeout; beyond it the LRU answers"
    )
    cache_retry_seconds: float = Field(
        2.0, ge=0, description="after a Redis error, skip Redis this long, then try again"
    )

    # -- limits
    max_tokens_per_input: int = Field(1024, ge=1)
    max_inputs: int = Field(16, ge=1)
    max_top_k: int = Field(64, ge=1)
    max_dictionaries_per_call: int = Field(8, ge=1)
    max_features_per_call: int = Field(256, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    max_interventions: int = Field(32, ge=1)
    max_edit_norm_ratio: float = Field(
        100.0,
        gt=0,
        le=1e4,
        description="an intervention may add at most this many times the hook's typical "
        "per-token norm (docs/steering.md#limits); beyond: INVALID_ARGUMENT",
    )
    max_attribution_tokens: int = Field(64, ge=1)
    max_feature_nodes: int = Field(500, ge=1)
    max_search_limit: int = Field(100, ge=1, description="SearchFeatures limit cap")
    default_search_limit: int = Field(20, ge=1, description="SearchFeatures limit when 0")
    feature_logits_k: int = Field(10, ge=1, le=100, description="GetFeature top/bottom logits")
    max_concurrent_attributions: int = Field(1, ge=1, description="attributions run at once")
    max_queued_attributions: int = Field(4, ge=0, description="beyond: RESOURCE_EXHAUSTED")
    attribution_batch_size: int = Field(64, ge=1, le=1024)
    attribution_memory_budget_bytes: int = Field(2 * 1024**3, ge=1)
    attribution_result_ttl_seconds: float = Field(900.0, gt=0, description="GetAttribution keeps")

    # -- request size bounds (docs/SECURITY.md): checked on the protobuf containers before
    # anything is converted, tokenized or materialised; each method's receive limit is the
    # largest request its field bounds allow
    max_text_bytes: int = Field(
        128 * 1024,
        ge=1,
        description="UTF-8 bytes of one text: Tokenize text, a DecodeFeatures text input, the "
        "Generate prompt, all Generate messages together (refused before tokenizing; 128 "
        "bytes per token of max_tokens_per_input: no SmolLM2 token is longer than 81 bytes)",
    )
    max_messages: int = Field(256, ge=1, description="Generate chat messages")
    max_stop_strings: int = Field(16, ge=0, description="Generate stop strings")
    max_stop_bytes: int = Field(256, ge=1, description="UTF-8 bytes of one stop string")
    max_vector_values: int = Field(
        16384,
        ge=1,
        description="values of one raw-vector intervention (the engine then requires exactly "
        "the hook's width)",
    )
    max_id_bytes: int = Field(
        256,
        ge=16,
        description="UTF-8 bytes of an id or name: dictionary ids, fingerprints, hook names, "
        "chat roles, job ids, preset/experiment names",
    )
    decode_dictionaries: tuple[str, ...] = Field(
        (),
        description="DecodeFeatures with no dictionary_ids and no features decodes with these "
        "(at most max_dictionaries_per_call); empty: the loaded SAEs (not transcoders), the "
        "first max_dictionaries_per_call in load order",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        file_source = InitSettingsSource(settings_cls, dict(cls._file_values))
        return (init_settings, env_settings, file_source)

    def limits(self) -> Limits:
        return Limits(
            max_tokens_per_input=self.max_tokens_per_input,
            max_inputs=self.max_inputs,
            max_top_k=self.max_top_k,
            max_dictionaries_per_call=self.max_dictionaries_per_call,
            max_features_per_call=self.max_features_per_call,
            max_new_tokens=self.max_new_tokens,
            max_interventions=self.max_interventions,
            max_attribution_tokens=self.max_attribution_tokens,
            max_feature_nodes=self.max_feature_nodes,
            max_concurrent_attributions=self.max_concurrent_attributions,
            max_message_bytes=self.max_message_bytes,
            max_search_limit=self.max_search_limit,
            default_search_limit=min(self.default_search_limit, self.max_search_limit),
            max_text_bytes=self.max_text_bytes,
            max_messages=self.max_messages,
            max_stop_strings=self.max_stop_strings,
            max_stop_bytes=self.max_stop_bytes,
            max_vector_values=self.max_vector_values,
            max_id_bytes=self.max_id_bytes,
        )


def _read_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix == ".toml":
        data = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping")
    return {k.replace("-", "_"): v for k, v in data.items()}


def load_config(config_file: Path | None = None, **overrides: Any) -> Config:
    """Flags (``overrides``, None values ignored) > environment > config file > defaults."""
    values = {k: v for k, v in overrides.items() if v is not None}
    file_values = _read_file(Path(config_file)) if config_file else {}

    if not file_values:
        return Config(**values)

    class _WithFile(Config):
        _file_values: ClassVar[dict[str, Any]] = file_values

    return Config(**_WithFile(**values).model_dump())
