"""featuresteer.v1.FeatureSteer: one short method per RPC — convert, call, convert back.
Imports no torch; errors are raised as domain exceptions and mapped by the interceptor.
Orchestration (jobs, cache keys) lives in ``app.AppState`` and what it wraps; CPU-heavy
conversions (big answers, tokenization) run off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer.v1 import featuresteer_pb2_grpc as pb_grpc
from featuresteer_server import __version__, convert
from featuresteer_server.app import AppState

__all__ = ["AppState", "FeatureSteerServicer", "add_to_server"]


class FeatureSteerServicer(pb_grpc.FeatureSteerServicer):
    def __init__(self, state: AppState) -> None:
        self.state = state

    async def GetInfo(self, request: pb.GetInfoRequest, context: Any) -> pb.GetInfoResponse:
        info = self.state.require_engine().info()
        return convert.info_to_pb(info, self.state.limits, __version__)

    async def ListDictionaries(
        self, request: pb.ListDictionariesRequest, context: Any
    ) -> pb.ListDictionariesResponse:
        return convert.dictionaries_to_pb(self.state.require_engine().info().dictionaries)

    async def Tokenize(self, request: pb.TokenizeRequest, context: Any) -> pb.TokenizeResponse:
        req = convert.tokenize_request_from_pb(request, self.state.limits)
        engine, limits = self.state.require_engine(), self.state.limits
        # tokenizing and building the answer are CPU work: off the event loop
        return await asyncio.to_thread(lambda: convert.tokens_to_pb(engine.tokenize(req), limits))

    async def DecodeFeatures(
        self, request: pb.DecodeFeaturesRequest, context: Any
    ) -> pb.DecodeFeaturesResponse:
        req = convert.decode_request_from_pb(request, self.state.limits)
        result = await self.state.require_engine().decode(req)
        return await asyncio.to_thread(convert.decode_result_to_pb, result)  # can be MBs

    async def Generate(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateResponse]:
        req = convert.generate_request_from_pb(request, self.state.limits)
        async for chunk in self.state.require_engine().generate(req):
            yield convert.generate_chunk_to_pb(chunk)

    async def Attribute(
        self, request: pb.AttributeRequest, context: Any
    ) -> AsyncIterator[pb.AttributeResponse]:
        batch = self.state.config.attribution_batch_size
        req = convert.attribute_request_from_pb(request, self.state.limits, batch)
        async for update in self.state.attribute(req):
            yield await asyncio.to_thread(convert.job_update_to_pb, update)  # graphs: MBs

    async def GetAttribution(
        self, request: pb.GetAttributionRequest, context: Any
    ) -> pb.GetAttributionResponse:
        job = self.state.jobs.get(convert.job_id_from_pb(request, self.state.limits))
        return await asyncio.to_thread(convert.job_to_pb, job)

    async def GetFeature(
        self, request: pb.GetFeatureRequest, context: Any
    ) -> pb.GetFeatureResponse:
        ref = convert.get_feature_request_from_pb(request, self.state.limits)
        return await self.state.features.get_feature(ref)

    async def SearchFeatures(
        self, request: pb.SearchFeaturesRequest, context: Any
    ) -> pb.SearchFeaturesResponse:
        req = convert.search_request_from_pb(request, self.state.limits)
        return await self.state.features.search(req)


def add_to_server(servicer: FeatureSteerServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_FeatureSteerServicer_to_server(servicer, server)
