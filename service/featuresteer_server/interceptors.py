"""The one error-mapping interceptor (plus RPC metrics, which need the same wrapping).

Domain errors become their status code with their message; anything else becomes INTERNAL
with a request id that is also in the log. Aborts raised by handlers pass through."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from featuresteer_server.errors import status_for
from featuresteer_server.metrics import Metrics

log = logging.getLogger(__name__)


def _code_of(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith("/featuresteer."):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
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
            message = str(exc)
        else:
            request_id = uuid.uuid4().hex[:12]
            log.exception("internal error in %s (request id %s)", method, request_id)
            message = f"internal error (request id {request_id})"
        return code, message

    def _unary(self, method: str, behavior: Any) -> Any:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
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
