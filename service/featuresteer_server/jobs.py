"""Attribution jobs: bounded concurrency, a bounded queue, progress, cancellation, and
finished results kept for a configured time (GetAttribution). Torch-free: the engine does the
work; this module only schedules it and remembers the outcome.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from featuresteer_server.errors import NotFound, ResourceExhausted

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ProgressFn = Callable[[str, float], None]


@dataclass
class Job:
    id: str
    state: str = QUEUED
    stage: str = "queued"
    fraction: float = 0.0
    result: Any = None
    error: BaseException | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    finished_at: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)

    def _touch(self) -> None:
        self.changed.set()


class JobStore:
    def __init__(self, max_running: int, max_queued: int, ttl_seconds: float) -> None:
        self._sem = asyncio.Semaphore(max_running)
        self._capacity = max_running + max_queued
        self._ttl = ttl_seconds
        self._jobs: dict[str, Job] = {}

    def _expire(self) -> None:
        now = time.monotonic()
        for jid in [
            j.id
            for j in self._jobs.values()
            if j.finished_at is not None and now - j.finished_at > self._ttl
        ]:
            del self._jobs[jid]

    def submit(self, work: Callable[[ProgressFn, threading.Event], Awaitable[Any]]) -> Job:
        """Queue ``work(progress, cancel)``; RESOURCE_EXHAUSTED when running + queued is full."""
        self._expire()
        pending = sum(not j.done for j in self._jobs.values())
        if pending >= self._capacity:
            raise ResourceExhausted(
                f"{pending} attributions running or queued (limit {self._capacity}); retry later"
            )
        job = Job(id=uuid.uuid4().hex)
        loop = asyncio.get_running_loop()

        def progress(stage: str, fraction: float) -> None:  # called from worker threads
            def apply() -> None:
                job.stage, job.fraction = stage, float(fraction)
                job._touch()

            loop.call_soon_threadsafe(apply)

        async def run() -> None:
            try:
                async with self._sem:
                    if job.cancel.is_set():
                        raise asyncio.CancelledError
                    job.state, job.stage = RUNNING, "running"
                    job._touch()
                    job.result = await work(progress, job.cancel)
                job.state, job.stage, job.fraction = DONE, "done", 1.0
            except asyncio.CancelledError:
                job.state = CANCELLED
            except Exception as exc:  # kept for the stream and GetAttribution
                job.state = CANCELLED if job.cancel.is_set() else FAILED
                job.error = exc
            finally:
                job.finished_at = time.monotonic()
                job._touch()

        self._jobs[job.id] = job
        job.task = asyncio.create_task(run())
        return job

    def get(self, job_id: str) -> Job:
        self._expire()
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"job_id: no attribution job {job_id!r} (unknown or expired)")
        return job

    def cancel_all(self) -> None:
        for job in self._jobs.values():
            job.cancel.set()
