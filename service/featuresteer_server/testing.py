"""Shared test and benchmark support: tiny random models and dictionaries, engines built from
them, synthetic feature metadata, and the circuit-tracer reference harness's helpers.

Why here, in the installed server package (as ``numpy.testing`` or
``transformers.testing_utils``): the test tiers and the benchmarks both need these helpers,
and a benchmark must not import test modules (``tests/`` is not a package anyone installs,
and a benchmark that imports it depends on pytest's path handling). ``tests/support.py``
re-exports this module for the tests. Fixtures specific to attribution live beside it in
``featuresteer_server.attribution.testing``.

Tiny models are for fast unit/integration tests only. The circuit-tracer helpers need a
checkout of the repository: the reference environment is built by
``tests/reference/build_env.sh`` (it runs in its own venv, not ours).

Must not: be imported by serving code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featuresteer_server import models
from featuresteer_server.dictionaries import features_npz, load_dictionary, write_dictionary
from featuresteer_server.engines.hooked import HookedEngine
from featuresteer_server.tokenization import Tokenizer

# the circuit-tracer reference harness (scripts that run in the reference venv)
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "tests" / "reference"
PARITY_PROMPT = "The capital of France is Paris, and the capital of Germany is Berlin. The"
# the hardening issue's isolation repro: six unsteered greedy requests, the poisoning one, the
# six again (tests/integration/test_generate.py, tests/e2e/test_vllm.py)
ISSUE_PROMPTS = (
    "Hello",
    "I think that",
    "Water boils at",
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
)

# -- tiny models, random dictionaries, engines ------------------------------------------------

TINY: dict[str, Any] = dict(  # the tiny random Llama's config
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
    model = LlamaForCausalLM(cfg).eval()  # type: ignore[no-untyped-call]
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
    d = int(TINY["hidden_size"])
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


# -- synthetic feature metadata (the features.npz format: dictionaries/features_npz.py) -------

N_TOP = 4  # examples per feature
WIDTH = 16  # tokens per stored slice (featuresteer_dicts.metadata.WIDTH)
N_LOGITS = 10


def write_features_npz(
    path: Path,
    d_sae: int,
    *,
    seed: int = 0,
    vocab: int = 49152,
    labels: dict[int, str] | None = None,
    tokens: dict[int, list[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Write a random but well-formed ``features.npz``; returns the arrays written.

    ``labels`` overrides labels per feature; ``tokens`` sets feature i's first example's
    tokens (activation 1.0 on each, the feature's max activation).
    """
    rng = np.random.default_rng(seed)
    top_len = rng.integers(1, WIDTH + 1, size=(d_sae, N_TOP)).astype(np.uint8)
    top_len[0, 2:] = 0  # feature 0 has only two examples
    top_tokens = rng.integers(1000, 2000, size=(d_sae, N_TOP, WIDTH)).astype(np.uint16)
    top_acts = rng.uniform(0, 1, size=(d_sae, N_TOP, WIDTH)).astype(np.float16)
    pad = np.arange(WIDTH)[None, None, :] >= top_len[:, :, None]
    top_tokens[pad] = 0
    top_acts[pad] = 0
    if d_sae > 1:  # a dead feature: no examples, density 0
        top_len[d_sae - 1] = 0
        top_tokens[d_sae - 1] = 0
        top_acts[d_sae - 1] = 0
    for i, ids in (tokens or {}).items():
        top_len[i, 0] = len(ids)
        top_tokens[i, 0, :] = 0
        top_tokens[i, 0, : len(ids)] = ids
        top_acts[i, 0, :] = 0
        top_acts[i, 0, : len(ids)] = 5.0
    top_max = top_acts.astype(np.float32).max(-1)  # [F, N]
    order = np.argsort(-top_max, axis=1, kind="stable")
    top_max = np.take_along_axis(top_max, order, 1)
    top_len = np.take_along_axis(top_len, order, 1)
    top_tokens = np.take_along_axis(top_tokens, order[:, :, None], 1)
    top_acts = np.take_along_axis(top_acts, order[:, :, None], 1)
    has = top_len > 0
    max_activation = top_max.max(1).astype(np.float32)
    density = np.where(has.any(1), rng.uniform(1e-4, 0.1, size=d_sae), 0).astype(np.float32)
    logit_top_ids = rng.integers(0, vocab, size=(d_sae, N_LOGITS)).astype(np.int32)
    logit_bottom_ids = rng.integers(0, vocab, size=(d_sae, N_LOGITS)).astype(np.int32)
    logit_top_vals = -np.sort(-rng.uniform(0, 5, size=(d_sae, N_LOGITS)), 1).astype(np.float32)
    logit_bottom_vals = np.sort(-rng.uniform(0, 5, size=(d_sae, N_LOGITS)), 1).astype(np.float32)
    label_list = [
        f"fires on ['tok{i}']; promotes ['out{i}']; density {density[i]:.2e}"
        if has[i].any()
        else "dead: no activation in the scanned tokens"
        for i in range(d_sae)
    ]
    for i, text in (labels or {}).items():
        label_list[i] = text
    arrays = dict(
        density=density,
        max_activation=max_activation,
        n_tokens_scanned=np.int64(100_000),
        top_tokens=top_tokens,
        top_acts=top_acts,
        top_len=top_len,
        top_max=top_max.astype(np.float32),
        top_window=np.where(has, rng.integers(0, 800, size=(d_sae, N_TOP)), -1).astype(np.int32),
        top_start=np.where(has, 1, -1).astype(np.int16),
        top_argmax=np.where(has, 5, -1).astype(np.int16),
        logit_top_ids=logit_top_ids,
        logit_top_vals=logit_top_vals,
        logit_bottom_ids=logit_bottom_ids,
        logit_bottom_vals=logit_bottom_vals,
        labels=np.array(label_list),
    )
    features_npz.write(path, arrays)
    return arrays


# -- the circuit-tracer reference (attribution parity and its benchmark) ----------------------


def ensure_reference_env() -> Path:
    """The reference venv's python (built on first use: about 1.5 min with wheels cached)."""
    venv = Path(os.environ.get("FEATURESTEER_CT_VENV", models.cache_dir() / "ct-venv"))
    script = REFERENCE_DIR / "build_env.sh"
    if not script.is_file():
        raise FileNotFoundError(f"{script} is missing: the reference harness needs a checkout")
    subprocess.run(["bash", str(script), str(venv)], check=True)
    return venv / "bin" / "python"


def ct_model_dir(src: Path) -> Path:
    """A copy of ``src`` that transformers 4.57 loads (weights are symlinked).

    transformers 5 writes ``rope_parameters`` (4.57 wants ``rope_theta``; without it the
    rotary base silently falls back to 10000) and a ``TokenizersBackend`` tokenizer class
    that 4.57 does not know.
    """
    dst = models.cache_dir() / "models" / (src.name + "-tf4")
    stamp = dst / ".featuresteer-tf4"
    if stamp.exists():
        return dst
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg:
        if "rope_theta" not in rope:
            raise SystemExit(f"{src}/config.json has no rope theta")
        cfg["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") == "default":
        cfg.pop("rope_parameters", None)
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("backend", "is_local", "local_files_only"):
        tok_cfg.pop(key, None)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    for name in ("tokenizer.json", "generation_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, tmp / name)
    for weights in src.glob("*.safetensors"):
        (tmp / weights.name).symlink_to(weights.resolve())
    (tmp / ".featuresteer-tf4").touch()
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def prompt_tokens(tok: Any, n_tokens: int) -> list[int]:
    """BOS + the first ``n_tokens - 1`` tokens of the parity prompt (repeated)."""
    ids = [tok.bos_token_id if tok.bos_token_id is not None else 1]
    ids += tok(PARITY_PROMPT * 4, add_special_tokens=False).input_ids
    if len(ids) < n_tokens:
        raise SystemExit(f"prompt has only {len(ids)} tokens")
    return ids[:n_tokens]
