"""featuresteer.v1.FeatureSteer: one short method per RPC — convert, call, convert back.
Imports no torch; errors are raised as domain exceptions and mapped by the interceptor."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc

from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer.v1 import featuresteer_pb2_grpc as pb_grpc
from featuresteer_server import __version__, convert, domain, jobs
from featuresteer_server.cache import FeatureCache
from featuresteer_server.errors import Cancelled, Unavailable

if TYPE_CHECKING:
    from featuresteer_server.catalog import FeatureCatalog
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
        self.jobs = jobs.JobStore(
            config.max_concurrent_attributions,
            config.max_queued_attributions,
            config.attribution_result_ttl_seconds,
        )
        self.cache = FeatureCache(
            config.redis_url,
            ttl_seconds=config.cache_ttl_seconds,
            lru_size=config.lru_size,
            prefix=config.cache_key_prefix,
            socket_timeout=config.cache_socket_timeout_seconds,
            retry_seconds=config.cache_retry_seconds,
            metrics=metrics,
        )
        self._catalog: FeatureCatalog | None = None

    def require_engine(self) -> Engine:
        if self.draining:
            raise Unavailable("the server is shutting down")
        if self.engine is None:
            if self.load_error is not None:
                raise Unavailable(f"the model failed to load: {self.load_error}")
            raise Unavailable("the model is still loading; retry shortly")
        return self.engine

    def require_catalog(self) -> FeatureCatalog:
        """The feature catalog of the current engine (built on first use)."""
        engine = self.require_engine()
        if self._catalog is None or self._catalog.engine is not engine:
            from featuresteer_server.catalog import FeatureCatalog

            self._catalog = FeatureCatalog.from_config(engine, self.config)
        return self._catalog


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
        # tokenizing and building the answer are CPU work: off the event loop
        return await asyncio.to_thread(
            lambda: convert.tokens_to_pb(engine.tokenize(req), self.state.limits)
        )

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
        cfg = self.state.config
        req = convert.attribute_request_from_pb(
            request, self.state.limits, cfg.attribution_batch_size
        )
        engine = self.state.require_engine()
        catalog = self.state.require_catalog()

        async def work(
            progress: Callable[[str, float], None], cancel: threading.Event
        ) -> domain.AttributionResult:
            result = await engine.attribute(req, progress, cancel)
            return catalog.label_graph(result)

        job = self.state.jobs.submit(work)
        finished = False
        try:
            yield pb.AttributeResponse(job_id=job.id)
            last: tuple[str, float] | None = None
            while not job.done:
                job.changed.clear()
                if (job.stage, job.fraction) != last:
                    last = (job.stage, job.fraction)
                    yield pb.AttributeResponse(
                        job_id=job.id, progress=pb.Progress(stage=job.stage, fraction=job.fraction)
                    )
                if not job.done:
                    await job.changed.wait()
            finished = True
            if job.error is not None:
                raise job.error
            if job.state == jobs.CANCELLED:
                raise Cancelled(f"attribution job {job.id} was cancelled")
            yield await asyncio.to_thread(convert.attribution_result_to_pb, job.id, job.result)
        finally:
            if not finished and not req.detach:  # the client went away: free the work
                self.state.jobs.cancel(job)

    async def GetAttribution(
        self, request: pb.GetAttributionRequest, context: Any
    ) -> pb.GetAttributionResponse:
        job = self.state.jobs.get(convert.job_id_from_pb(request, self.state.limits))
        error = job.error_message  # never raw exception text (jobs.public_error)
        result = job.result if job.state == jobs.DONE else None
        return await asyncio.to_thread(
            convert.job_to_pb, job.id, job.state, job.stage, job.fraction, result, error
        )

    async def GetFeature(
        self, request: pb.GetFeatureRequest, context: Any
    ) -> pb.GetFeatureResponse:
        ref = convert.get_feature_request_from_pb(request, self.state.limits)
        catalog = self.state.require_catalog()
        d = catalog.resolve(ref)  # errors before the cache: they are never cached
        cache = self.state.cache

        async def compute() -> bytes:
            return convert.feature_to_pb(await catalog.get_feature(ref)).SerializeToString()

        key = cache.key("feature", d.fingerprint, ref.index)
        parse = pb.GetFeatureResponse.FromString  # also validates what Redis returns
        return parse(await cache.get_or_compute(key, compute, parse))

    async def SearchFeatures(
        self, request: pb.SearchFeaturesRequest, context: Any
    ) -> pb.SearchFeaturesResponse:
        req = convert.search_request_from_pb(request, self.state.limits)
        catalog = self.state.require_catalog()
        scope = catalog.search_scope(req)
        cache = self.state.cache

        async def compute() -> bytes:
            return convert.search_result_to_pb(await catalog.search(req)).SerializeToString()

        if req.token_id is not None:
            key = cache.key("search-token", scope.fingerprint, req.token_id, req.limit)
        else:  # the query is user text of any length: its hash goes in the key
            digest = hashlib.sha256((req.query or "").lower().encode()).hexdigest()[:32]
            key = cache.key("search-text", scope.fingerprint, req.limit, digest)
        parse = pb.SearchFeaturesResponse.FromString
        return parse(await cache.get_or_compute(key, compute, parse))


def add_to_server(servicer: FeatureSteerServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_FeatureSteerServicer_to_server(servicer, server)
