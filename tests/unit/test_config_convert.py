"""Config precedence, request validation in convert (fields named), stubs in sync."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer_server import convert
from featuresteer_server.config import load_config
from featuresteer_server.errors import InvalidArgument

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_precedence_flags_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('port = 1111\nmetrics-host = "0.0.0.0"\nmax_top_k = 7\n')
    monkeypatch.setenv("FEATURESTEER_PORT", "2222")
    monkeypatch.setenv("FEATURESTEER_MAX_TOP_K", "9")
    cfg = load_config(cfg_file, port=3333)
    assert cfg.port == 3333  # flag beats env
    assert cfg.max_top_k == 9  # env beats file
    assert cfg.metrics_host == "0.0.0.0"  # file beats default
    with pytest.raises(ValidationError, match="frozen"):
        cfg.port = 1  # type: ignore[misc] - frozen


def test_unknown_config_key_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text('{"prot": 1}')
    with pytest.raises(Exception, match="prot"):
        load_config(f)


LIMITS = load_config().limits()


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.DecodeFeaturesRequest(), "inputs"),
        (pb.DecodeFeaturesRequest(inputs=[pb.DecodeInput()], top_k=1), r"inputs\[0\]"),
        (
            pb.DecodeFeaturesRequest(inputs=[pb.DecodeInput(text="a", token_ids=[1])], top_k=1),
            r"inputs\[0\]",
        ),
        (pb.DecodeFeaturesRequest(inputs=[pb.DecodeInput(text="a")], top_k=10_000), "top_k"),
        (pb.DecodeFeaturesRequest(inputs=[pb.DecodeInput(text="a")]), "top_k"),
        (pb.DecodeFeaturesRequest(inputs=[pb.DecodeInput(text="a")] * 100, top_k=1), "inputs"),
        (
            pb.DecodeFeaturesRequest(
                inputs=[pb.DecodeInput(text="a")], top_k=1, dictionary_ids=["a", "a"]
            ),
            "dictionary_ids",
        ),
        (
            pb.DecodeFeaturesRequest(
                inputs=[pb.DecodeInput(text="a")],
                top_k=1,
                dictionary_ids=[str(i) for i in range(50)],
            ),
            "dictionary_ids",
        ),
        (
            pb.DecodeFeaturesRequest(
                inputs=[pb.DecodeInput(text="a")], features=[pb.FeatureRef(index=3)]
            ),
            r"features\[0\]\.dictionary_id",
        ),
    ],
)
def test_decode_validation_names_the_field(request_: pb.DecodeFeaturesRequest, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        convert.decode_request_from_pb(request_, LIMITS)


def test_prepend_bos_defaults_true() -> None:
    req = pb.DecodeFeaturesRequest(inputs=[pb.DecodeInput(text="a")], top_k=1)
    assert convert.decode_request_from_pb(req, LIMITS).prepend_bos is True
    req.prepend_bos = False
    assert convert.decode_request_from_pb(req, LIMITS).prepend_bos is False


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "proto"),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto/featuresteer/v1/featuresteer.proto"),
        ],
        check=True,
    )
    for name in ("featuresteer_pb2.py", "featuresteer_pb2.pyi", "featuresteer_pb2_grpc.py"):
        fresh = (tmp_path / "featuresteer/v1" / name).read_text()
        committed = (ROOT / "clients/python/featuresteer/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make protos`"
