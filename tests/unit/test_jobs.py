"""Attribution job scheduling (``jobs.JobStore``): the queue bound, cancelling queued and
running jobs, cancel_all, and the error text GetAttribution may show."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest

from featuresteer_server import jobs
from featuresteer_server.errors import InvalidArgument, ResourceExhausted

pytestmark = pytest.mark.unit


class Work:
    """A job body that runs until released (or until its cancel event is set)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.ran = False

    async def __call__(self, progress: Any, cancel: threading.Event) -> str:
        self.ran = True
        self.started.set()
        while not self.release.is_set():
            if cancel.is_set():
                raise RuntimeError("stopped by cancel")
            await asyncio.sleep(0.005)
        return "result"


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_cancelling_a_queued_job_frees_its_slot_at_once() -> None:
    store = jobs.JobStore(max_running=1, max_queued=1, ttl_seconds=60)
    first, second, third = Work(), Work(), Work()
    running = store.submit(first)
    await first.started.wait()
    queued = store.submit(second)
    await settle()
    assert (running.state, queued.state) == (jobs.RUNNING, jobs.QUEUED)
    with pytest.raises(ResourceExhausted):
        store.submit(third)

    store.cancel(queued)
    # no await in between: the slot is free now, not when the job reaches the front
    assert queued.state == jobs.CANCELLED and queued.done and queued.changed.is_set()
    replacement = store.submit(third)
    assert replacement.state == jobs.QUEUED

    first.release.set()
    third.release.set()
    await asyncio.wait_for(asyncio.gather(running.task, replacement.task), 5)  # type: ignore[arg-type]
    assert running.state == replacement.state == jobs.DONE
    assert queued.state == jobs.CANCELLED and not second.ran  # never started


async def test_cancel_all_stops_running_and_queued_jobs() -> None:
    store = jobs.JobStore(max_running=1, max_queued=2, ttl_seconds=60)
    works = [Work() for _ in range(3)]
    started = [store.submit(w) for w in works]
    await works[0].started.wait()
    store.cancel_all()
    assert [j.state for j in started[1:]] == [jobs.CANCELLED] * 2
    assert all(j.cancel.is_set() for j in started)
    await asyncio.wait_for(started[0].task, 5)  # type: ignore[arg-type]
    assert started[0].state == jobs.CANCELLED  # the running one noticed its event
    assert not works[1].ran and not works[2].ran
    store.submit(Work()).cancel.set()  # the store still accepts work afterwards


async def test_failed_job_shows_only_domain_messages(caplog: pytest.LogCaptureFixture) -> None:
    store = jobs.JobStore(max_running=1, max_queued=1, ttl_seconds=60)

    async def internal(progress: Any, cancel: threading.Event) -> None:
        raise RuntimeError("boom at /srv/secret/weights.safetensors")

    async def domain(progress: Any, cancel: threading.Event) -> None:
        raise InvalidArgument("prompt", "too long")

    with caplog.at_level(logging.ERROR, logger="featuresteer_server.jobs"):
        bad = store.submit(internal)
        await asyncio.wait_for(bad.task, 5)  # type: ignore[arg-type]
    assert bad.state == jobs.FAILED and isinstance(bad.error, RuntimeError)
    assert bad.error_message.startswith("internal error (request id ")
    assert "secret" not in bad.error_message and "RuntimeError" not in bad.error_message
    request_id = bad.error_message.removeprefix("internal error (request id ").rstrip(")")
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback is in the log

    ok = store.submit(domain)
    await asyncio.wait_for(ok.task, 5)  # type: ignore[arg-type]
    assert ok.state == jobs.FAILED and ok.error_message == "prompt: too long"
