"""Attribution jobs: bounded concurrency, a bounded queue, progress, cancellation, and
finished results kept for a configured time (GetAttribution). Torch-free: the engine does the
work; this module only schedules it and remembers the outcome.

Cancellation (``JobStore.cancel``): a queued job is finished as CANCELLED at once, so its
queue slot is free for the next submission; a running job's ``cancel`` event is set and the
engine stops at its next check (between backward batches). ``cancel_all`` does this for every
job (server stop). A failed job keeps its exception for the Attribute stream and a message
for GetAttribution that is safe to show: a domain error's own message, else a generic
"internal error (request id …)" whose id is in the log with the traceback.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from featuresteer_server.errors import Cancelled, ErrorKind, NotFound, ResourceExhausted, kind_of

log = logging.getLogger(__name__)


class JobState(StrEnum):
    """Where an attribution job is (converted to the API's JobState only in convert.py)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


QUEUED, RUNNING, DONE, FAILED, CANCELLED = JobState  # the members, by their short names
ProgressFn = Callable[[str, float], None]


@dataclass
class Job:
    id: str
    state: JobState = QUEUED
    stage: str = "queued"
    fraction: float = 0.0
    result: Any = None
    error: BaseException | None = None
    error_message: str = ""  # what GetAttribution shows (see ``public_error``)
    cancel: threading.Event = field(default_factory=threading.Event)
    finished_at: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)

    def _touch(self) -> None:
        self.changed.set()


@dataclass(frozen=True)
class JobUpdate:
    """One step of a followed job: its id alone (first), progress (``stage``), or the
    finished ``result`` (last)."""

    job_id: str
    stage: str | None = None
    fraction: float = 0.0
    result: Any = None


def public_error(exc: BaseException, job_id: str) -> str:
    """The message a client may see for a failed job: a domain error's own message (it has a
    status code of its own), else a generic one whose request id is logged with the
    traceback (raw exception text can leak paths, tensors or internals)."""
    if kind_of(exc) is not ErrorKind.INTERNAL:
        return str(exc)
    request_id = uuid.uuid4().hex[:12]
    log.error(
        "attribution job %s failed (request id %s)",
        job_id,
        request_id,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return f"internal error (request id {request_id})"


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
                job.error_message = public_error(exc, job.id)
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

    def cancel(self, job: Job) -> None:
        """Stop ``job``: a queued one is CANCELLED now (its slot is free for the next
        submission), a running one stops at the engine's next cancel check."""
        job.cancel.set()
        if job.state == QUEUED and job.task is not None and not job.task.done():
            job.state, job.stage = CANCELLED, "cancelled"
            job.finished_at = time.monotonic()
            job._touch()
            job.task.cancel()  # leaves the semaphore's queue without ever acquiring it

    async def follow(self, job: Job, *, detach: bool = False) -> AsyncIterator[JobUpdate]:
        """The job's id, every progress change, then its result; raises the job's error, or
        CANCELLED. A follower that stops early (the client went away) cancels the job unless
        ``detach`` (then GetAttribution can still fetch it)."""
        finished = False
        try:
            yield JobUpdate(job.id)
            last: tuple[str, float] | None = None
            while not job.done:
                job.changed.clear()
                if (job.stage, job.fraction) != last:
                    last = (job.stage, job.fraction)
                    yield JobUpdate(job.id, stage=job.stage, fraction=job.fraction)
                if not job.done:
                    await job.changed.wait()
            finished = True
            if job.error is not None:
                raise job.error
            if job.state == CANCELLED:
                raise Cancelled(f"attribution job {job.id} was cancelled")
            yield JobUpdate(job.id, result=job.result)
        finally:
            if not finished and not detach:  # the follower went away: free the work
                self.cancel(job)

    def cancel_all(self) -> None:
        """Cancel every unfinished job (server stop)."""
        for job in list(self._jobs.values()):
            if not job.done:
                self.cancel(job)
