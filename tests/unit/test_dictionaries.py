"""Unit tests of the dictionary runtime against SAELens's own classes on the same files.

Each test writes tiny random dictionaries in SAELens format (with SAELens itself where it can
build them), loads them with ``featuresteer_server.dictionaries`` and checks the math against
SAELens (``SAE.load_from_disk``) or against hand computation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from sae_lens import SAE  # noqa: E402
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig  # noqa: E402
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig  # noqa: E402
from sae_lens.saes.transcoder import (  # noqa: E402
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    Transcoder,
    TranscoderConfig,
)
from safetensors.torch import load_file, save_file  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from featuresteer_server.dictionaries import (  # noqa: E402
    ARCHITECTURES,
    DictionaryLoadError,
    DictionaryNotFound,
    DictionaryRegistry,
    FeatureEditRefused,
    FingerprintMismatch,
    load_catalog,
    load_catalog_dictionaries,
    load_dictionary,
    write_dictionary,
)

pytestmark = pytest.mark.unit

D_MODEL = 16
D_SAE = 32
N_LAYERS = 3
MODEL_NAME = "tiny-llama"
SAE_HOOK = "blocks.1.hook_resid_post"
TC_IN = "blocks.1.ln2.hook_normalized"
TC_OUT = "blocks.1.hook_mlp_out"
TOL = 1e-5

SAELENS_CLASSES = {
    "standard": (StandardSAE, StandardSAEConfig),
    "topk": (TopKSAE, TopKSAEConfig),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
    "transcoder": (Transcoder, TranscoderConfig),
    "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig),
    "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig),
    "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig),
}
TRANSCODERS = {a for a in SAELENS_CLASSES if "transcoder" in a}


@pytest.fixture(scope="module")
def model_hooks() -> set[str]:
    """Hook names a real (tiny, random) TransformerLens Llama-style model exposes."""
    cfg = HookedTransformerConfig(
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        n_ctx=8,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=11,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
    )
    return set(HookedTransformer(cfg).hook_dict)


def saelens_dictionary(
    tmp_path: Path,
    architecture: str,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    hook_name: str | None = None,
    hook_name_out: str | None = None,
    **cfg_kwargs,
) -> Path:
    """Build a SAELens dictionary with random parameters and save it with ``save_model``."""
    sae_cls, cfg_cls = SAELENS_CLASSES[architecture]
    is_tc = architecture in TRANSCODERS
    kwargs = {"d_in": D_MODEL, "d_sae": D_SAE, **cfg_kwargs}
    if is_tc:
        kwargs.setdefault("d_out", D_MODEL)
        kwargs["apply_b_dec_to_input"] = False
    if architecture == "topk":
        kwargs.setdefault("k", 5)
    cfg = cfg_cls(**kwargs)
    cfg.metadata.model_name = MODEL_NAME
    cfg.metadata.hook_name = hook_name or (TC_IN if is_tc else SAE_HOOK)
    if is_tc:
        cfg.metadata.hook_name_out = hook_name_out or TC_OUT
    sae = sae_cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name == "threshold":
                param.copy_(torch.rand(param.shape, generator=gen) * 0.8)
            elif name == "W_dec":
                # rows of different norms, so decoder-norm rescaling matters
                norms = 0.2 + 2 * torch.rand(param.shape[0], 1, generator=gen)
                param.copy_(torch.randn(param.shape, generator=gen) * norms / param.shape[1] ** 0.5)
            else:
                scale = 0.3 if name.startswith("b_") else param.shape[0] ** -0.5
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    sae = sae.to(dtype=dtype)
    path = tmp_path / f"{architecture}-{str(dtype).removeprefix('torch.')}-{seed}"
    sae.save_model(path)
    return path


def inputs(d: int = D_MODEL, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, d, generator=gen) * 1.5 + 0.3  # [batch, pos, d]


# -- parity with SAELens ----------------------------------------------------------------------

PARITY_CASES = [
    *[(arch, {}) for arch in SAELENS_CLASSES],
    ("standard", {"apply_b_dec_to_input": False}),
    ("topk", {"rescale_acts_by_decoder_norm": True}),
    ("jumprelu", {"apply_b_dec_to_input": False}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize(
    ("architecture", "options"), PARITY_CASES, ids=[f"{a}{sorted(o)}" for a, o in PARITY_CASES]
)
def test_parity_with_saelens(tmp_path, model_hooks, architecture, options, dtype):
    path = saelens_dictionary(tmp_path, architecture, dtype=dtype, **options)
    ours = load_dictionary(path, expected_hooks=model_hooks, d_model=D_MODEL)
    ref = SAE.load_from_disk(path, dtype="float32")
    assert ours.architecture == architecture == ref.cfg.architecture()
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    assert set(ours.state_dict()) == set(load_file(path / "sae_weights.safetensors"))

    x = inputs()
    with torch.no_grad():
        ref_acts = ref.encode(x)
        acts = ours.encode(x)
        assert ours.encode(x.to(torch.bfloat16)).dtype == torch.float32  # bf16 model, f32 math
        assert acts.dtype == torch.float32 and acts.shape == (2, 5, D_SAE)
        torch.testing.assert_close(acts, ref_acts, atol=TOL, rtol=0)
        assert (acts != 0).any() and (acts == 0).any()  # a real sparse code, not a degenerate one
        torch.testing.assert_close(ours.decode(acts), ref.decode(ref_acts), atol=TOL, rtol=0)
        torch.testing.assert_close(ours.reconstruct(x), ref(x), atol=TOL, rtol=0)
        if architecture == "topk":
            assert int((acts != 0).sum(-1).max()) <= ours.k


def test_float16_weights_are_converted_exactly(tmp_path):
    path = saelens_dictionary(tmp_path, "jumprelu", dtype=torch.float16)
    stored = load_file(path / "sae_weights.safetensors")
    ours = load_dictionary(path)
    assert stored["W_enc"].dtype == torch.float16
    assert torch.equal(ours.W_enc, stored["W_enc"].float())
    assert torch.equal(ours.threshold, stored["threshold"].float())


@pytest.mark.parametrize("mode", ["constant_norm_rescale", "layer_norm"])
def test_per_token_normalization_matches_saelens_and_refuses_edits(tmp_path, mode):
    path = saelens_dictionary(tmp_path, "standard", normalize_activations=mode)
    ours = load_dictionary(path)
    ref = SAE.load_from_disk(path, dtype="float32")
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), ref.encode(x), atol=TOL, rtol=0)
        torch.testing.assert_close(ours.reconstruct(x), ref(x), atol=TOL, rtol=0)
    assert ours.per_token_normalization and ours.info().per_token_normalization
    with pytest.raises(FeatureEditRefused, match="normalises each token"):
        ours.contrib(0, torch.ones(3))
    with pytest.raises(FeatureEditRefused):
        ours.decoder_direction(0)
    with pytest.raises(ValueError, match="needs the input x"):
        ours.decode(ours.encode(x))


def test_expected_average_scaling_factor_is_folded(tmp_path):
    path = saelens_dictionary(tmp_path, "standard")
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["normalize_activations"] = "expected_average_only_in"
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DictionaryLoadError, match="norm_scaling_factor"):
        load_dictionary(path)

    cfg["norm_scaling_factor"] = 2.5
    (path / "cfg.json").write_text(json.dumps(cfg))
    ours = load_dictionary(path)
    ref = SAE.load_from_disk(path, dtype="float32")
    ref.fold_activation_norm_scaling_factor(2.5)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), ref.encode(x), atol=TOL, rtol=0)
        torch.testing.assert_close(ours.reconstruct(x), ref(x), atol=TOL, rtol=0)
    assert not ours.per_token_normalization


# -- steering primitives ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "options"),
    [("standard", {}), ("topk", {"rescale_acts_by_decoder_norm": True}), ("skip_transcoder", {})],
)
def test_contrib_and_decoder_direction(tmp_path, architecture, options):
    path = saelens_dictionary(tmp_path, architecture, **options)
    d = load_dictionary(path)
    stored = load_file(path / "sae_weights.safetensors")
    W_dec = stored["W_dec"]
    rescale = options.get("rescale_acts_by_decoder_norm", False)
    for i in (0, 7, D_SAE - 1):
        expected = W_dec[i] / W_dec[i].norm() if rescale else W_dec[i]
        torch.testing.assert_close(d.decoder_direction(i), expected, atol=1e-6, rtol=0)
        values = torch.tensor([[0.0, 1.5], [-2.0, 3.25]])  # [2, 2]
        contrib = d.contrib(i, values)
        assert contrib.shape == (2, 2, D_MODEL)
        torch.testing.assert_close(contrib, values[..., None] * expected, atol=1e-6, rtol=0)
    # the features' contributions plus b_dec rebuild decode() (skip term excluded)
    x = inputs()
    acts = d.encode(x)
    summed = sum(d.contrib(i, acts[..., i]) for i in range(D_SAE)) + stored["b_dec"]
    torch.testing.assert_close(d.decode(acts), summed, atol=1e-5, rtol=0)
    with pytest.raises(IndexError):
        d.decoder_direction(D_SAE)


def test_skip_term_only_in_reconstruct(tmp_path):
    path = saelens_dictionary(tmp_path, "skip_transcoder")
    d = load_dictionary(path)
    W_skip = load_file(path / "sae_weights.safetensors")["W_skip"]
    assert W_skip.shape == (D_MODEL, D_MODEL) and d.has_skip
    x = inputs()
    torch.testing.assert_close(d.skip(x), x @ W_skip.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        d.reconstruct(x), d.decode(d.encode(x)) + x @ W_skip.T, atol=1e-6, rtol=0
    )


# -- error statistics -------------------------------------------------------------------------


def test_error_stats_sae_with_dataset_mean(tmp_path):
    path = saelens_dictionary(tmp_path, "topk")
    mean = torch.linspace(-1, 1, D_MODEL)
    save_file({"mean": mean}, str(path / "dataset_stats.safetensors"))
    d = load_dictionary(path)
    x = inputs()
    norm, fvu = d.error_stats(x)
    x_hat = SAE.load_from_disk(path, dtype="float32")(x).detach()
    err = ((x - x_hat) ** 2).sum(-1)
    assert norm.shape == fvu.shape == (2, 5)
    torch.testing.assert_close(norm, err.sqrt(), atol=1e-5, rtol=0)
    torch.testing.assert_close(fvu, err / ((x - mean) ** 2).sum(-1), atol=1e-6, rtol=1e-5)
    assert "0-centred" not in d.description


def test_error_stats_transcoder_targets_mlp_out_and_falls_back_to_zero_centre(tmp_path):
    path = saelens_dictionary(tmp_path, "jumprelu_transcoder")
    d = load_dictionary(path)
    assert d.dataset_mean is None and "0-centred" in d.description
    x, x_out = inputs(seed=1), inputs(seed=2)
    norm, fvu = d.error_stats(x, x_out)
    err = ((x_out - d.reconstruct(x)) ** 2).sum(-1)
    torch.testing.assert_close(norm, err.sqrt(), atol=1e-6, rtol=0)
    torch.testing.assert_close(fvu, err / (x_out**2).sum(-1), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="output activations"):
        d.error_stats(x)


# -- refusals ---------------------------------------------------------------------------------


def test_refuses_d_in_mismatch(tmp_path, model_hooks):
    path = saelens_dictionary(tmp_path, "standard")
    with pytest.raises(DictionaryLoadError, match=r"d_in=16 does not match .* 24"):
        load_dictionary(path, dictionary_id="x@v1", expected_hooks=model_hooks, d_model=24)
    with pytest.raises(DictionaryLoadError, match="x@v1"):
        load_dictionary(path, dictionary_id="x@v1", hook_dims={SAE_HOOK: 8})


def test_refuses_unknown_hook(tmp_path, model_hooks):
    path = saelens_dictionary(tmp_path, "standard", hook_name="blocks.7.hook_resid_post")
    with pytest.raises(DictionaryLoadError, match=r"'blocks\.7\.hook_resid_post' is not a hook"):
        load_dictionary(path, expected_hooks=model_hooks)


@pytest.mark.parametrize(
    ("hook_in", "hook_out", "message"),
    [
        ("blocks.0.ln2.hook_normalized", "blocks.1.hook_mlp_out", "different layers"),
        ("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", "must read"),
        ("blocks.1.ln2.hook_normalized", "blocks.1.hook_resid_post", "must write"),
    ],
)
def test_refuses_bad_transcoder_hooks(tmp_path, model_hooks, hook_in, hook_out, message):
    path = saelens_dictionary(tmp_path, "transcoder", hook_name=hook_in, hook_name_out=hook_out)
    with pytest.raises(DictionaryLoadError, match=message):
        load_dictionary(path, expected_hooks=model_hooks)


def test_refuses_malformed_files(tmp_path):
    path = saelens_dictionary(tmp_path, "jumprelu")
    cfg_path = path / "cfg.json"
    cfg = json.loads(cfg_path.read_text())

    cfg_path.write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(DictionaryLoadError, match="unsupported architecture 'gated'"):
        load_dictionary(path)
    cfg_path.write_text(json.dumps({**cfg, "d_sae": D_SAE + 1}))
    with pytest.raises(DictionaryLoadError, match="W_enc has shape"):
        load_dictionary(path)
    cfg_path.write_text(json.dumps({**cfg, "normalize_activations": "covariance_whitening"}))
    with pytest.raises(DictionaryLoadError, match="covariance_whitening"):
        load_dictionary(path)
    cfg_path.write_text(json.dumps(cfg))
    weights = load_file(path / "sae_weights.safetensors")
    del weights["threshold"]
    save_file(weights, str(path / "sae_weights.safetensors"))
    with pytest.raises(DictionaryLoadError, match=r"missing \['threshold'\]"):
        load_dictionary(path)
    with pytest.raises(DictionaryLoadError, match="does not exist"):
        load_dictionary(tmp_path / "nowhere")


# -- identity ---------------------------------------------------------------------------------


def test_fingerprint_tracks_content(tmp_path):
    path = saelens_dictionary(tmp_path, "topk")
    first = load_dictionary(path).fingerprint
    assert len(first) == 16 and int(first, 16) >= 0
    assert load_dictionary(path).fingerprint == first  # deterministic

    weights = load_file(path / "sae_weights.safetensors")
    weights["W_dec"][3, 4] += 1e-3
    save_file(weights, str(path / "sae_weights.safetensors"))
    second = load_dictionary(path).fingerprint
    assert second != first

    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps({**cfg, "k": 4}))
    assert load_dictionary(path).fingerprint not in (first, second)


def test_ids_and_versions(tmp_path):
    path = saelens_dictionary(tmp_path, "topk")
    d = load_dictionary(path)
    assert d.id == f"{MODEL_NAME}/topk-{D_SAE}/{SAE_HOOK}@v0" and d.version == "v0"
    assert load_dictionary(path, version="v2").id.endswith("@v2")
    assert load_dictionary(path, dictionary_id="a/b@v3").version == "v3"
    with pytest.raises(DictionaryLoadError, match="disagrees"):
        load_dictionary(path, dictionary_id="a/b@v3", version="v4")
    tc = load_dictionary(saelens_dictionary(tmp_path, "transcoder"))
    assert tc.is_transcoder and tc.hook_name == TC_IN and tc.hook_name_out == TC_OUT
    assert d.hook_name_out == d.hook_name == SAE_HOOK and not d.is_transcoder
    assert d.source == str(path.resolve())


def test_pre_v6_flat_cfg(tmp_path):
    """Older SAELens cfgs: hook at top level (hook_point), TopK via activation_fn_kwargs."""
    path = saelens_dictionary(tmp_path, "topk", k=4)
    cfg = json.loads((path / "cfg.json").read_text())
    old = {
        "d_in": cfg["d_in"],
        "d_sae": cfg["d_sae"],
        "dtype": "float32",
        "hook_point": SAE_HOOK,
        "model_name": MODEL_NAME,
        "activation_fn_str": "topk",
        "activation_fn": "topk",
        "activation_fn_kwargs": {"k": 4},
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
    }
    (path / "cfg.json").write_text(json.dumps(old))
    d = load_dictionary(path)
    ref = SAE.load_from_disk(path, dtype="float32")
    assert d.architecture == "topk" and d.k == 4 and d.hook_name == SAE_HOOK
    x = inputs()
    torch.testing.assert_close(d.encode(x), ref.encode(x).detach(), atol=TOL, rtol=0)


def test_write_dictionary_roundtrip(tmp_path, model_hooks):
    gen = torch.Generator().manual_seed(3)
    weights = {
        "W_enc": torch.randn(D_MODEL, D_SAE, generator=gen),
        "b_enc": torch.randn(D_SAE, generator=gen),
        "W_dec": torch.randn(D_SAE, D_MODEL, generator=gen),
        "b_dec": torch.randn(D_MODEL, generator=gen),
    }
    path = write_dictionary(
        tmp_path / "tc",
        weights,
        architecture="transcoder",
        hook_name=TC_IN,
        hook_name_out=TC_OUT,
        model_name=MODEL_NAME,
        dataset_mean=torch.zeros(D_MODEL),
        dtype=torch.float16,
    )
    ours = load_dictionary(path, expected_hooks=model_hooks, d_model=D_MODEL)
    ref = SAE.load_from_disk(path, dtype="float32")
    x = inputs()
    torch.testing.assert_close(ours.reconstruct(x), ref(x).detach(), atol=TOL, rtol=0)
    assert ours.dataset_mean is not None


# -- catalog and registry ---------------------------------------------------------------------


def write_catalog(tmp_path: Path, entries: list[dict]) -> Path:
    catalog = tmp_path / "catalog" / "catalog.json"
    catalog.parent.mkdir(parents=True, exist_ok=True)
    catalog.write_text(json.dumps({"model": MODEL_NAME, "dictionaries": entries}))
    return catalog


def test_catalog_loading_and_registry(tmp_path, model_hooks):
    saelens_dictionary(tmp_path / "catalog", "topk")
    saelens_dictionary(tmp_path / "catalog", "jumprelu_transcoder")
    metrics = {"l0": 5.0, "fvu": 0.12, "dead_fraction": 0.01, "ce_loss_delta": 0.3}
    catalog = write_catalog(
        tmp_path,
        [
            {
                "id": f"{MODEL_NAME}/res-topk-{D_SAE}/{SAE_HOOK}@v1",
                "path": "topk-float32-0",
                "architecture": "topk",
                "hook_name": SAE_HOOK,
                "hook_name_out": SAE_HOOK,
                "d_in": D_MODEL,
                "d_sae": D_SAE,
                "version": "v1",
                "description": "residual TopK",
                "metrics": {**metrics, "n_eval_tokens": 2000},
                "metadata": "meta/topk.json",
                "default": True,
            },
            {
                "id": f"{MODEL_NAME}/tc-{D_SAE}/{TC_IN}@v1",
                "path": "jumprelu_transcoder-float32-0",
                "architecture": "jumprelu_transcoder",
                "hook_name": TC_IN,
                "hook_name_out": TC_OUT,
                "d_in": D_MODEL,
                "d_sae": D_SAE,
                "version": "v1",
                "description": "",
                "metrics": {"l0": None},
                "metadata": None,
                "default": False,
            },
        ],
    )
    entries = load_catalog(catalog)
    assert [e.architecture for e in entries] == ["topk", "jumprelu_transcoder"]
    assert entries[0].path == (catalog.parent / "topk-float32-0").resolve()
    assert entries[0].metadata == (catalog.parent / "meta/topk.json").resolve()
    assert entries[1].metadata is None and entries[0].default and entries[0].model == MODEL_NAME

    registry = load_catalog_dictionaries(catalog, expected_hooks=model_hooks, d_model=D_MODEL)
    assert len(registry) == 2 and registry.default_ids() == [entries[0].id]
    infos = registry.infos()
    assert infos[0].l0 == 5.0 and infos[0].ce_loss_delta == 0.3 and infos[0].version == "v1"
    assert infos[0].description.startswith("residual TopK") and infos[1].l0 is None
    assert "0-centred" in infos[0].description  # no dataset_stats.safetensors here
    assert infos[1].hook_name_out == TC_OUT and infos[1].is_transcoder
    topk = registry.get(entries[0].id)
    assert topk.metrics["n_eval_tokens"] == 2000 and registry.at_hook(SAE_HOOK) == [topk]

    assert registry.check_fingerprint(entries[0].id, None) is topk
    assert registry.check_fingerprint(entries[0].id, topk.fingerprint) is topk
    with pytest.raises(FingerprintMismatch, match="0123456789abcdef"):
        registry.check_fingerprint(entries[0].id, "0123456789abcdef")
    with pytest.raises(DictionaryNotFound) as err:
        registry.get("nope@v1")
    assert isinstance(err.value, KeyError) and "nope@v1" in str(err.value)
    with pytest.raises(DictionaryLoadError, match="loaded twice"):
        registry.add(topk)

    only = load_catalog_dictionaries(catalog, ids=[entries[1].id])
    assert only.ids() == [entries[1].id]
    with pytest.raises(DictionaryNotFound):
        load_catalog_dictionaries(catalog, ids=["missing@v1"])


def test_catalog_refuses_disagreement_and_duplicates(tmp_path):
    saelens_dictionary(tmp_path / "catalog", "standard")
    entry = {"id": "s@v1", "path": "standard-float32-0", "hook_name": "blocks.2.hook_resid_post"}
    catalog = write_catalog(tmp_path, [entry])
    with pytest.raises(DictionaryLoadError, match="catalog says hook_name"):
        load_catalog_dictionaries(catalog)
    catalog = write_catalog(tmp_path, [{**entry, "hook_name": SAE_HOOK}] * 2)
    with pytest.raises(DictionaryLoadError, match="duplicate id"):
        load_catalog(catalog)
    catalog.write_text("{not json")
    with pytest.raises(DictionaryLoadError, match="cannot read"):
        load_catalog(catalog)


def test_registry_covers_every_required_architecture():
    required = {
        "standard",
        "topk",
        "jumprelu",
        "transcoder",
        "skip_transcoder",
        "jumprelu_transcoder",
    }
    assert required <= set(ARCHITECTURES)
    assert DictionaryRegistry().default_ids() == []


@pytest.mark.parametrize("architecture", ["topk", "transcoder", "skip_transcoder"])
def test_error_stats_with_precomputed_acts_equal_recomputed(
    tmp_path: Path, architecture: str
) -> None:
    """The decode hot path passes its encoding in; the figures must not change."""
    g = torch.Generator().manual_seed(7)
    d_in, d_sae = 16, 40
    w = {
        "W_enc": torch.randn(d_in, d_sae, generator=g),
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=g),
        "b_dec": torch.randn(d_in, generator=g) * 0.1,
    }
    if architecture == "skip_transcoder":
        w["W_skip"] = torch.randn(d_in, d_in, generator=g) * 0.1
    extra = {"k": 5} if architecture == "topk" else {}
    out_hook = None if architecture == "topk" else "blocks.0.hook_mlp_out"
    hook = "blocks.0.hook_resid_post" if architecture == "topk" else "blocks.0.ln2.hook_normalized"
    path = write_dictionary(
        tmp_path / architecture,
        w,
        architecture=architecture,
        hook_name=hook,
        hook_name_out=out_hook,
        **extra,
    )
    d = load_dictionary(path)
    x = torch.randn(6, d_in, generator=g)
    y = torch.randn(6, d_in, generator=g) if d.is_transcoder else None
    a = d.error_stats(x, y)
    b = d.error_stats(x, y, acts=d.encode(x))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
