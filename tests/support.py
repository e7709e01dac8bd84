"""Test helpers: a tiny random Llama with the real tokenizer, random dictionaries on disk,
and engines built from them. Tiny models are for fast unit/integration tests only."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from featuresteer_server import models
from featuresteer_server.dictionaries import load_dictionary, write_dictionary
from featuresteer_server.engines.hooked import HookedEngine
from featuresteer_server.tokenization import Tokenizer

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)


@lru_cache(maxsize=1)
def default_hf_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.prepare_default_model())


def tiny_hf_model(seed: int = 0) -> Any:
    """A random Llama with SmolLM2's vocabulary and rope theta, in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = default_hf_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        **TINY,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-init weights so activations are not all tiny
        for p in model.parameters():
            p.mul_(3.0) if p.dim() > 1 else None
    return model


def random_weights(
    d_in: int,
    d_sae: int,
    d_out: int | None = None,
    *,
    seed: int = 0,
    threshold: bool = False,
    skip: bool = False,
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d_out = d_out or d_in
    w = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "W_dec": torch.randn(d_sae, d_out, generator=g) / d_sae**0.5,
        "b_dec": torch.randn(d_out, generator=g) * 0.1,
    }
    if threshold:
        w["threshold"] = torch.rand(d_sae, generator=g) * 0.2
    if skip:
        w["W_skip"] = torch.randn(d_out, d_in, generator=g) * 0.01
    return w


def write_random_dictionary(
    root: Path,
    name: str,
    architecture: str,
    hook_name: str,
    d_in: int,
    d_sae: int,
    *,
    hook_name_out: str | None = None,
    seed: int = 0,
    **cfg: Any,
) -> Path:
    weights = random_weights(
        d_in, d_sae, seed=seed, threshold="jumprelu" in architecture, skip="skip" in architecture
    )
    mean = torch.randn(d_in, generator=torch.Generator().manual_seed(seed + 1)) * 0.1
    return write_dictionary(
        root / name,
        weights,
        architecture=architecture,
        hook_name=hook_name,
        hook_name_out=hook_name_out,
        model_name="tiny-llama",
        dataset_mean=mean,
        **cfg,
    )


def tiny_engine(root: Path, *, all_transcoders: bool = False, **engine_kwargs: Any) -> HookedEngine:
    """Tiny random model + a TopK SAE at blocks.1.hook_resid_post + a ReLU transcoder at
    layer 0 (and at layer 1 with ``all_transcoders``, so attribution graphs can be built),
    loaded from disk like production dictionaries."""
    hf = tiny_hf_model()
    tok = default_hf_tokenizer()
    hooked = models.build_hooked(hf, tok, torch.float32)
    hooks = set(hooked.hook_dict)
    d = TINY["hidden_size"]
    sae_dir = write_random_dictionary(
        root, "sae", "topk", "blocks.1.hook_resid_post", d, 128, k=8, seed=1
    )
    tc_dir = write_random_dictionary(
        root,
        "tc",
        "transcoder",
        "blocks.0.ln2.hook_normalized",
        d,
        96,
        hook_name_out="blocks.0.hook_mlp_out",
        seed=2,
    )
    dicts = [
        load_dictionary(
            sae_dir,
            dictionary_id="tiny/res-topk-128/blocks.1.hook_resid_post@v1",
            expected_hooks=hooks,
            d_model=d,
        ),
        load_dictionary(
            tc_dir,
            dictionary_id="tiny/tc-96/blocks.0.ln2.hook_normalized@v1",
            expected_hooks=hooks,
            d_model=d,
        ),
    ]
    if all_transcoders:
        tc1 = write_random_dictionary(
            root,
            "tc1",
            "transcoder",
            "blocks.1.ln2.hook_normalized",
            d,
            96,
            hook_name_out="blocks.1.hook_mlp_out",
            seed=3,
        )
        dicts.append(
            load_dictionary(
                tc1,
                dictionary_id="tiny/tc-96/blocks.1.ln2.hook_normalized@v1",
                expected_hooks=hooks,
                d_model=d,
            )
        )
    engine = HookedEngine(
        hooked,
        Tokenizer(tok),
        dicts,
        model_name="tiny-llama",
        weights_hash="0" * 64,
        source="random",
        **engine_kwargs,
    )
    engine.hf_model = hf  # the independent reference for tests
    return engine
