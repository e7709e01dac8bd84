"""The feature-catalog cache: Redis (``FEATURESTEER_REDIS_URL``) with an in-process LRU.

Owns: cache keys, the Redis client (redis-py asyncio), the LRU, single-flight, and the
hit/miss/error counts it reports through ``metrics.cache_event(layer, event)``.
Must not: know what it stores (values are opaque bytes: the servicer stores the serialised
protobuf response), pick status codes, or raise to callers because Redis misbehaves.

Decisions (docs/cache.md has the long form):
    * Keys: ``<prefix>:<kind>:<dictionary fingerprint>:<parts…>``, prefix ``featuresteer:v1``.
      The fingerprint is the dictionary's content hash, so a retrained or replaced dictionary
      never reads another version's entries, even under the same id. Every key gets a TTL.
    * Layers: with Redis configured and healthy, Redis is the source of truth (shared by all
      replicas, one copy, evicted by Redis); every value read or computed is also written to
      the LRU, so that when Redis goes down recent entries keep answering. The LRU is not
      consulted first while Redis is up: replicas then never disagree for longer than the TTL.
      Without Redis, the LRU is the cache.
    * Failure: short socket timeouts and no redis-py retries; a Redis error is counted
      (``layer="redis", event="error"``), the request is served from the LRU (or computed), and
      Redis is skipped for ``retry_seconds``; the first request after that tries again, and the
      connection pool reconnects on its own. Clients never see a Redis error.
    * Single-flight: one computation per cold key per process; concurrent callers for the
      same key await the first caller's future (an error reaches all of them, nothing is
      cached for it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from featuresteer_server.metrics import Metrics

log = logging.getLogger(__name__)

LAYER_REDIS = "redis"
LAYER_LRU = "lru"


def cache_key(prefix: str, kind: str, fingerprint: str, *parts: object) -> str:
    """``<prefix>:<kind>:<fingerprint>:<part>:…``; parts must not be user strings of unbounded
    length (hash them first) and must not contain ``:`` ambiguity that matters to callers."""
    if not kind or not fingerprint:
        raise ValueError("a cache key needs a kind and a fingerprint")
    return ":".join([prefix, kind, fingerprint, *(str(p) for p in parts)])


class LRU:
    """A bounded mapping that forgets the least recently used entry (size 0: stores nothing)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: str, value: bytes) -> None:
        if self.size <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def clear(self) -> None:
        self._data.clear()


class FeatureCache:
    """Get-or-compute over Redis and the LRU; see the module docstring for the rules."""

    def __init__(
        self,
        redis_url: str | None,
        *,
        ttl_seconds: int = 3600,
        lru_size: int = 4096,
        prefix: str = "featuresteer:v1",
        socket_timeout: float = 0.25,
        retry_seconds: float = 2.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.ttl = int(ttl_seconds)
        self.prefix = prefix
        self.lru = LRU(lru_size)
        self.metrics = metrics
        self.retry_seconds = retry_seconds
        self.redis: Any = None
        self._down_until = 0.0
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        self.computations = 0  # cold computations run (tests and the benchmark read it)
        if redis_url:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # no client-side retries: the LRU answers instead, and we back off ourselves
            self.redis = Redis.from_url(
                redis_url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=Retry(NoBackoff(), 0),
                retry_on_error=[],
                health_check_interval=0,
            )

    # -- keys
    def key(self, kind: str, fingerprint: str, *parts: object) -> str:
        return cache_key(self.prefix, kind, fingerprint, *parts)

    # -- state
    @property
    def redis_configured(self) -> bool:
        return self.redis is not None

    def redis_usable(self) -> bool:
        return self.redis is not None and time.monotonic() >= self._down_until

    def _count(self, layer: str, event: str) -> None:
        if self.metrics is not None:
            self.metrics.cache_event(layer, event)

    def _redis_failed(self, what: str, exc: BaseException) -> None:
        self._count(LAYER_REDIS, "error")
        if time.monotonic() >= self._down_until:  # log once per outage window
            log.warning(
                "cache: Redis %s failed (%s: %s); serving from the local LRU, retry in %.1fs",
                what,
                type(exc).__name__,
                exc,
                self.retry_seconds,
            )
        self._down_until = time.monotonic() + self.retry_seconds

    async def _redis_get(self, key: str) -> bytes | None:
        try:
            value = await self.redis.get(key)
        except Exception as exc:  # noqa: BLE001 - any Redis failure degrades to the LRU
            self._redis_failed("GET", exc)
            raise _RedisDown from exc
        return bytes(value) if value is not None else None

    async def _redis_set(self, key: str, value: bytes) -> None:
        try:
            await self.redis.set(key, value, ex=self.ttl)
        except Exception as exc:  # noqa: BLE001
            self._redis_failed("SET", exc)

    # -- the one entry point
    async def get_or_compute(self, key: str, compute: Callable[[], Awaitable[bytes]]) -> bytes:
        """The cached bytes for ``key``, else ``await compute()`` (once per key at a time),
        stored in Redis (with the TTL) and the LRU."""
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            value = await self._lookup_or_compute(key, compute)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        else:
            fut.set_result(value)
            return value
        finally:
            self._inflight.pop(key, None)

    async def _lookup_or_compute(self, key: str, compute: Callable[[], Awaitable[bytes]]) -> bytes:
        use_redis = self.redis_usable()
        if use_redis:
            try:
                value = await self._redis_get(key)
            except _RedisDown:
                use_redis = False
            else:
                if value is not None:
                    self._count(LAYER_REDIS, "hit")
                    self.lru.put(key, value)
                    return value
                self._count(LAYER_REDIS, "miss")
        if not use_redis:  # no Redis configured, or it is down: the LRU answers
            value = self.lru.get(key)
            if value is not None:
                self._count(LAYER_LRU, "hit")
                return value
            self._count(LAYER_LRU, "miss")
        self.computations += 1
        value = await compute()
        self.lru.put(key, value)
        if use_redis:
            await self._redis_set(key, value)
        return value

    async def close(self) -> None:
        if self.redis is not None:
            try:
                await self.redis.aclose()
            except Exception:  # noqa: BLE001 - closing a dead connection
                log.debug("cache: closing Redis failed", exc_info=True)


class _RedisDown(Exception):
    """Internal: this request's Redis call failed; fall back to the LRU."""
