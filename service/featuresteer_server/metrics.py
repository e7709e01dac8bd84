"""The one module that imports prometheus_client. Engines and interceptors report plain
numbers through the functions here; labels are bounded (method, code, dictionary, engine)."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)


class Metrics:
    """All series of one server. Tests make their own registry."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.requests = Counter(
            "featuresteer_requests_total",
            "RPCs finished, by method and status code",
            ["method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "featuresteer_request_duration_seconds",
            "RPC wall time",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "featuresteer_requests_in_flight", "RPCs being served", ["method"], registry=registry
        )
        self.tokens = Counter(
            "featuresteer_tokens_total",
            "Tokens processed, by method and engine",
            ["method", "engine"],
            registry=registry,
        )
        self.cache = Counter(
            "featuresteer_cache_events_total",
            "Feature-catalog cache events",
            ["layer", "event"],
            registry=registry,
        )
        self.ready = Gauge(
            "featuresteer_ready", "1 when the model is loaded and serving", registry=registry
        )
        self.engine_stat = Gauge(
            "featuresteer_engine_stat",
            "Engine counters (e.g. vLLM steps whose batch mixed >= 2 steering specs)",
            ["engine", "name"],
            registry=registry,
        )

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def count_tokens(self, method: str, engine: str, n: int) -> None:
        self.tokens.labels(method, engine).inc(n)

    def engine_stats(self, engine: str, stats: dict[str, float]) -> None:
        for name, value in stats.items():
            if isinstance(value, int | float):
                self.engine_stat.labels(engine, name).set(value)

    def cache_event(self, layer: str, event: str) -> None:
        self.cache.labels(layer, event).inc()


def start_exporter(metrics: Metrics, host: str, port: int) -> tuple[Any, int]:
    """Serve /metrics over HTTP; returns (server, bound port)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server, int(server.server_address[1])
