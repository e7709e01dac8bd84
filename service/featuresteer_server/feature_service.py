"""GetFeature and SearchFeatures through the cache: this service owns the cache keys and the
serialised form of a cached answer (the protobuf response's bytes, parsed again on every read,
which also validates what Redis returns). Errors (unknown dictionary, stale fingerprint, bad
index) are raised before the cache, so they are never cached."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer_server import convert, domain
from featuresteer_server.cache import FeatureCache

if TYPE_CHECKING:
    from featuresteer_server.catalog import FeatureCatalog


class FeatureService:
    def __init__(self, cache: FeatureCache, catalog: Callable[[], FeatureCatalog]) -> None:
        self.cache = cache
        self.catalog = catalog  # the current engine's catalog (built on first use)

    async def get_feature(self, ref: domain.FeatureRef) -> pb.GetFeatureResponse:
        catalog = self.catalog()
        d = catalog.resolve(ref)

        async def compute() -> bytes:
            data: bytes = convert.feature_to_pb(await catalog.get_feature(ref)).SerializeToString()
            return data

        key = self.cache.key("feature", d.fingerprint, ref.index)
        parse = pb.GetFeatureResponse.FromString
        answer: pb.GetFeatureResponse = parse(await self.cache.get_or_compute(key, compute, parse))
        return answer

    async def search(self, req: domain.SearchRequest) -> pb.SearchFeaturesResponse:
        catalog = self.catalog()
        scope = catalog.search_scope(req)

        async def compute() -> bytes:
            data: bytes = convert.search_result_to_pb(await catalog.search(req)).SerializeToString()
            return data

        if req.token_id is not None:
            key = self.cache.key("search-token", scope.fingerprint, req.token_id, req.limit)
        else:  # the query is user text of any length: its hash goes in the key
            digest = hashlib.sha256((req.query or "").lower().encode()).hexdigest()[:32]
            key = self.cache.key("search-text", scope.fingerprint, req.limit, digest)
        parse = pb.SearchFeaturesResponse.FromString
        found: pb.SearchFeaturesResponse = parse(
            await self.cache.get_or_compute(key, compute, parse)
        )
        return found
