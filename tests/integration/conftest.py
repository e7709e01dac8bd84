"""An in-process gRPC server on port 0 serving the tiny random engine, with real stubs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from featuresteer.v1 import featuresteer_pb2_grpc as pb_grpc
from featuresteer_server.config import load_config
from featuresteer_server.server import RunningServer, start_server
from tests.support import tiny_engine


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return tiny_engine(Path(tmp_path_factory.mktemp("dicts")))


@pytest_asyncio.fixture
async def server(tiny) -> AsyncIterator[RunningServer]:  # type: ignore[no-untyped-def]
    cfg = load_config(port=0, metrics_port=0, max_top_k=16, max_inputs=4, catalog=None)
    srv = await start_server(cfg, engine=tiny)
    yield srv
    srv.state.draining = True
    await srv.server.stop(0)
    if srv._metrics_http is not None:
        srv._metrics_http.shutdown()


@pytest_asyncio.fixture
async def stub(server: RunningServer) -> AsyncIterator[pb_grpc.FeatureSteerStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.FeatureSteerStub(channel)
