"""Shared harness pieces: machine description, load average, interleaved repeats, tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(
    cases: dict[str, Callable[[], Any]],
    repeats: int,
    inner: int = 1,
    progress: Callable[[str], None] = print,
) -> dict[str, list[float]]:
    """Run every case once per round, round after round, so drift on a shared machine hits
    all cases alike. Returns seconds per call for each case and round."""
    out: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(repeats):
        for name, fn in cases.items():
            out[name].append(timed(lambda fn=fn: [fn() for _ in range(inner)]) / inner)
        progress(f"round {r + 1}/{repeats} (load {loadavg()})")
    return out


def summary(xs: list[float]) -> tuple[float, float, float]:
    """median, min, max"""
    return statistics.median(xs), min(xs), max(xs)


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]
