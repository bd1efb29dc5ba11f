"""The processed model and SAE tensors (pipeline.load.processed) give the same bits as TransformerLens
and SAE-Lens: ProcessedTransformer against HookedTransformer, ProcessedSAE against SAE-Lens's
encoders, on random weights, and the model stage's processed files against `from_pretrained` on the
hub twin."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipeline.load.processed.model import POST_NORM_ARCHITECTURES, ProcessedTransformer, unsupported_reason
from pipeline.load.processed.sae import ProcessedSAE, sae_kind
from tests.builders import build_model, build_sae, build_tokens

CONFIGS = {
    "toy-like (LN, gelu)": dict(act_fn="gelu"),
    "gpt2-like (gelu_new)": dict(act_fn="gelu_new"),
    "relu, no attention scale": dict(act_fn="relu", use_attn_scale=False),
    "scaled by layer index, silu": dict(act_fn="silu", scale_attn_by_inverse_layer_idx=True),
}


def processed_twin(model) -> ProcessedTransformer:
    cfg = dict(model.cfg.to_dict())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ProcessedTransformer(cfg, state)


@pytest.mark.parametrize("fold", [False, True], ids=["as built", "weights processed (LNPre)"])
@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_processed_transformer_is_hooked_transformer_bit_for_bit(overrides, fold):
    model = build_model(**overrides)
    if fold:
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
        assert model.cfg.normalization_type == "LNPre"
    ours = processed_twin(model)
    tokens = build_tokens(n=3, t=20)
    with torch.inference_mode():
        assert torch.equal(ours(tokens), model(tokens))
        for k in range(model.cfg.n_layers + 1):
            resid = model(tokens, stop_at_layer=k)
            assert torch.equal(ours(tokens, stop_at_layer=k), resid)
            n = model.cfg.n_layers
            assert torch.equal(ours(resid, start_at_layer=k, stop_at_layer=n),
                               model(resid, start_at_layer=k, stop_at_layer=n))
        final = model(tokens, stop_at_layer=model.cfg.n_layers)
        assert torch.equal(ours.ln_final(final), model.ln_final(final))
        assert torch.equal(ours.unembed(final), model.unembed(final))
    assert torch.equal(ours.W_U, model.W_U)


def test_processed_transformer_runs_the_engine_to_the_same_numbers():
    from pipeline.engine.run import run_layer

    model = build_model(act_fn="gelu_new")
    tokens = build_tokens(n=5, t=16)
    sae = build_sae(d_in=16, d_sae=64, hook_name="blocks.1.hook_resid_post", enc_bias=-0.2)
    a = run_layer(model, sae, 2, tokens, [1, 5, 9], [0.0, 1.0, 2.5], batch_size=3)
    b = run_layer(processed_twin(model), sae, 2, tokens, [1, 5, 9], [0.0, 1.0, 2.5], batch_size=3)
    for name in ("acts", "ce_clean", "ce_int", "kl", "delta_sum"):
        assert (getattr(a, name) == getattr(b, name)).all(), name


@pytest.mark.parametrize(("overrides", "reason"), [
    (dict(positional_embedding_type="rotary"), "positional_embedding_type"),
    (dict(attn_only=True), "attn_only"),
    (dict(n_key_value_heads=1), "n_key_value_heads"),
    (dict(normalization_type="RMS"), "normalization_type"),
    (dict(act_fn="solu_ln"), "act_fn"),
])
def test_configurations_it_does_not_mirror_are_named(overrides, reason):
    cfg = dict(build_model(**overrides).cfg.to_dict())
    assert reason in unsupported_reason(cfg)
    with pytest.raises(ValueError, match=reason):
        ProcessedTransformer(cfg, {})


def test_the_post_norm_list_is_transformer_lens_own():
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES as theirs

    assert POST_NORM_ARCHITECTURES == frozenset(theirs)


def processed_sae(sae) -> ProcessedSAE:
    entry = {"architecture": sae.cfg.architecture(), "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
             "normalize_activations": sae.cfg.normalize_activations, "reshape_activations": "none"}
    return ProcessedSAE(entry, {k: v.detach().clone() for k, v in sae.state_dict().items()})


@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
@pytest.mark.parametrize("b_dec_in", [True, False])
def test_processed_sae_encodes_and_decodes_as_sae_lens(architecture, b_dec_in):
    from pipeline.engine.forward import FeatureEncoder

    sae = build_sae(d_in=16, d_sae=64, architecture=architecture, enc_bias=-0.1)
    sae.cfg.apply_b_dec_to_input = b_dec_in
    ours = processed_sae(sae)
    x = torch.randn(4, 7, 16)
    with torch.inference_mode():
        acts = sae.encode(x)
        assert (acts > 0).any() and (acts == 0).any()
        assert torch.equal(ours.encode(x), acts)
        assert torch.equal(ours.decode(acts), sae.decode(acts))
        features = [0, 3, 17, 40]
        theirs_enc, ours_enc = FeatureEncoder(sae, features), FeatureEncoder(ours, features)
        assert ours_enc.column_separable and theirs_enc.column_separable
        assert torch.equal(ours_enc(x), theirs_enc(x))
        torch.testing.assert_close(ours_enc(x), acts[..., features])  # one column vs the full matmul
    assert sae_kind(ours) == sae_kind(sae) == architecture


def test_other_architectures_are_left_to_sae_lens():
    from pipeline.load.processed.sae import unsupported_reason as sae_reason

    sae = build_sae(architecture="topk")
    assert sae_kind(sae) == "TopKSAE"
    assert "architecture topk" in sae_reason({"architecture": sae.cfg.architecture()})
    assert "normalize_activations" in sae_reason({"architecture": "standard", "normalize_activations": "layer_norm"})


# ---- the model stage's files on the hub twin ----------------------------------------------------

def test_processed_files_give_from_pretrained_logits_on_the_hub_twin(hub_twin, tmp_path, monkeypatch):
    """The model stage's processed GPT-2 (HookedTransformer and ProcessedTransformer) against
    HookedTransformer.from_pretrained with the release's kwargs: bit-identical logits; the SAEs'
    tensors are read from the cached SAE-Lens files themselves."""
    import huggingface_hub.constants as c

    from pipeline.core.artifacts import processed_dir
    from pipeline.core.params.config import parse_params
    from pipeline.core.plan.layers import plan_layers
    from pipeline.core.plan.record import ModelRecord
    from pipeline.load.hub import snapshot_record
    from pipeline.load.library import model_from_source, sae_from_source
    from pipeline.load.prepare import _hub_sae_files, _sae_weights_file
    from pipeline.load.processed.store import (
        fast_model,
        fast_sae,
        hooked_model,
        write_processed,
    )
    from pipeline.twin.build import RELEASE

    home = hub_twin
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    cpu = torch.device("cpu")
    config = parse_params({"device": "cpu", "layers": [2, 11]})
    plans = plan_layers(config)
    files = _hub_sae_files(config, plans, revision=None)  # unpinned: the cached snapshot
    saes = {p.layer: sae_from_source(RELEASE, p, cpu, "float32") for p in plans}
    model = model_from_source("gpt2-small", cpu, "float32", {"center_writing_weights": True})
    write_processed("gpt2-small", model, saes, {p.layer: _sae_weights_file(config, p, files) for p in plans})
    index = json.loads((processed_dir("gpt2-small") / "saes.json").read_text())
    assert {e["tensors"] for e in index.values()} == {"source"}

    record = ModelRecord.from_dict({
        "preset": "gpt2-small", "sae_release": RELEASE, "hook": "resid_post",
        "model": {"name": "gpt2-small", "source": "hub", "n_layers": 12, "d_model": 64, "n_ctx": 1024,
                  "d_vocab": model.cfg.d_vocab},
        "tokenizer": {"type": "hf", "name": "gpt2"},
        "layers": [p.to_dict() | {"d_sae": int(saes[p.layer].cfg.d_sae),
                                  "hub": [snapshot_record(f) for f in files[p.layer]]}
                   for p in plans],
    })
    fresh = model_from_source("gpt2-small", cpu, "float32", {"center_writing_weights": True})
    hooked = hooked_model(record, cpu, torch.float32)
    fast = fast_model(record, cpu, torch.float32)
    assert isinstance(fast, ProcessedTransformer)
    tokens = fresh.to_tokens(["The cat sat on the mat.", "Lists are mutable sequences of objects"])
    with torch.inference_mode():
        logits = fresh(tokens)
        assert torch.equal(hooked(tokens), logits)
        assert torch.equal(fast(tokens), logits)
    for p in plans:
        sae = fast_sae(record, p, cpu, "float32")
        x = torch.randn(3, 5, 64)
        with torch.inference_mode():
            assert torch.equal(sae.encode(x), saes[p.layer].encode(x))
    assert os.path.getsize(processed_dir("gpt2-small") / "model.safetensors") > 0
