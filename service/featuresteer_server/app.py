"""What the servicer serves from: the engine once it is loaded (and whether the server is
draining), the attribution jobs, the feature cache and catalog. The servicer converts and
calls these; orchestration (jobs, cache keys) lives here and in the modules they wrap.
Imports no torch."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from featuresteer_server import domain, jobs
from featuresteer_server.cache import FeatureCache
from featuresteer_server.errors import Unavailable
from featuresteer_server.feature_service import FeatureService

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
        self.features = FeatureService(self.cache, self.require_catalog)

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

    def attribute(self, req: domain.AttributeRequest) -> AsyncIterator[jobs.JobUpdate]:
        """Run an attribution as a job (bounded queue) and follow it: its id, progress, the
        labelled result; the job is cancelled when the follower goes away (unless detached)."""
        engine, catalog = self.require_engine(), self.require_catalog()

        async def work(
            progress: Callable[[str, float], None], cancel: threading.Event
        ) -> domain.AttributionResult:
            return catalog.label_graph(await engine.attribute(req, progress, cancel))

        return self.jobs.follow(self.jobs.submit(work), detach=req.detach)
