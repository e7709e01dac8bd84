"""Bootstrap: config → engine → servicer → grpc.aio server with health, reflection and the
error interceptor. ``start_server`` is what tests reuse (port 0); ``serve`` adds signal
handling: on SIGTERM health goes NOT_SERVING, in-flight RPCs drain, the process exits 0.

The gRPC port opens before the model is loaded: health says NOT_SERVING and RPCs answer
UNAVAILABLE until the engine is ready, so orchestrators can probe a loading replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer_server import convert
from featuresteer_server.config import Config
from featuresteer_server.engines.base import Engine
from featuresteer_server.interceptors import ErrorInterceptor
from featuresteer_server.metrics import Metrics, start_exporter
from featuresteer_server.servicer import AppState, FeatureSteerServicer, add_to_server

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureSteer"].full_name


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    state: AppState
    health: Any
    metrics: Metrics
    metrics_port: int | None = None
    _metrics_http: Any = None
    _load_task: asyncio.Task[None] | None = field(default=None, repr=False)
    _stats_task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the engine to load; re-raise its load error."""
        if self._load_task is not None:
            await asyncio.wait_for(asyncio.shield(self._load_task), timeout)
        if self.state.load_error is not None:
            raise self.state.load_error

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new work, finish in-flight RPCs, free the engine."""
        self.state.draining = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.state.config.grace_seconds if grace is None else grace)
        # detached or still-queued attributions outlive their RPCs: stop them, so the engine's
        # shutdown does not wait for whole graphs
        self.state.jobs.cancel_all()
        for task in (self._load_task, self._stats_task):
            if task is not None and not task.done():
                task.cancel()
        if self.state.engine is not None:
            await self.state.engine.shutdown()
        await self.state.cache.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        self.metrics.ready.set(0)


async def _poll_stats(srv: RunningServer, every: float = 10.0) -> None:
    """Copy engine counters (vLLM worker statistics) into the metrics every few seconds."""
    engine = srv.state.engine
    while engine is not None:
        try:
            srv.metrics.engine_stats(engine.name, await engine.stats())  # type: ignore[attr-defined]
        except Exception:  # a metrics hiccup must never take the server down
            log.debug("engine stats unavailable", exc_info=True)
        await asyncio.sleep(every)


async def _set_serving(srv: RunningServer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", SERVICE_NAME):
        await srv.health.set(name, status)
    srv.metrics.ready.set(1 if serving else 0)


async def start_server(
    config: Config,
    *,
    engine: Engine | None = None,
    engine_factory: Callable[[Config], Engine] | None = None,
    metrics: Metrics | None = None,
) -> RunningServer:
    """Start serving on ``config.host:config.port`` (0: a free port) and load the engine.

    Pass ``engine`` to serve an already-built engine (tests), or ``engine_factory`` to build
    one in a worker thread after the port is open (default: the hooked engine from config).
    """
    if metrics is None:
        from prometheus_client import CollectorRegistry

        metrics = Metrics(CollectorRegistry())
    state = AppState(config, metrics)
    # each method refuses requests beyond its own byte limit before parsing (interceptors.py);
    # gRPC's receive limit is the largest of them, so nothing bigger is even buffered
    request_limits = convert.request_byte_limits(state.limits)
    max_receive = min(config.max_message_bytes, max(request_limits.values()))
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(metrics, request_limits, default_limit=max_receive)],
        options=[
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", max_receive),
        ],
    )
    add_to_server(FeatureSteerServicer(state), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    await server.start()
    srv = RunningServer(
        server=server, port=port, state=state, health=health_servicer, metrics=metrics
    )
    if config.metrics_enabled:
        srv._metrics_http, srv.metrics_port = start_exporter(
            metrics, config.metrics_host, config.metrics_port
        )
    await _set_serving(srv, False)
    log.info("gRPC listening on %s:%d", config.host, port)

    if engine is not None:
        state.engine = engine
        await _set_serving(srv, True)
        return srv

    async def load() -> None:
        try:
            if engine_factory is not None:
                state.engine = await asyncio.to_thread(engine_factory, config)
            else:
                from featuresteer_server.engines.loading import load_engines

                state.engine = await load_engines(config)
        except Exception as exc:  # reported through health and UNAVAILABLE
            log.exception("engine failed to load")
            state.load_error = exc
            return
        if not state.draining:
            await _set_serving(srv, True)
            if hasattr(state.engine, "stats"):
                srv._stats_task = asyncio.create_task(_poll_stats(srv))
            log.info("engine ready: %s", ", ".join(state.engine.info().engines))

    srv._load_task = asyncio.create_task(load())
    return srv


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT, then drain and return the exit code (0)."""
    srv = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if srv.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, srv.metrics_port)
    await stop.wait()
    log.info("draining (grace %.1fs)", config.grace_seconds)
    await srv.stop()
    log.info("stopped")
    return 0
