"""A small TopK SAE fitted at set-up on real activations of the default model: the stand-in
dictionary for machines where the trained dictionaries of the catalog are not available.

It is labelled as such everywhere (its id says ``quickfit``, its description gives its
training size and held-out FVU) and is loaded only when the catalog has no default
dictionary. Text: docstrings of a fixed list of standard-library modules (always on the
machine, no download), split by a hash into train and held-out documents. BOS is kept out of
training and of the figures (DESIGN.md).

Part of the dictionaries tooling (like the trained dictionaries, it is fitted by the tooling
and encoded with the runtime's TopK rule, ``topk_activation``, and its figures measured with
the runtime ``Dictionary``); the server's set-up calls ``ensure_quickfit`` / ``load_quickfit``
(``featuresteer_server.engines.loading``, ``featuresteer-server --prepare-only``).

Must not: be mistaken for a trained dictionary — never put it in the catalog.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from featuresteer_dicts.evaluate import Accumulator
from featuresteer_server import models
from featuresteer_server.dictionaries import (
    Dictionary,
    dictionary_from_tensors,
    load_dictionary,
    write_dictionary,
)
from featuresteer_server.dictionaries.topk import topk_activation

log = logging.getLogger(__name__)
LAYER = 12
HOOK = f"blocks.{LAYER}.hook_resid_post"
D_SAE = 1024
K = 32
CTX = 128
VERSION = "v0-quickfit"
DICT_ID = f"{models.DEFAULT_MODEL_SHORT}/res-topk-{D_SAE}-quickfit/{HOOK}@{VERSION}"
MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email",
    "enum",
    "fractions",
    "functools",
    "http.client",
    "inspect",
    "json",
    "logging",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "zipfile",
)


def quickfit_dir() -> Path:
    return models.cache_dir() / "dictionaries" / "quickfit" / VERSION


def documents() -> list[str]:
    """Docstrings of MODULES and their public members, deduplicated, in a fixed order."""
    seen: set[str] = set()
    docs: list[str] = []
    for name in MODULES:
        mod = importlib.import_module(name)
        objs = [mod, *(getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_"))]
        for obj in objs:
            doc = (
                inspect.getdoc(obj)
                if (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj))
                else None
            )
            if doc and len(doc) > 200 and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


def is_heldout(doc: str) -> bool:
    return hashlib.sha256(doc.encode()).digest()[0] < 26  # ~10% of documents


def windows(tokenizer: Any, docs: list[str], max_tokens: int) -> torch.Tensor:
    """[n, CTX] windows of BOS + CTX-1 tokens of concatenated documents."""
    stream: list[int] = []
    for d in docs:
        stream += tokenizer.encode(d + "\n\n", add_special_tokens=False)
        if len(stream) >= max_tokens:
            break
    n = len(stream) // (CTX - 1)
    body = torch.tensor(stream[: n * (CTX - 1)]).view(n, CTX - 1)
    return torch.cat([torch.full((n, 1), tokenizer.bos_token_id), body], dim=1)


@torch.inference_mode()
def activations(model: Any, toks: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """[n*(CTX-1), d_model] resid_post activations without the BOS position."""
    out = []
    for i in range(0, len(toks), batch):
        _, cache = model.run_with_cache(
            toks[i : i + batch], names_filter=HOOK, stop_at_layer=LAYER + 1
        )
        out.append(cache[HOOK][:, 1:].reshape(-1, model.cfg.d_model).float())
    return torch.cat(out)


def fit(x: torch.Tensor, steps: int, seed: int = 0, batch: int = 512) -> dict[str, torch.Tensor]:
    """Plain TopK SAE training (MSE, Adam), unit-norm decoder rows."""
    g = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    mean = x.mean(0)
    scale = (x - mean).norm(dim=1).mean()
    w_dec = torch.randn(D_SAE, d, generator=g)
    w_dec = (w_dec / w_dec.norm(dim=1, keepdim=True)).requires_grad_()
    w_enc = (w_dec.detach().T.clone() * (d**0.5) / scale).requires_grad_()
    b_enc = torch.zeros(D_SAE, requires_grad=True)
    b_dec = mean.clone().requires_grad_()
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=2e-3)
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        xb = x[idx]
        pre = (xb - b_dec) @ w_enc + b_enc
        acts = topk_activation(pre, K)
        loss = ((acts @ w_dec + b_dec - xb) ** 2).sum(-1).mean() / scale**2
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            w_dec /= w_dec.norm(dim=1, keepdim=True)
        if step % 200 == 0:
            log.info("quickfit step %d/%d loss %.4f", step, steps, loss.item())
    return {
        "W_enc": w_enc.detach(),
        "b_enc": b_enc.detach(),
        "W_dec": w_dec.detach(),
        "b_dec": b_dec.detach(),
    }


def as_dictionary(w: dict[str, torch.Tensor], mean: torch.Tensor) -> Dictionary:
    """The fitted weights as the runtime serves them (before they are written)."""
    cfg = {"architecture": "topk", "d_in": int(w["W_enc"].shape[0]), "d_sae": D_SAE, "k": K}
    cfg["metadata"] = {"hook_name": HOOK, "model_name": models.DEFAULT_MODEL}
    return dictionary_from_tensors(cfg, w, dataset_mean=mean, dictionary_id=DICT_ID)


def evaluate(w: dict[str, torch.Tensor], x: torch.Tensor, mean: torch.Tensor) -> dict[str, float]:
    """Held-out FVU (around ``mean``), L0 and dead fraction of the fitted weights on x."""
    sae = as_dictionary(w, mean)
    acc = Accumulator(D_SAE)
    with torch.no_grad():
        acts = sae.encode(x)
        acc.add(acts, x, sae.reconstruct_from(acts, x), mean)
    figures = acc.result()
    return {k: figures[k] for k in ("fvu", "l0", "dead_fraction")}


def ensure_quickfit(
    progress: Callable[[str], None] | None = None, train_tokens: int = 24_000, steps: int = 1500
) -> Path:
    """Fit (once) and return the quick-fit SAE directory."""
    out = quickfit_dir()
    if (out / "cfg.json").is_file():
        return out
    say = progress or (lambda m: log.info("%s", m))
    t0 = time.perf_counter()
    torch.manual_seed(0)
    hf, tok = models.load_hf(models.prepare_default_model(say), torch.float32)
    model = models.build_hooked(hf, tok, torch.float32)
    docs = documents()
    train_docs = [d for d in docs if not is_heldout(d)]
    held_docs = [d for d in docs if is_heldout(d)]
    say(f"quick-fit SAE: activations at {HOOK} for ~{train_tokens} tokens")
    x = activations(model, windows(tok, train_docs, train_tokens))
    x_held = activations(model, windows(tok, held_docs, max(2_000, train_tokens // 8)))
    say(f"quick-fit SAE: fitting {D_SAE} features, k={K}, {steps} steps on {len(x)} tokens")
    weights = fit(x, steps)
    mean = x.mean(0)
    figures = evaluate(weights, x_held, mean)
    tmp = out.with_name(out.name + ".partial")
    write_dictionary(
        tmp,
        weights,
        architecture="topk",
        hook_name=HOOK,
        model_name=models.DEFAULT_MODEL,
        dataset_mean=mean,
        k=K,
        metadata={
            "version": VERSION,
            "quickfit": True,
            "train_tokens": len(x),
            "heldout_tokens": len(x_held),
            "figures": figures,
        },
    )
    (tmp / "quickfit.json").write_text(
        json.dumps(
            {"id": DICT_ID, **figures, "train_tokens": len(x), "heldout_tokens": len(x_held)},
            indent=2,
        )
    )
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    say(
        f"quick-fit SAE ready in {time.perf_counter() - t0:.0f}s: held-out FVU "
        f"{figures['fvu']:.3f}, L0 {figures['l0']:.1f}, dead {figures['dead_fraction']:.1%}"
    )
    return out


def load_quickfit(expected_hooks: set[str], d_model: int) -> Dictionary:
    """The fitted stand-in, checked against the model, labelled QUICK FIT."""
    path = quickfit_dir()
    info = json.loads((path / "quickfit.json").read_text())
    return load_dictionary(
        path,
        dictionary_id=DICT_ID,
        version=VERSION,
        expected_hooks=expected_hooks,
        d_model=d_model,
        metrics={k: info[k] for k in ("l0", "fvu", "dead_fraction") if not math.isnan(info[k])},
        description=(
            f"QUICK FIT stand-in (not a trained dictionary): TopK SAE fitted at set-up on "
            f"{info['train_tokens']} tokens of standard-library docstrings; held-out "
            f"FVU {info['fvu']:.3f} on {info['heldout_tokens']} tokens"
        ),
    )
