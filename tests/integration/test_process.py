"""The real server process: the CLI on a tiny model directory, the Python SDK against it,
and graceful shutdown on SIGTERM (health NOT_SERVING, drain, exit 0)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from featuresteer import Client, FeatureSteerError
from tests.support import default_hf_tokenizer, tiny_hf_model, write_random_dictionary

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server_process(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("proc")
    model_dir = root / "tiny-llama"
    tiny_hf_model().save_pretrained(model_dir)
    default_hf_tokenizer().save_pretrained(model_dir)
    sae = write_random_dictionary(root, "sae", "topk", "blocks.1.hook_resid_post", 64, 128, k=8)
    port = free_port()
    env = {
        **os.environ,
        "FEATURESTEER_TORCH_THREADS": "1",
        "FEATURESTEER_GRACE_SECONDS": "5",
        "FEATURESTEER_GENERATION_ENGINE": "hooked",
    }  # vLLM has its own e2e tests
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "featuresteer_server.cli",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--model",
            str(model_dir),
            "--catalog",
            str(root / "none.json"),
            "--dictionary",
            str(sae),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.time() + 120
    while True:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(
                f"server did not become SERVING:\n{proc.stdout.read() if proc.stdout else ''}"
            )
        time.sleep(0.3)
    yield proc, port
    channel.close()
    if proc.poll() is None:
        proc.kill()


def test_sdk_sync_client(server_process) -> None:  # type: ignore[no-untyped-def]
    _, port = server_process
    with Client(f"127.0.0.1:{port}", timeout=30) as client:
        info = client.get_info()
        assert info.model.name == "tiny-llama" and info.model.n_layers == 2
        (d,) = client.list_dictionaries().dictionaries
        res = client.decode_features(["Hello", [1, 5, 6]], top_k=3, include_error=True)
        assert len(res.items) == 2 and res.items[0].results[0].dictionary_id == d.id
        with pytest.raises(FeatureSteerError) as err:
            client.decode_features(["x"], top_k=3, dictionary_ids=["nope"])
        assert (
            err.value.code == grpc.StatusCode.NOT_FOUND and "dictionary_ids[0]" in err.value.details
        )


async def test_sdk_async_client(server_process) -> None:  # type: ignore[no-untyped-def]
    from featuresteer import AsyncClient

    _, port = server_process
    async with AsyncClient(f"127.0.0.1:{port}") as client:
        toks = await client.tokenize("two words")
        assert toks.tokens[0].id == 1
        with pytest.raises(FeatureSteerError) as err:
            await client.decode_features(["x"], top_k=10_000)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in err.value.details


def test_sigterm_drains_and_exits_zero(server_process) -> None:  # type: ignore[no-untyped-def]
    proc, port = server_process
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "draining" in out and "stopped" in out
