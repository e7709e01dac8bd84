"""Sync and async clients. Methods take plain Python values and return protobuf messages."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import grpc

from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer.v1 import featuresteer_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
SERVICE = "featuresteer.v1.FeatureSteer"
_UNARY = (
    "GetInfo",
    "ListDictionaries",
    "Tokenize",
    "DecodeFeatures",
    "GetAttribution",
    "GetFeature",
    "SearchFeatures",
)


class FeatureSteerError(Exception):
    """An RPC failed: ``code`` is the grpc.StatusCode, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> FeatureSteerError:
        return cls(err.code(), err.details() or "")  # type: ignore[attr-defined]


def _options(retries: int, max_message_bytes: int) -> list[tuple[str, Any]]:
    config = {
        "methodConfig": [
            {
                "name": [{"service": SERVICE, "method": m} for m in _UNARY],
                "retryPolicy": {
                    "maxAttempts": max(2, retries + 1),
                    "initialBackoff": "0.2s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
    return [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1 if retries > 0 else 0),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def _inputs(inputs: Iterable[str | Sequence[int]]) -> list[pb.DecodeInput]:
    out = []
    for item in inputs:
        if isinstance(item, str):
            out.append(pb.DecodeInput(text=item))
        else:
            out.append(pb.DecodeInput(token_ids=list(item)))
    return out


def _feature_refs(features: Iterable[tuple[str, int] | pb.FeatureRef]) -> list[pb.FeatureRef]:
    return [
        f if isinstance(f, pb.FeatureRef) else pb.FeatureRef(dictionary_id=f[0], index=f[1])
        for f in features
    ]


class _Requests:
    """Request builders shared by both clients."""

    @staticmethod
    def tokenize(text: str, prepend_bos: bool = True) -> pb.TokenizeRequest:
        return pb.TokenizeRequest(text=text, prepend_bos=prepend_bos)

    @staticmethod
    def decode_features(
        inputs: Iterable[str | Sequence[int]],
        dictionary_ids: Sequence[str] = (),
        top_k: int = 10,
        features: Iterable[tuple[str, int] | pb.FeatureRef] = (),
        include_error: bool = False,
        prepend_bos: bool = True,
    ) -> pb.DecodeFeaturesRequest:
        return pb.DecodeFeaturesRequest(
            inputs=_inputs(inputs),
            dictionary_ids=list(dictionary_ids),
            top_k=top_k,
            features=_feature_refs(features),
            include_error=include_error,
            prepend_bos=prepend_bos,
        )


class Client:
    """Blocking client. ``timeout`` is the default deadline in seconds for unary calls."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        max_message_bytes: int = 64 * 1024 * 1024,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.channel = channel or grpc.insecure_channel(
            target, options=_options(retries, max_message_bytes)
        )
        self.stub = pb_grpc.FeatureSteerStub(self.channel)
        self.timeout = timeout

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise FeatureSteerError.from_rpc_error(err) from None

    def _stream(self, method: str, request: Any, timeout: float | None) -> Iterator[Any]:
        try:
            yield from getattr(self.stub, method)(request, timeout=timeout)
        except grpc.RpcError as err:
            raise FeatureSteerError.from_rpc_error(err) from None

    def get_info(self, *, timeout: float | None = None) -> pb.GetInfoResponse:
        return self._call("GetInfo", pb.GetInfoRequest(), timeout)

    def list_dictionaries(self, *, timeout: float | None = None) -> pb.ListDictionariesResponse:
        return self._call("ListDictionaries", pb.ListDictionariesRequest(), timeout)

    def tokenize(
        self, text: str, prepend_bos: bool = True, *, timeout: float | None = None
    ) -> pb.TokenizeResponse:
        return self._call("Tokenize", _Requests.tokenize(text, prepend_bos), timeout)

    def decode_features(
        self, inputs: Iterable[str | Sequence[int]], *, timeout: float | None = None, **kwargs: Any
    ) -> pb.DecodeFeaturesResponse:
        """``inputs``: texts or token-id lists. Keyword args: dictionary_ids, top_k, features
        ((dictionary_id, index) pairs), include_error, prepend_bos."""
        return self._call("DecodeFeatures", _Requests.decode_features(inputs, **kwargs), timeout)

    def generate(
        self, request: pb.GenerateRequest, *, timeout: float | None = None
    ) -> Iterator[pb.GenerateResponse]:
        return self._stream("Generate", request, timeout)

    def attribute(
        self, request: pb.AttributeRequest, *, timeout: float | None = None
    ) -> Iterator[pb.AttributeResponse]:
        return self._stream("Attribute", request, timeout)

    def get_attribution(
        self, job_id: str, *, timeout: float | None = None
    ) -> pb.GetAttributionResponse:
        return self._call("GetAttribution", pb.GetAttributionRequest(job_id=job_id), timeout)

    def get_feature(
        self, dictionary_id: str, index: int, *, timeout: float | None = None
    ) -> pb.GetFeatureResponse:
        ref = pb.FeatureRef(dictionary_id=dictionary_id, index=index)
        return self._call("GetFeature", pb.GetFeatureRequest(feature=ref), timeout)

    def search_features(
        self, request: pb.SearchFeaturesRequest, *, timeout: float | None = None
    ) -> pb.SearchFeaturesResponse:
        return self._call("SearchFeatures", request, timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same method names as ``Client``."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.channel = grpc.aio.insecure_channel(
            target, options=_options(retries, max_message_bytes)
        )
        self.stub = pb_grpc.FeatureSteerStub(self.channel)
        self.timeout = timeout

    async def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        try:
            return await getattr(self.stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise FeatureSteerError.from_rpc_error(err) from None

    async def _stream(self, method: str, request: Any, timeout: float | None) -> AsyncIterator[Any]:
        try:
            async for item in getattr(self.stub, method)(request, timeout=timeout):
                yield item
        except grpc.RpcError as err:
            raise FeatureSteerError.from_rpc_error(err) from None

    async def get_info(self, *, timeout: float | None = None) -> pb.GetInfoResponse:
        return await self._call("GetInfo", pb.GetInfoRequest(), timeout)

    async def list_dictionaries(
        self, *, timeout: float | None = None
    ) -> pb.ListDictionariesResponse:
        return await self._call("ListDictionaries", pb.ListDictionariesRequest(), timeout)

    async def tokenize(
        self, text: str, prepend_bos: bool = True, *, timeout: float | None = None
    ) -> pb.TokenizeResponse:
        return await self._call("Tokenize", _Requests.tokenize(text, prepend_bos), timeout)

    async def decode_features(
        self, inputs: Iterable[str | Sequence[int]], *, timeout: float | None = None, **kwargs: Any
    ) -> pb.DecodeFeaturesResponse:
        return await self._call(
            "DecodeFeatures", _Requests.decode_features(inputs, **kwargs), timeout
        )

    def generate(
        self, request: pb.GenerateRequest, *, timeout: float | None = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        return self._stream("Generate", request, timeout)

    def attribute(
        self, request: pb.AttributeRequest, *, timeout: float | None = None
    ) -> AsyncIterator[pb.AttributeResponse]:
        return self._stream("Attribute", request, timeout)

    async def get_attribution(
        self, job_id: str, *, timeout: float | None = None
    ) -> pb.GetAttributionResponse:
        return await self._call("GetAttribution", pb.GetAttributionRequest(job_id=job_id), timeout)

    async def get_feature(
        self, dictionary_id: str, index: int, *, timeout: float | None = None
    ) -> pb.GetFeatureResponse:
        ref = pb.FeatureRef(dictionary_id=dictionary_id, index=index)
        return await self._call("GetFeature", pb.GetFeatureRequest(feature=ref), timeout)

    async def search_features(
        self, request: pb.SearchFeaturesRequest, *, timeout: float | None = None
    ) -> pb.SearchFeaturesResponse:
        return await self._call("SearchFeatures", request, timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
