"""Pipeline steps after training: write artifacts, evaluate, feature metadata, catalog.

Every step is idempotent: artifacts are never overwritten (a retrain is a new version),
metrics and metadata are skipped when present, so ``all`` can be re-run after an interruption.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featuresteer_dicts.artifacts import (
    STATS,
    WEIGHTS,
    in_memory,
    load,
    sae_cfg,
    sae_dir,
    tc_cfg,
    tc_dir,
    write_artifact,
)
from featuresteer_dicts.common import (
    CORPUS_VERSION,
    CTX,
    D_MODEL,
    EVAL_TOKENS,
    FAMILY_VERSION,
    MODEL_NAME,
    MODEL_SHORT,
    N_LAYERS,
    SAE_FAMILY,
    SAE_LAYERS,
    SEED,
    TC_FAMILY,
    TC_VERSION,
    Progress,
    dict_id,
    repo_dict_root,
    sae_hook,
    tc_hooks,
    train_dir,
    write_json_atomic,
)

CE_WINDOWS = 16  # 2,032 tokens per dictionary for the spliced-CE figure
SAE_META_WINDOWS = 800  # ~100k cached training tokens scanned for SAE metadata
TC_META_WINDOWS = 400  # ~51k training tokens (fresh forwards) for transcoder metadata/mean
SAE_TOP, TC_TOP = 12, 6
METRICS = "metrics.json"


def _rounded(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the shipped float16 file will hold, back in float32."""
    return {k: v.to(torch.float16).float() for k, v in weights.items()}


def export_saes(progress: Progress) -> None:
    """Write the SAELens directories of the trained SAEs (dataset mean from the cache)."""
    from featuresteer_dicts.activations import acts_dir
    from featuresteer_dicts.artifacts import check_saelens
    from featuresteer_dicts.runs import final_path

    for layer in SAE_LAYERS:
        out = sae_dir(layer)
        if (out / WEIGHTS).exists():
            continue
        state = torch.load(final_path("sae", layer), weights_only=False)
        cache = np.load(acts_dir() / f"{sae_hook(layer)}.npy", mmap_mode="r")
        n = int(state["train_tokens"])
        total = np.zeros(D_MODEL)
        for i in range(0, n, 100_000):
            total += np.asarray(cache[i : min(n, i + 100_000)], dtype=np.float64).sum(0)
        mean = torch.from_numpy(total / n).float()
        w = state["weights"]
        cfg = sae_cfg(D_MODEL, w["W_enc"].shape[1], state["cfg"]["k"], layer, n)
        write_artifact(out, cfg, w, mean)
        x = torch.from_numpy(np.asarray(cache[:256], dtype=np.float32))
        diff = check_saelens(out, x)
        progress(f"wrote {out} (SAELens encode max |diff| {diff:.2e})")


def tc_post_pass(progress: Progress, n_windows: int | None = None) -> dict[str, Any]:
    """One forward sweep for all transcoders: dataset means of hook_mlp_out + feature stats."""
    n_windows = n_windows or TC_META_WINDOWS
    from featuresteer_dicts.activations import iter_mlp_pairs, load_hf_model
    from featuresteer_dicts.metadata import FeatureStats
    from featuresteer_dicts.runs import final_path

    path = train_dir() / f"tc-{TC_VERSION}_post.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    hf = load_hf_model(torch.get_num_threads())
    tcs = []  # what export_transcoders will ship (float16-rounded weights)
    for layer in range(N_LAYERS):
        state = torch.load(final_path("tc", layer), weights_only=False)
        w = _rounded(state["weights"])
        cfg = tc_cfg(
            D_MODEL, w["W_enc"].shape[1], layer, int(state["train_tokens"]), int(state["cfg"]["k"])
        )
        tcs.append(in_memory(cfg, w))
    stats = [FeatureStats(c.d_sae, TC_TOP) for c in tcs]
    sums = torch.zeros(N_LAYERS, D_MODEL, dtype=torch.float64)
    n_tok = 0
    start = 0
    for nxt, acts in iter_mlp_pairs(hf, "train", 0, n_windows, 8):
        b = nxt - start
        ids = torch.arange(start, nxt)
        for layer, c in enumerate(tcs):
            y = acts[c.hook_name_out]
            sums[layer] += y.double().sum(0)
            a = c.encode(acts[c.hook_name])
            stats[layer].update(a.view(b, CTX - 1, -1), ids)
        n_tok += b * (CTX - 1)
        start = nxt
        progress(f"transcoder post pass {nxt}/{n_windows} windows")
    result = {"mean": (sums / n_tok).float(), "stats": stats, "n_tokens": n_tok}
    torch.save(result, path)
    return result


def export_transcoders(progress: Progress) -> None:
    """Write the SAELens directories of the trained transcoders."""
    from featuresteer_dicts.artifacts import check_saelens
    from featuresteer_dicts.runs import final_path

    if all_written(TC_FAMILY):
        return
    post = tc_post_pass(progress)
    for layer in range(N_LAYERS):
        out = tc_dir(layer)
        if (out / WEIGHTS).exists():
            continue
        state = torch.load(final_path("tc", layer), weights_only=False)
        w = state["weights"]
        cfg = tc_cfg(
            D_MODEL, w["W_enc"].shape[1], layer, int(state["train_tokens"]), int(state["cfg"]["k"])
        )
        write_artifact(out, cfg, w, post["mean"][layer])
        diff = check_saelens(out, torch.randn(64, D_MODEL))
        progress(f"wrote {out} (SAELens encode max |diff| {diff:.2e})")


def all_written(family: str) -> bool:
    """Every artifact of the family's current version is in the tree (nothing to train)."""
    return len(shipped(family)) == (len(SAE_LAYERS) if family == SAE_FAMILY else N_LAYERS)


def shipped(family: str) -> dict[str, Path]:
    """{dictionary id: artifact dir} for the family's written artifacts."""
    if family == SAE_FAMILY:
        dirs = {dict_id(family, sae_hook(layer)): sae_dir(layer) for layer in SAE_LAYERS}
    else:
        dirs = {dict_id(family, tc_hooks(layer)[0]): tc_dir(layer) for layer in range(N_LAYERS)}
    return {k: v for k, v in dirs.items() if (v / WEIGHTS).exists() and (v / STATS).exists()}


def evaluate(progress: Progress, family: str) -> dict[str, dict[str, float]]:
    """Held-out figures for every shipped dictionary of ``family`` (cached in metrics.json)."""
    from featuresteer_dicts.common import load_model
    from featuresteer_dicts.corpus import eval_windows
    from featuresteer_dicts.evaluate import ce_delta, reconstruction_metrics, run_eval_hooks

    metrics = known_metrics()
    todo = {k: v for k, v in shipped(family).items() if k not in metrics}
    if not todo:
        return metrics
    torch.manual_seed(SEED)
    model, _ = load_model()
    dicts = {k: load(v, k) for k, v in todo.items()}
    windows = eval_windows(EVAL_TOKENS)
    hooks = sorted({h for d in dicts.values() for h in (d.hook_name, d.hook_name_out)})
    batches = []
    for i, acts in enumerate(run_eval_hooks(model, windows, hooks)):
        batches.append({h: a.to(torch.float32) for h, a in acts.items()})
        progress(f"eval forward batch {i + 1}/{-(-windows.shape[0] // 16)}")
    rec = reconstruction_metrics(dicts, batches)
    del batches
    progress("spliced CE")
    ce = ce_delta(model, dicts, windows[:CE_WINDOWS])
    for k in todo:
        metrics[k] = {
            **rec[k],
            "ce_loss_delta": ce[k],
            "ce_clean": ce["__clean__"],
            "n_ce_tokens": CE_WINDOWS * (CTX - 1),
        }
        progress(f"{k}: {json.dumps(metrics[k])}")
    write_json_atomic(train_dir() / METRICS, metrics)
    return metrics


def sae_metadata(progress: Progress) -> None:
    """features.npz for each SAE from the cached training activations."""
    from featuresteer_dicts.activations import acts_dir
    from featuresteer_dicts.common import load_model
    from featuresteer_dicts.corpus import load_split
    from featuresteer_dicts.metadata import FeatureStats, write_metadata

    model, tok = None, None
    n_win = SAE_META_WINDOWS
    for layer in SAE_LAYERS:
        if (sae_dir(layer) / "cfg.json").exists():
            cfg = json.loads((sae_dir(layer) / "cfg.json").read_text())
            n_win = min(n_win, cfg["metadata"]["training_tokens"] // (CTX - 1) // 40 * 40)
    train = np.asarray(load_split("train")[:n_win])
    for layer in SAE_LAYERS:
        out = sae_dir(layer) / "features.npz"
        if out.exists() or not (sae_dir(layer) / WEIGHTS).exists():
            continue
        if model is None:
            model, tok = load_model()
        sae = load(sae_dir(layer))
        cache = np.load(acts_dir() / f"{sae_hook(layer)}.npy", mmap_mode="r")
        stats = FeatureStats(sae.d_sae, SAE_TOP)
        step = 40
        for w0 in range(0, n_win, step):
            rows = cache[w0 * (CTX - 1) : (w0 + step) * (CTX - 1)]
            with torch.no_grad():
                a = sae.encode(torch.from_numpy(np.asarray(rows, dtype=np.float32)))
            stats.update(a.view(step, CTX - 1, -1), torch.arange(w0, w0 + step))
            if w0 % 400 == 0:
                progress(f"SAE L{layer} metadata {w0}/{n_win} windows")
        info = write_metadata(out, stats, train, sae.W_dec, model, tok)
        progress(f"wrote {out}: {info}")


def tc_metadata(progress: Progress) -> None:
    """features.npz for each transcoder from the post pass statistics."""
    from featuresteer_dicts.common import load_model
    from featuresteer_dicts.corpus import load_split
    from featuresteer_dicts.metadata import write_metadata

    todo = [
        layer
        for layer in range(N_LAYERS)
        if (tc_dir(layer) / WEIGHTS).exists() and not (tc_dir(layer) / "features.npz").exists()
    ]
    if not todo:
        return
    post = tc_post_pass(progress)
    model, tok = load_model()
    train = np.asarray(load_split("train")[:TC_META_WINDOWS])
    for layer in todo:
        out = tc_dir(layer) / "features.npz"
        tc = load(tc_dir(layer))
        info = write_metadata(out, post["stats"][layer], train, tc.W_dec, model, tok)
        progress(f"wrote {out}: {info}")


def known_metrics() -> dict[str, dict[str, Any]]:
    """Held-out figures per dictionary id: those catalog.json already records for artifacts
    still in the tree (so a fresh machine, which has no metrics.json, neither re-evaluates nor
    drops them), overridden by metrics.json's."""
    root = repo_dict_root()
    catalog = root / "catalog.json"
    metrics = {}
    if catalog.is_file():
        metrics = {
            e["id"]: e["metrics"]
            for e in json.loads(catalog.read_text())["dictionaries"]
            if (root / e["path"] / WEIGHTS).exists()
        }
    path = train_dir() / METRICS
    if path.is_file():
        metrics.update(json.loads(path.read_text()))
    return metrics


def write_catalog(progress: Progress) -> Path:
    """dictionaries/catalog.json from the shipped artifacts and their metrics."""
    root = repo_dict_root()
    metrics = known_metrics()
    entries = []
    for family, desc in (
        (SAE_FAMILY, "TopK SAE on the residual stream after block {L}"),
        (TC_FAMILY, "JumpReLU transcoder of the MLP in block {L} (BatchTopK-trained)"),
    ):
        for did, path in shipped(family).items():
            if did not in metrics:
                continue
            cfg = json.loads((path / "cfg.json").read_text())
            meta = cfg["metadata"]
            m = metrics[did]
            feats = path / "features.npz"
            entries.append(
                {
                    "id": did,
                    "path": str(path.relative_to(root)),
                    "architecture": cfg["architecture"],
                    "hook_name": meta["hook_name"],
                    "hook_name_out": meta.get("hook_name_out", meta["hook_name"]),
                    "d_in": cfg["d_in"],
                    "d_sae": cfg["d_sae"],
                    "version": FAMILY_VERSION[family],
                    "description": desc.format(L=meta["hook_layer"])
                    + f"; trained on {meta['training_tokens']:,} tokens",
                    "metrics": {
                        k: m[k]
                        for k in (
                            "l0",
                            "fvu",
                            "dead_fraction",
                            "ce_loss_delta",
                            "n_eval_tokens",
                            "n_ce_tokens",
                        )
                    },
                    "metadata": str(feats.relative_to(root)) if feats.exists() else None,
                    "default": True,
                }
            )
    from featuresteer_dicts.corpus import corpus_dir

    manifest = json.loads((corpus_dir() / "manifest.json").read_text())
    corpus = {
        "version": CORPUS_VERSION,
        "heldout_sha256": manifest["heldout_sha256"],
        "eval_tokens": EVAL_TOKENS,
        "debian_versions": manifest["debian_versions"],
    }
    out = root / "catalog.json"
    write_json_atomic(out, {"model": MODEL_NAME, "corpus": corpus, "dictionaries": entries})
    progress(f"wrote {out} ({len(entries)} dictionaries)")
    update_readme_table(progress)
    return out


def export_circuit_tracer(progress: Progress, out: Path) -> Path:
    """The shipped transcoders in circuit-tracer's per-layer layout (layer_{i}.safetensors +
    config.yaml), written by the service's exporter from the loaded SAELens directories (the
    same code the parity test and the attribution benchmark use)."""
    from featuresteer_server.attribution import export_transcoder_set
    from featuresteer_server.dictionaries import load_dictionary

    tcs = []
    for layer in range(N_LAYERS):
        src = tc_dir(layer)
        if not (src / WEIGHTS).exists():
            raise FileNotFoundError(f"{src} is missing: train the transcoders first")
        tcs.append(load_dictionary(src, dictionary_id=dict_id(TC_FAMILY, tc_hooks(layer)[0])))
    config = export_transcoder_set(
        tcs, out, scan=f"featuresteer/{MODEL_SHORT}/{TC_FAMILY}/{TC_VERSION}"
    )
    progress(f"wrote circuit-tracer transcoder set to {config.parent}")
    return out


TABLE_START, TABLE_END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"


def update_readme_table(progress: Progress) -> None:
    """Rewrite the quality table in dictionaries/README.md from catalog.json."""
    root = repo_dict_root()
    readme, catalog = root / "README.md", root / "catalog.json"
    if not readme.is_file() or not catalog.is_file():
        return
    rows = [
        "| dictionary | train tokens | L0 | FVU | dead | CE loss +nats | eval tokens (CE) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in json.loads(catalog.read_text())["dictionaries"]:
        cfg = json.loads((root / e["path"] / "cfg.json").read_text())
        m = e["metrics"]
        rows.append(
            f"| `{e['id']}` | {cfg['metadata']['training_tokens']:,} | {m['l0']:.1f} | "
            f"{m['fvu']:.3f} | {m['dead_fraction']:.3f} | {m['ce_loss_delta']:.3f} | "
            f"{m['n_eval_tokens']:,} ({m['n_ce_tokens']:,}) |"
        )
    text = readme.read_text()
    if TABLE_START not in text:
        return
    head, rest = text.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    readme.write_text(head + TABLE_START + "\n" + "\n".join(rows) + "\n" + TABLE_END + tail)
    progress("updated the quality table in dictionaries/README.md")
