"""The tap table (taps.py) on a family other than Llama: a tiny random GPT-2 read and edited
through the HF hook session, checked against the model's own hidden states, raw torch hooks
on its modules and torch's LayerNorm (none of which go through the table)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from featuresteer_server import domain, interventions, taps
from featuresteer_server.generation import HookSession

pytestmark = pytest.mark.unit
D, LAYERS = 32, 2


@pytest.fixture(scope="module")
def gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=64, n_embd=D, n_layer=LAYERS, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


IDS = torch.tensor([[5, 17, 3, 88, 41, 9, 60]])  # [1, T]
HOOKS = [f"blocks.{layer}.{kind}" for layer in range(LAYERS) for kind in taps.GPT2.kinds()]


def test_family_is_found_from_the_config(gpt2: Any) -> None:
    assert taps.hf_family(gpt2) is taps.GPT2
    assert taps.GPT2.n_layers(gpt2) == LAYERS
    with pytest.raises(ValueError, match="no tap"):
        taps.GPT2.tap("blocks.0.hook_not_a_hook")


def _session(model: Any, spec: Any, seen: dict[str, torch.Tensor]) -> HookSession:
    def keep(hook: str, rows: torch.Tensor, positions: torch.Tensor) -> None:
        seen[hook] = rows.detach().clone()

    return HookSession(
        model, spec, prompt_len=IDS.shape[1], special_ids=frozenset(), capture=HOOKS,
        on_capture=keep,
    )  # fmt: skip


def test_every_row_reads_what_the_model_computes(gpt2: Any) -> None:
    raw: dict[str, torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(gpt2.transformer.h):  # independent taps: plain torch hooks
        handles.append(
            block.ln_2.register_forward_pre_hook(
                lambda m, a, layer=layer: raw.__setitem__(f"mid{layer}", a[0][0].clone())
            )
        )
        handles.append(
            block.mlp.register_forward_hook(
                lambda m, a, o, layer=layer: raw.__setitem__(f"mlp{layer}", o[0].clone())
            )
        )
    seen: dict[str, torch.Tensor] = {}
    try:
        with _session(gpt2, interventions.SteeringSpec(), seen), torch.no_grad():
            out = gpt2(IDS, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hs = out.hidden_states  # embeddings, then each block's input; the last has ln_f applied
    for layer in range(LAYERS):
        b = f"blocks.{layer}."
        ln2 = gpt2.transformer.h[layer].ln_2
        torch.testing.assert_close(seen[b + "hook_resid_pre"], hs[layer][0])
        torch.testing.assert_close(seen[b + "hook_resid_mid"], raw[f"mid{layer}"])
        torch.testing.assert_close(
            seen[b + "hook_attn_out"], raw[f"mid{layer}"] - hs[layer][0], rtol=1e-5, atol=1e-6
        )
        ref = torch.nn.functional.layer_norm(raw[f"mid{layer}"], (D,), eps=ln2.eps)
        torch.testing.assert_close(seen[b + "ln2.hook_normalized"], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen[b + "hook_mlp_out"], raw[f"mlp{layer}"])
        if layer + 1 < LAYERS:
            torch.testing.assert_close(seen[b + "hook_resid_post"], hs[layer + 1][0])


def _vector_add(hook: str, v: torch.Tensor) -> Any:
    iv = domain.Intervention(
        op=domain.Op.ADD, value=1.0, vector=domain.VectorTarget(hook, tuple(v.tolist()))
    )
    return interventions.compile_steering([iv], {}, hook_names=HOOKS, d_model=D)


def _block_input(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return (args[0] if args else kwargs["hidden_states"])[0].clone()


def test_edits_write_through_the_rows(gpt2: Any) -> None:
    v = torch.randn(D, generator=torch.Generator().manual_seed(1))
    block1 = gpt2.transformer.h[1]
    got: list[torch.Tensor] = []  # block 1's input (= resid_post of block 0), by a raw hook
    handle = block1.register_forward_pre_hook(
        lambda m, a, kw: got.append(_block_input(m, a, kw)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            gpt2(IDS)
        with _session(gpt2, _vector_add("blocks.0.hook_resid_post", v), {}), torch.no_grad():
            gpt2(IDS)
    finally:
        handle.remove()
    # ApplyTo.ALL leaves special tokens alone (none here): every row moves by exactly v
    torch.testing.assert_close(got[1], got[0] + v, rtol=1e-5, atol=1e-5)
    # the MLP's normalised input: the MLP then sees affine(n + v) (weight and bias)
    mlp_in: list[torch.Tensor] = []
    handle = block1.mlp.register_forward_pre_hook(lambda m, a: mlp_in.append(a[0][0].clone()))
    seen: dict[str, torch.Tensor] = {}
    spec = _vector_add("blocks.1.ln2.hook_normalized", v)
    try:
        with _session(gpt2, spec, seen), torch.no_grad():
            gpt2(IDS)
    finally:
        handle.remove()
    n = seen["blocks.1.ln2.hook_normalized"]  # pre-edit
    want = (n + v) * block1.ln_2.weight + block1.ln_2.bias
    torch.testing.assert_close(mlp_in[0], want, rtol=1e-5, atol=1e-5)
