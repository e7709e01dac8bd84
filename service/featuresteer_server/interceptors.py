"""The one error-mapping interceptor (plus RPC metrics and request-size guards, which need
the same wrapping).

Domain errors become their status code with their message (at most 1024 characters);
anything else becomes INTERNAL with a request id that is also in the log. Aborts raised by
handlers pass through.

Requests are guarded before protobuf parsing: each handler's ``request_deserializer`` is
wrapped so that a request larger than its method's byte limit (``request_limits``,
convert.request_byte_limits) becomes RESOURCE_EXHAUSTED — the code gRPC itself uses for its
global receive limit — and bytes that do not parse become INVALID_ARGUMENT. gRPC's aio server
calls the deserializer outside any handler (cygrpc ``_handle_unary_unary_rpc``): an exception
there is logged with a traceback and answered UNKNOWN. So the guarded deserializer never
raises: it returns a ``_Refused`` marker, which the wrapped handler turns into its status
before the servicer runs. Unary-request handlers of other services (health) get the same
parse guard, without metrics.
"""

from __future__ import annotations

import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from featuresteer_server.errors import ErrorKind, bounded_message, kind_of
from featuresteer_server.metrics import Metrics

log = logging.getLogger(__name__)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The one mapping from what went wrong (``errors.kind_of``) to a gRPC status code."""
    return STATUS[kind_of(exc)]


STATUS: dict[ErrorKind, grpc.StatusCode] = {k: grpc.StatusCode[k.name] for k in ErrorKind}


def _code_of(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


@dataclass(frozen=True)
class _Refused:
    """What a guarded deserializer returns instead of raising: the status to answer."""

    code: grpc.StatusCode
    message: str


def guarded_deserializer(
    parse: Callable[[bytes], Any] | None, limit: int, method: str
) -> Callable[[bytes], Any]:
    """``parse`` behind a byte limit, returning ``_Refused`` instead of raising."""

    def deserialize(raw: bytes) -> Any:
        if len(raw) > limit:
            return _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request of {len(raw)} bytes > the {limit}-byte limit of {method}",
            )
        if parse is None:
            return raw
        try:
            return parse(raw)
        except Exception:  # noqa: BLE001 - DecodeError, or anything a parser raises on garbage
            return _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request bytes are not a valid {method} request message",
            )

    return deserialize


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Args:
    metrics: RPC counters and latencies (FeatureSteer methods only).
    request_limits: FeatureSteer method name -> largest request in bytes.
    default_limit: the limit of every other unary-request method (health), and of a
        FeatureSteer method missing from ``request_limits``.
    """

    def __init__(
        self,
        metrics: Metrics | None = None,
        request_limits: Mapping[str, int] | None = None,
        default_limit: int = 64 * 1024 * 1024,
    ) -> None:
        self.metrics = metrics
        self.request_limits = dict(request_limits or {})
        self.default_limit = default_limit

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        ours = details.method.startswith("/featuresteer.")
        if handler is None or handler.request_streaming or not (ours or _is_async(handler)):
            return handler  # reflection (streaming) parses its own messages
        method = details.method.rsplit("/", 1)[-1]
        limit = self.request_limits.get(method, self.default_limit) if ours else self.default_limit
        deserializer = guarded_deserializer(handler.request_deserializer, limit, method)
        if handler.unary_unary is not None:
            unary = self._unary(method, handler.unary_unary) if ours else _refusing(handler)
            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream = self._stream(method, handler.unary_stream) if ours else _refusing(handler)
            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _record(self, method: str, code: grpc.StatusCode, start: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_rpc(method, code.name, time.perf_counter() - start)

    async def _abort(
        self, context: grpc.aio.ServicerContext, exc: BaseException, method: str
    ) -> tuple[grpc.StatusCode, str]:
        code = status_for(exc)
        if code != grpc.StatusCode.INTERNAL:
            message = bounded_message(str(exc))  # the last guard against echoed input
        else:
            request_id = uuid.uuid4().hex[:12]
            log.exception("internal error in %s (request id %s)", method, request_id)
            message = f"internal error (request id {request_id})"
        return code, message

    def _unary(self, method: str, behavior: Any) -> Any:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            if isinstance(request, _Refused):
                self._record(method, request.code, start)
                await context.abort(request.code, request.message)
            try:
                response = await behavior(request, context)
            except grpc.aio.AbortError:
                self._record(method, _code_of(context), start)
                raise
            except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
                code, message = await self._abort(context, exc, method)
                self._record(method, code, start)
                await context.abort(code, message)
            self._record(method, grpc.StatusCode.OK, start)
            return response

        return wrapper

    def _stream(self, method: str, behavior: Any) -> Any:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            if isinstance(request, _Refused):
                self._record(method, request.code, start)
                await context.abort(request.code, request.message)
            try:
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                self._record(method, _code_of(context), start)
                raise
            except Exception as exc:  # noqa: BLE001
                code, message = await self._abort(context, exc, method)
                self._record(method, code, start)
                await context.abort(code, message)
            self._record(method, grpc.StatusCode.OK, start)

        return wrapper


def _is_async(handler: grpc.RpcMethodHandler) -> bool:
    behavior = handler.unary_unary or handler.unary_stream
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


def _refusing(handler: grpc.RpcMethodHandler) -> Any:
    """Another service's async unary or server-streaming behaviour (a coroutine, or an async
    generator) behind the ``_Refused`` check."""
    behavior = handler.unary_unary or handler.unary_stream
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Refused):
                await context.abort(request.code, request.message)
            async for item in behavior(request, context):
                yield item

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Refused):
            await context.abort(request.code, request.message)
        return await behavior(request, context)

    return unary
