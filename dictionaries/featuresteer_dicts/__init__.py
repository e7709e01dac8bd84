"""Offline tooling that builds the default model's dictionaries (SAEs, transcoders), their
quality figures, feature metadata and catalog.

Owns everything under ``dictionaries/``. Heavy imports (torch, transformers) stay inside
functions so ``--help`` is instant. Intermediate data (corpus, activation caches, checkpoints)
lives in the cache folder (``~/.cache/featuresteer``), never in the repository.
"""

__all__ = ["__version__"]
__version__ = "1.0.0"
