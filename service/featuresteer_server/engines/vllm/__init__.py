"""The vLLM generation engine (``pip install .[vllm]``): ``engine.VllmEngine`` in the server
process, ``worker.SteeringWorkerExtension`` inside vLLM's worker, ``wire`` between them.
Imports nothing heavy: vLLM is imported only when an engine is created."""

from __future__ import annotations

import importlib.util


def available() -> bool:
    """True when vLLM is installed (the server then serves Generate on it by default)."""
    return importlib.util.find_spec("vllm") is not None
