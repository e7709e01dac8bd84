"""featuresteer.v1.FeatureSteer: one short method per RPC — convert, call, convert back.
Imports no torch; errors are raised as domain exceptions and mapped by the interceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer.v1 import featuresteer_pb2_grpc as pb_grpc
from featuresteer_server import __version__, convert
from featuresteer_server.errors import Unavailable, Unimplemented

if TYPE_CHECKING:
    from featuresteer_server.config import Config
    from featuresteer_server.engines.base import Engine
    from featuresteer_server.metrics import Metrics


class AppState:
    """What the servicer needs: the engine once it is loaded, and whether we are draining."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.limits = config.limits()
        self.metrics = metrics
        self.engine: Engine | None = None
        self.load_error: BaseException | None = None
        self.draining = False

    def require_engine(self) -> Engine:
        if self.draining:
            raise Unavailable("the server is shutting down")
        if self.engine is None:
            if self.load_error is not None:
                raise Unavailable(f"the model failed to load: {self.load_error}")
            raise Unavailable("the model is still loading; retry shortly")
        return self.engine


class FeatureSteerServicer(pb_grpc.FeatureSteerServicer):
    def __init__(self, state: AppState) -> None:
        self.state = state

    async def GetInfo(self, request: pb.GetInfoRequest, context: Any) -> pb.GetInfoResponse:
        engine = self.state.require_engine()
        return convert.info_to_pb(engine.info(), self.state.limits, __version__)

    async def ListDictionaries(
        self, request: pb.ListDictionariesRequest, context: Any
    ) -> pb.ListDictionariesResponse:
        engine = self.state.require_engine()
        infos = engine.info().dictionaries
        return pb.ListDictionariesResponse(
            dictionaries=[convert.dictionary_info_to_pb(d) for d in infos]
        )

    async def Tokenize(self, request: pb.TokenizeRequest, context: Any) -> pb.TokenizeResponse:
        req = convert.tokenize_request_from_pb(request, self.state.limits)
        engine = self.state.require_engine()
        return convert.tokens_to_pb(engine.tokenize(req), self.state.limits)

    async def DecodeFeatures(
        self, request: pb.DecodeFeaturesRequest, context: Any
    ) -> pb.DecodeFeaturesResponse:
        req = convert.decode_request_from_pb(request, self.state.limits)
        result = await self.state.require_engine().decode(req)
        return convert.decode_result_to_pb(result)

    async def Generate(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateResponse]:
        req = convert.generate_request_from_pb(request, self.state.limits)
        async for chunk in self.state.require_engine().generate(req):
            yield convert.generate_chunk_to_pb(chunk)

    async def Attribute(
        self, request: pb.AttributeRequest, context: Any
    ) -> AsyncIterator[pb.AttributeResponse]:
        self.state.require_engine()
        raise Unimplemented(
            "Attribute is not served by this server version yet (issue: attribution)"
        )
        yield  # pragma: no cover

    async def GetAttribution(
        self, request: pb.GetAttributionRequest, context: Any
    ) -> pb.GetAttributionResponse:
        raise Unimplemented("GetAttribution is not served by this server version yet")

    async def GetFeature(
        self, request: pb.GetFeatureRequest, context: Any
    ) -> pb.GetFeatureResponse:
        raise Unimplemented("GetFeature is not served by this server version yet (issue: catalog)")

    async def SearchFeatures(
        self, request: pb.SearchFeaturesRequest, context: Any
    ) -> pb.SearchFeaturesResponse:
        raise Unimplemented("SearchFeatures is not served by this server version yet")


def add_to_server(servicer: FeatureSteerServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_FeatureSteerServicer_to_server(servicer, server)
