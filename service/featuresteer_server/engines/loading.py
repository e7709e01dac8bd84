"""Build the engines a config asks for: thread settings, the model, its dictionaries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from featuresteer_server.config import Config
from featuresteer_server.engines.base import Engine
from featuresteer_server.engines.hooked import HookedEngine
from featuresteer_server.engines.hooked_attribution import AttributionSettings
from featuresteer_server.models import DEFAULT_MODEL
from featuresteer_server.tokenization import Tokenizer

log = logging.getLogger(__name__)


def set_threads(config: Config) -> None:
    """Bind torch's thread pools explicitly: on 2 shared cores, unbound OpenMP ran 3-10x slower."""
    import torch

    torch.set_num_threads(config.torch_threads)
    with contextlib.suppress(RuntimeError):  # already set once in this process
        torch.set_num_interop_threads(config.torch_interop_threads)


def needs_quickfit(config: Config) -> bool:
    """True when the server would start with no dictionary, so the labelled stand-in SAE is
    served instead (default model only; see featuresteer_dicts/quickfit.py)."""
    from featuresteer_server.dictionaries import load_catalog

    if not config.quickfit_fallback or config.model != DEFAULT_MODEL or config.dictionaries:
        return False
    if config.catalog is None or not config.load_catalog_defaults:
        return True
    catalog = Path(config.catalog)
    return not catalog.is_file() or not any(e.default for e in load_catalog(catalog))


def load_dictionaries(config: Config, hook_names: set[str], d_model: int) -> list[Any]:
    """The catalog's default dictionaries plus any extra directories from config."""
    from featuresteer_server.dictionaries import load_catalog, load_catalog_entry, load_dictionary

    out: list[Any] = []
    if config.catalog is not None and config.load_catalog_defaults:
        catalog = Path(config.catalog)
        if catalog.is_file():
            for entry in load_catalog(catalog):
                if entry.default:
                    out.append(
                        load_catalog_entry(entry, expected_hooks=hook_names, d_model=d_model)
                    )
        else:
            log.warning("no dictionary catalog at %s", catalog)
    for path in config.dictionaries:
        out.append(load_dictionary(Path(path), expected_hooks=hook_names, d_model=d_model))
    if not out and needs_quickfit(config):
        from featuresteer_dicts import quickfit

        log.warning("no default dictionary in the catalog: serving the QUICK-FIT stand-in SAE")
        quickfit.ensure_quickfit(lambda msg: log.info("%s", msg))
        out.append(quickfit.load_quickfit(hook_names, d_model))
    return out


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def wants_vllm(config: Config) -> bool:
    if config.generation_engine == "vllm":
        if not vllm_available():
            raise RuntimeError(
                "generation_engine=vllm but vLLM is not installed (pip install .[vllm])"
            )
        return True
    return config.generation_engine == "auto" and vllm_available()


async def load_engines(config: Config) -> Engine:
    """The hooked engine, wrapped by the vLLM engine for Generate when vLLM is wanted."""
    hooked = await asyncio.to_thread(load_engine, config)
    if not wants_vllm(config):
        return hooked
    from featuresteer_server.engines.vllm.engine import VllmEngine, VllmOptions

    options = VllmOptions(
        dtype=config.vllm_dtype,
        max_model_len=config.vllm_max_model_len,
        max_num_seqs=config.vllm_max_num_seqs,
        max_num_batched_tokens=config.vllm_max_num_batched_tokens,
        kv_cache_gib=config.vllm_kv_cache_gib,
        gpu_memory_utilization=config.vllm_gpu_memory_utilization,
        enable_prefix_caching=config.vllm_enable_prefix_caching,
    )
    try:
        return await VllmEngine.create(hooked, hooked.source, options)
    except BaseException:
        await hooked.shutdown()
        raise


def load_engine(config: Config) -> HookedEngine:
    import torch

    from featuresteer_server import models

    set_threads(config)
    model_dir = models.resolve_model(config.model, lambda msg: log.info("model: %s", msg))
    dtype = getattr(torch, config.dtype)
    hf_model, hf_tok = models.load_hf(model_dir, dtype)
    hooked = models.build_hooked(hf_model, hf_tok, dtype)
    # the transformers model is kept: the hooked engine generates with it (a second copy of
    # the weights; DESIGN.md "Engines" explains why TransformerLens's generate is not used)
    name = models.DEFAULT_MODEL if config.model == models.DEFAULT_MODEL else model_dir.name
    dicts = load_dictionaries(config, set(hooked.hook_dict), int(hooked.cfg.d_model))
    log.info("loaded %d dictionaries", len(dicts))
    return HookedEngine(
        hooked,
        Tokenizer(hf_tok),
        dicts,
        model_name=name,
        weights_hash=models.weights_hash(model_dir),
        source=str(model_dir),
        max_tokens_per_input=config.max_tokens_per_input,
        decode_dictionaries=config.decode_dictionaries,
        max_dictionaries_per_call=config.max_dictionaries_per_call,
        hf_model=hf_model.eval(),
        max_edit_norm_ratio=config.max_edit_norm_ratio,
        attribution=AttributionSettings(
            max_tokens=config.max_attribution_tokens,
            max_concurrent=config.max_concurrent_attributions,
            batch_size=config.attribution_batch_size,
            memory_budget_bytes=config.attribution_memory_budget_bytes,
        ),
    )
