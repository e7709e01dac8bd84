"""``featuresteer-server``: flags → config → serve. Every flag is also a FEATURESTEER_* env var."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, help="Serve featuresteer over gRPC.")


@app.command()
def run(
    host: Annotated[str | None, typer.Option(help="gRPC bind address [127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port [50051]")] = None,
    metrics_host: Annotated[str | None, typer.Option(help="metrics bind address")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="metrics port [9400]")] = None,
    config: Annotated[Path | None, typer.Option(help="config file (TOML/JSON/YAML)")] = None,
    model: Annotated[str | None, typer.Option(help="local HF model directory")] = None,
    catalog: Annotated[Path | None, typer.Option(help="dictionary catalog file")] = None,
    dictionary: Annotated[
        list[Path] | None, typer.Option(help="extra SAELens-format directory (repeatable)")
    ] = None,
    torch_threads: Annotated[int | None, typer.Option(help="torch intra-op threads")] = None,
    generation_engine: Annotated[
        str | None, typer.Option(help="auto (vLLM if installed), vllm or hooked")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="logging level")] = None,
    prepare_only: Annotated[
        bool, typer.Option(help="prepare (convert) the model and exit")
    ] = False,
) -> None:
    """Start the server (or only prepare the default model)."""
    from featuresteer_server.config import load_config

    cfg = load_config(
        config,
        host=host,
        port=port,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        model=model,
        catalog=catalog,
        dictionaries=tuple(dictionary) if dictionary else None,
        torch_threads=torch_threads,
        generation_engine=generation_engine,
        log_level=log_level,
    )
    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if prepare_only:
        from rich.console import Console

        from featuresteer_server.models import resolve_model

        console = Console(stderr=True)
        with console.status("preparing the model") as status:
            path = resolve_model(cfg.model, lambda msg: status.update(msg))
        console.print(f"model ready at {path}")
        from featuresteer_server.engines.loading import needs_quickfit

        if needs_quickfit(cfg):
            from featuresteer_dicts.quickfit import ensure_quickfit

            with console.status("fitting the stand-in SAE") as status:
                qf = ensure_quickfit(lambda msg: status.update(msg))
            console.print(f"quick-fit stand-in SAE ready at {qf}")
        return
    from featuresteer_server.server import serve

    raise typer.Exit(asyncio.run(serve(cfg)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
