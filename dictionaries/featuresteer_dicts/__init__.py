"""Offline tooling that builds the default model's dictionaries (SAEs, transcoders), their
quality figures, feature metadata and catalog.

Owns everything under ``dictionaries/``, and the quick-fit stand-in SAE the server fits at
set-up (``quickfit``). An installed package (the server's distribution ships it: ``make
setup``). Dictionary math is the server's runtime (``featuresteer_server.dictionaries``):
the tooling loads, encodes and evaluates with its ``Dictionary`` and trains TopK with its
``topk_activation``; only training state (``train.SparseCoder``) is the tooling's own.
Modules: ``common`` (constants, paths), ``corpus``, ``activations``, ``train``, ``runs``,
``artifacts`` (cfgs, writing and loading shipped directories), ``evaluate``, ``metadata``,
``build`` (the pipeline steps), ``quickfit``, ``cli``.

Heavy imports (torch, transformers) stay inside functions of ``cli`` so ``--help`` is
instant. Intermediate data (corpus, activation caches, checkpoints) lives in the cache folder
(``~/.cache/featuresteer``), never in the repository.
"""

__all__ = ["__version__"]
__version__ = "1.0.0"
