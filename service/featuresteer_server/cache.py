"""The feature-catalog cache: Redis (``FEATURESTEER_REDIS_URL``) with an in-process LRU.

Owns: cache keys, the value envelope, the Redis client (redis-py asyncio), the LRU,
single-flight, and the hit/miss/invalid/error counts it reports through
``metrics.cache_event(layer, event)``.
Must not: know what it stores (payloads are opaque bytes: the servicer stores the serialised
protobuf response and passes its parser as ``validate``), pick status codes, or raise to
callers because Redis misbehaves or holds bad values.

Decisions (docs/cache.md has the long form):
    * Keys: ``<prefix>:<kind>:<dictionary fingerprint>:<parts…>``, prefix ``featuresteer:v2``.
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
    * Values in Redis are untrusted: each is stored as an envelope (``wrap``: magic and format
      version, the key echoed, a BLAKE2b-128 digest over both and the payload). A value that
      fails ``unwrap`` (garbage, truncated, an old format, or copied from another key) or the
      caller's ``validate`` is counted (``event="invalid"``), deleted and recomputed; callers
      never see it. The LRU holds bare payloads: it is in-process and trusted.
    * Single-flight: one computation per cold key per process, run as a task the cache owns
      (not inside the first caller), which every caller for that key awaits through
      ``asyncio.shield``. A caller that is cancelled (client cancel, deadline) stops waiting
      without disturbing the others; the computation is cancelled only when no caller is left
      waiting, so a cancelled first caller never hands the rest a cancelled future, and
      abandoned work is not kept alive. An error reaches every waiter; nothing is cached for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from featuresteer_server.metrics import Metrics

log = logging.getLogger(__name__)

LAYER_REDIS = "redis"
LAYER_LRU = "lru"

# Value format 2 (format 1, under ``featuresteer:v1``, was the bare payload):
#   b"fsc2" | key length (u16, big-endian) | key (UTF-8) | BLAKE2b-128(all before | payload)
#   | payload
_MAGIC = b"fsc2"
_DIGEST_SIZE = 16
_MAX_KEY_BYTES = 0xFFFF


class BadValue(ValueError):
    """A value read from Redis that is not this key's envelope (the message says why)."""


def _digest(header: bytes, payload: bytes) -> bytes:
    h = hashlib.blake2b(header, digest_size=_DIGEST_SIZE)
    h.update(payload)
    return h.digest()


def wrap(key: str, payload: bytes) -> bytes:
    """The envelope stored in Redis for ``payload`` under ``key`` (~20 bytes + the key)."""
    raw_key = key.encode()
    if len(raw_key) > _MAX_KEY_BYTES:
        raise ValueError(f"cache key of {len(raw_key)} bytes is too long")
    header = _MAGIC + len(raw_key).to_bytes(2, "big") + raw_key
    return header + _digest(header, payload) + payload


def unwrap(key: str, value: bytes) -> bytes:
    """The payload of an envelope made by ``wrap(key, …)``; ``BadValue`` for anything else."""
    if not value.startswith(_MAGIC):
        raise BadValue("not a format-2 envelope")
    start = len(_MAGIC) + 2
    if len(value) < start:
        raise BadValue("truncated header")
    n = int.from_bytes(value[len(_MAGIC) : start], "big")
    end = start + n
    if len(value) < end + _DIGEST_SIZE:
        raise BadValue("truncated header")
    echoed = value[start:end]
    if echoed != key.encode():
        shown = echoed[:120].decode(errors="replace")
        raise BadValue(f"stored for another key ({shown!r})")
    payload = value[end + _DIGEST_SIZE :]
    if not hmac.compare_digest(value[end : end + _DIGEST_SIZE], _digest(value[:end], payload)):
        raise BadValue("digest mismatch (corrupted or truncated)")
    return payload


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
        prefix: str = "featuresteer:v2",
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
        self._inflight: dict[str, _Flight] = {}
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
            await self.redis.set(key, wrap(key, value), ex=self.ttl)
        except Exception as exc:  # noqa: BLE001
            self._redis_failed("SET", exc)

    async def _redis_delete(self, key: str) -> None:
        try:
            await self.redis.delete(key)
        except Exception as exc:  # noqa: BLE001
            self._redis_failed("DEL", exc)

    # -- the one entry point
    async def get_or_compute(
        self,
        key: str,
        compute: Callable[[], Awaitable[bytes]],
        validate: Callable[[bytes], object] | None = None,
    ) -> bytes:
        """The cached bytes for ``key``, else ``await compute()`` (once per key at a time),
        stored in Redis (with the TTL) and the LRU.

        ``validate`` is called on every payload read from Redis (after the envelope check);
        if it raises, the value is treated as corrupt: deleted and recomputed.
        """
        for attempt in range(2):
            flight = self._inflight.get(key)
            if flight is None:
                flight = self._start(key, compute, validate)
            flight.waiters += 1
            try:
                return await asyncio.shield(flight.task)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if attempt == 0 and flight.task.cancelled() and task and not task.cancelling():
                    continue  # the computation cancelled itself, we were not: compute anew
                raise
            finally:
                flight.waiters -= 1
                if flight.waiters == 0 and not flight.task.done():
                    # nobody wants the answer any more: free the work, forget the flight
                    flight.task.cancel()
                    self._forget(key, flight)
        raise AssertionError("unreachable")  # pragma: no cover

    def _start(
        self,
        key: str,
        compute: Callable[[], Awaitable[bytes]],
        validate: Callable[[bytes], object] | None,
    ) -> _Flight:
        flight = _Flight(asyncio.create_task(self._lookup_or_compute(key, compute, validate)))
        self._inflight[key] = flight

        def done(task: asyncio.Task[bytes]) -> None:
            self._forget(key, flight)
            if not task.cancelled():
                task.exception()  # retrieved: no "never retrieved" warning without waiters

        flight.task.add_done_callback(done)
        return flight

    def _forget(self, key: str, flight: _Flight) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]

    async def _lookup_or_compute(
        self,
        key: str,
        compute: Callable[[], Awaitable[bytes]],
        validate: Callable[[bytes], object] | None,
    ) -> bytes:
        use_redis = self.redis_usable()
        if use_redis:
            try:
                value = await self._redis_get(key)
            except _RedisDown:
                use_redis = False
            else:
                if value is not None:
                    payload = await self._checked(key, value, validate)
                    if payload is not None:
                        self._count(LAYER_REDIS, "hit")
                        self.lru.put(key, payload)
                        return payload
                else:
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

    async def _checked(
        self, key: str, value: bytes, validate: Callable[[bytes], object] | None
    ) -> bytes | None:
        """The payload of a value read from Redis, or None after dropping a bad one."""
        try:
            payload = unwrap(key, value)
            if validate is not None:
                validate(payload)
        except Exception as exc:  # noqa: BLE001 - any bad value is dropped, never served
            self._count(LAYER_REDIS, "invalid")
            log.warning(
                "cache: dropping an invalid value under %s (%s: %s)",
                key,
                type(exc).__name__,
                str(exc)[:200],
            )
            await self._redis_delete(key)
            return None
        return payload

    async def close(self) -> None:
        if self.redis is not None:
            try:
                await self.redis.aclose()
            except Exception:  # noqa: BLE001 - closing a dead connection
                log.debug("cache: closing Redis failed", exc_info=True)


class _RedisDown(Exception):
    """Internal: this request's Redis call failed; fall back to the LRU."""


@dataclass
class _Flight:
    """One in-flight computation and how many callers are waiting for it."""

    task: asyncio.Task[bytes]
    waiters: int = 0
