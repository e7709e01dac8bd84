"""Steered generation on the real default model (SmolLM2-135M-Instruct) with random
dictionaries of the real shapes: parity with plain transformers, exact no-op edits, a large
ADD changing the output, and the edit checked at the hook."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from featuresteer_server import domain, interventions, models
from featuresteer_server.dictionaries import load_dictionary
from featuresteer_server.domain import FeatureRef, Intervention, Op
from featuresteer_server.engines.hooked import HookedEngine
from featuresteer_server.generation import HookSession
from featuresteer_server.tokenization import Tokenizer
from tests.support import write_random_dictionary

pytestmark = pytest.mark.e2e
SAE = "smollm2-135m/rand-topk-512/blocks.6.hook_resid_post@test"
TC = "smollm2-135m/rand-tc-256/blocks.3.ln2.hook_normalized@test"
PROMPT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> HookedEngine:
    root = Path(tmp_path_factory.mktemp("dicts"))
    model_dir = models.prepare_default_model()
    hf, tok = models.load_hf(model_dir, torch.float32)
    hooked = models.build_hooked(hf, tok, torch.float32)
    hooks = set(hooked.hook_dict)
    sae = write_random_dictionary(root, "sae", "topk", "blocks.6.hook_resid_post", 576, 512, k=16)
    tc = write_random_dictionary(
        root,
        "tc",
        "transcoder",
        "blocks.3.ln2.hook_normalized",
        576,
        256,
        hook_name_out="blocks.3.hook_mlp_out",
        seed=4,
    )
    dicts = [
        load_dictionary(sae, dictionary_id=SAE, expected_hooks=hooks, d_model=576),
        load_dictionary(tc, dictionary_id=TC, expected_hooks=hooks, d_model=576),
    ]
    return HookedEngine(
        hooked,
        Tokenizer(tok),
        dicts,
        model_name=models.DEFAULT_MODEL,
        weights_hash=models.weights_hash(model_dir),
        hf_model=hf,
    )


def gen(engine: HookedEngine, **kw: Any) -> list[int]:
    async def run() -> list[int]:
        req = domain.GenerateRequest(prompt=PROMPT, max_new_tokens=16, **kw)
        return [c.token.id async for c in engine.generate(req) if c.token is not None]

    return asyncio.run(run())


def test_greedy_equals_plain_transformers(engine: HookedEngine) -> None:
    prompt = engine.tokenizer.encode(PROMPT, True)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = engine.hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False
        )
    got = gen(engine)
    assert got == [int(t) for t in ref[0, len(prompt) :]]
    assert "Berlin" in engine.tokenizer.decode(got)


def test_no_ops_unchanged_and_large_add_changes(engine: HookedEngine) -> None:
    base = gen(engine)
    prompt = engine.tokenizer.encode(PROMPT, True)
    sae = engine.dictionaries[SAE]
    a = sae.encode(engine.forward_cache([prompt], {sae.hook_name})[sae.hook_name][0])
    never = int((a == 0).all(0).float().argmax())
    on = int(a[-1].argmax())
    p = len(prompt) - 1
    for iv in (
        Intervention(op=Op.ABLATE, feature=FeatureRef(SAE, never)),
        Intervention(op=Op.ADD, value=0.0, feature=FeatureRef(SAE, on)),
        Intervention(op=Op.ADD, value=0.0, feature=FeatureRef(TC, 1)),
        Intervention(
            op=Op.CLAMP, value=float(a[p, on]), feature=FeatureRef(SAE, on), positions=(p,)
        ),
    ):
        assert gen(engine, interventions=(iv,)) == base, iv
    big = Intervention(op=Op.ADD, value=8.0, normalize=True, feature=FeatureRef(SAE, on))
    assert gen(engine, interventions=(big,)) != base


def test_edit_at_the_hook_is_x_plus_delta(engine: HookedEngine) -> None:
    tc = engine.dictionaries[TC]
    ids = torch.tensor([engine.tokenizer.encode(PROMPT, True)])
    spec = interventions.compile_steering(
        [Intervention(op=Op.CLAMP, value=2.0, feature=FeatureRef(TC, 7))],
        engine.dictionaries,
        hook_names=engine.steering_hooks(),
        d_model=576,
    )
    seen: dict[str, torch.Tensor] = {}
    with HookSession(
        engine.hf_model, spec, prompt_len=ids.shape[1], special_ids=engine.tokenizer.special_ids
    ) as session:
        inner = session.process

        def spy(name: str, x: torch.Tensor) -> torch.Tensor | None:
            out = inner(name, x)
            seen[name] = x[0].clone()
            if out is not None:
                seen[name + ":post"] = out[0].clone()
            return out

        session.process = spy  # type: ignore[method-assign]
        with torch.no_grad():
            engine.hf_model(ids)
    a = tc.encode(seen[tc.hook_name])[:, 7]
    delta = (2.0 - a).unsqueeze(-1) * tc.W_dec[7]
    delta[0] = 0  # BOS is left alone
    want = seen[tc.hook_name_out] + delta
    torch.testing.assert_close(seen[tc.hook_name_out + ":post"], want, atol=1e-5, rtol=0)
