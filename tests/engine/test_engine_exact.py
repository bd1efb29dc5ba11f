"""The engine against the plain way: SAE-Lens's own splice and float64 references, random inputs.

The references are the bench's (pipeline/bench/references.py), so the engine is held to one yardstick.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.bench.references import (
    definition_hook,
    definition_metrics,
    feature_encoder,
    float64_reference,
    sae_lens_splice,
)
from pipeline.engine import forward as fwd
from pipeline.engine.interventions import ADD, CLAMP, SCALE
from pipeline.engine.metrics import variant_metrics
from pipeline.engine.run import run_layer
from tests.builders import build_model, build_sae, build_tokens

LAYER = 1  # intervene at blocks.1.hook_resid_post of a 3-layer model
HOOK = f"blocks.{LAYER}.hook_resid_post"
RESUME = LAYER + 1


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0, 4.0])
@pytest.mark.parametrize("sae_hook", [HOOK, f"blocks.{LAYER + 1}.hook_resid_pre"])
def test_engine_logits_equal_sae_lens_splice(alpha, sae_hook):
    from sae_lens import HookedSAETransformer

    model = build_model()
    sae_model = build_model(HookedSAETransformer)  # the same weights
    sae = build_sae(hook_name=sae_hook)
    tokens = build_tokens()
    encoder = fwd.FeatureEncoder(sae, [3, 7, 11])
    for pos, feature in enumerate(encoder.index.tolist()):
        ours = fwd.intervened_logits(model, encoder, RESUME, tokens, pos, alpha, SCALE)
        theirs = sae_lens_splice(sae_model, sae, tokens, feature, alpha)
        assert (ours - theirs).abs().max().item() < 1e-4


def test_alpha_one_forward_is_the_clean_model_bit_for_bit():
    model = build_model()
    sae = build_sae()
    tokens = build_tokens()
    encoder = fwd.FeatureEncoder(sae, [2])
    clean = fwd.unembed(model, fwd.final_residual(model, fwd.residual_at(model, tokens, RESUME), RESUME))
    one = fwd.intervened_logits(model, encoder, RESUME, tokens, 0, 1.0, SCALE)
    assert torch.equal(clean, one)


def test_alpha_one_rows_really_run_give_exactly_zero():
    model = build_model()
    sae = build_sae()
    tokens = build_tokens(n=8)
    res = run_layer(model, sae, RESUME, tokens, [2, 5], [1.0], batch_size=4, shortcuts=False)
    assert res.stats.rows_run == 2 * 8  # every row went through a forward pass
    assert np.array_equal(res.ce_int[:, 0], np.broadcast_to(res.ce_clean, res.ce_int[:, 0].shape))
    assert np.all(res.kl == 0.0)
    assert np.all(res.delta_sum == 0.0)


def test_alpha_zero_equals_ablating_the_feature():
    model = build_model()
    sae = build_sae()
    tokens = build_tokens()
    feature = 9
    encoder = fwd.FeatureEncoder(sae, [feature])

    # written from the definition, not the engine: scale by 0
    ablate = definition_hook(lambda resid: sae.encode(resid)[..., feature], sae.W_dec[feature], "scale", 0.0)
    ablated = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, ablate)])
    ours = fwd.intervened_logits(model, encoder, RESUME, tokens, 0, 0.0, SCALE)
    assert (ours - ablated).abs().max().item() < 1e-5


@pytest.mark.parametrize("resume_at", [0, 1, 2, 3])
def test_resuming_from_the_cached_residual_gives_the_full_forward(resume_at):
    model = build_model()
    tokens = build_tokens()
    full = model(tokens)
    resumed = fwd.unembed(model, fwd.final_residual(model, fwd.residual_at(model, tokens, resume_at), resume_at))
    assert torch.allclose(full, resumed, atol=1e-6, rtol=0)


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_feature_encoder_equals_full_encode(architecture):
    sae = build_sae(architecture=architecture)
    x = torch.randn(4, 10, 16)
    features = [0, 5, 63, 17]
    enc = fwd.FeatureEncoder(sae, features)
    assert enc.column_separable == (architecture != "topk")
    assert torch.allclose(enc(x), sae.encode(x)[..., features], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_the_references_feature_encoder_is_sae_lens_own_encode(architecture, dtype):
    sae = build_sae(architecture=architecture)
    x = torch.randn(4, 10, 16)
    features = [0, 5, 63, 17]
    encode, directions = feature_encoder(sae, features, dtype)
    expected = sae.encode(x)[..., features].to(dtype)
    assert torch.allclose(encode(x.to(dtype)), expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(directions, sae.W_dec[features].to(dtype))


@pytest.mark.parametrize("intervention,value", [(CLAMP, 3.0), (CLAMP, 0.0), (ADD, 1.5)])
def test_other_interventions_match_their_definition(intervention, value):
    model = build_model()
    sae = build_sae()
    tokens = build_tokens()
    feature = 4
    encoder = fwd.FeatureEncoder(sae, [feature])

    hook = definition_hook(lambda resid: sae.encode(resid)[..., feature], sae.W_dec[feature], intervention.name,
                           value)
    expected = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, hook)])
    ours = fwd.intervened_logits(model, encoder, RESUME, tokens, 0, value, intervention)
    assert (ours - expected).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------
# Metrics: the engine's numbers against a float64 reference written from docs/method.md (the model's float32
# forward as is, every metric in float64)


def assert_close(ours: float, ref: float, rtol: float = 1e-4, atol: float = 1e-6):
    if math.isnan(ref):
        assert math.isnan(ours)
    else:
        assert abs(ours - ref) <= atol + rtol * abs(ref), (ours, ref)


@pytest.mark.parametrize("shortcuts", [True, False])
@pytest.mark.parametrize("enc_bias,percentile", [(0.0, 90.0), (-1.2, 90.0), (-1.2, 0.0), (-9.0, 50.0)])
def test_every_metric_equals_the_float64_reference(shortcuts, enc_bias, percentile):
    model = build_model()
    sae = build_sae(enc_bias=enc_bias)
    tokens = build_tokens(n=7, t=14)
    features, values = [1, 8, 30], [0.0, 1.0, 2.5]
    res = run_layer(model, sae, RESUME, tokens, features, values, batch_size=3,
                    live_percentile=percentile, shortcuts=shortcuts)
    defn = float64_reference(model, sae, tokens, HOOK, features, values, batch_size=len(tokens),
                             dtype=torch.float32, live_percentile=percentile)
    for fi in range(len(features)):
        for ai in range(len(values)):
            ours = variant_metrics(res.ce_clean, res.ce_int[fi, ai], res.kl[fi, ai],
                                   res.acts_scored(fi), res.live[fi])
            ref = definition_metrics(defn["ce_clean"], defn["ce_int"][fi, ai], defn["kl"][fi, ai],
                                     defn["acts"][:, 1:-1, fi], percentile)
            for key in ours:
                if key in ("n_passages", "n_scored"):
                    continue
                # kl of an unchanged model is 0 exactly in ours and ~1e-17 in float64
                assert_close(ours[key], ref[key], atol=1e-6), key
            if ref["n_live"] > 0:
                assert np.allclose(res.mean_delta(fi, ai), defn["mean_logit_delta"][fi, ai], atol=1e-5)
            else:
                assert res.live[fi].mask.sum() == 0


def test_empty_live_set_gives_nan_not_zero():
    model = build_model()
    sae = build_sae(enc_bias=-50.0)  # nothing ever fires
    tokens = build_tokens()
    res = run_layer(model, sae, RESUME, tokens, [0], [2.0], batch_size=4)
    m = variant_metrics(res.ce_clean, res.ce_int[0, 0], res.kl[0, 0], res.acts_scored(0), res.live[0])
    assert m["n_live"] == 0
    assert math.isnan(m["delta_ce_live"]) and math.isnan(m["kl_live"]) and math.isnan(m["mean_act_live"])
    assert m["delta_ce"] == 0.0 and m["kl"] == 0.0  # a silent feature changes nothing
    assert res.stats.rows_run == 0


def test_bos_is_never_scored_nor_intervened():
    model = build_model()
    sae = build_sae()
    tokens = build_tokens(n=2, t=10)
    encoder = fwd.FeatureEncoder(sae, [5])
    resid = fwd.residual_at(model, tokens, RESUME)
    x = fwd.intervened_residual(resid, encoder(resid)[..., 0], encoder.directions[0], SCALE, 3.0)
    assert torch.equal(x[:, 0], resid[:, 0])
    res = run_layer(model, sae, RESUME, tokens, [5], [3.0], batch_size=2)
    assert res.ce_clean.shape == (2, 8)  # t = 1 .. T-2


def test_shortcuts_skip_work_without_changing_numbers():
    model = build_model()
    sae = build_sae(enc_bias=-1.5)
    tokens = build_tokens(n=12, t=16)
    kw = dict(features=[0, 1, 2, 3], values=[0.0, 1.0, 4.0], batch_size=5)
    fast = run_layer(model, sae, RESUME, tokens, shortcuts=True, **kw)
    slow = run_layer(model, sae, RESUME, tokens, shortcuts=False, **kw)
    assert fast.stats.rows_run < slow.stats.rows_run
    assert fast.stats.positions_unembedded < slow.stats.positions_unembedded
    np.testing.assert_allclose(fast.ce_int, slow.ce_int, rtol=0, atol=2e-6)
    np.testing.assert_allclose(fast.kl, slow.kl, rtol=0, atol=2e-6)
    np.testing.assert_allclose(fast.delta_sum, slow.delta_sum, rtol=0, atol=1e-4)


def test_batch_size_does_not_change_numbers():
    model = build_model()
    sae = build_sae(enc_bias=-0.5)
    tokens = build_tokens(n=9, t=12)
    a = run_layer(model, sae, RESUME, tokens, [3, 4], [0.0, 2.0], batch_size=1)
    b = run_layer(model, sae, RESUME, tokens, [3, 4], [0.0, 2.0], batch_size=64)
    np.testing.assert_allclose(a.ce_int, b.ce_int, atol=2e-6, rtol=0)
    np.testing.assert_allclose(a.kl, b.kl, atol=2e-6, rtol=0)


def test_small_chunks_give_the_same_numbers():
    model = build_model()
    sae = build_sae()
    tokens = build_tokens(n=5, t=12)
    a = run_layer(model, sae, RESUME, tokens, [3], [0.0, 2.0], batch_size=4, chunk_elems=40 * 3)
    b = run_layer(model, sae, RESUME, tokens, [3], [0.0, 2.0], batch_size=4)
    np.testing.assert_allclose(a.kl, b.kl, atol=1e-6, rtol=0)
    np.testing.assert_allclose(a.ce_int, b.ce_int, atol=1e-6, rtol=0)


def test_out_of_memory_halves_the_batch_and_says_so(monkeypatch, caplog):
    model = build_model()
    sae = build_sae()
    tokens = build_tokens(n=8, t=12)
    expected = run_layer(model, sae, RESUME, tokens, [3], [0.0, 2.0], batch_size=2)

    real = fwd.final_residual
    calls = {"n": 0}

    def flaky(model_, resid, resume_at):
        calls["n"] += 1
        if resid.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model_, resid, resume_at)

    monkeypatch.setattr("pipeline.engine.run.final_residual", flaky)
    with caplog.at_level("WARNING"):
        got = run_layer(model, sae, RESUME, tokens, [3], [0.0, 2.0], batch_size=8)
    assert got.stats.batch_size == 2 and got.stats.oom_halvings == 2
    assert "batch_size halved to 4" in caplog.text and "batch_size halved to 2" in caplog.text
    np.testing.assert_allclose(got.ce_int, expected.ce_int, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got.kl, expected.kl, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got.delta_sum, expected.delta_sum, atol=1e-6, rtol=0)


def test_cached_unembedding_is_transformer_lens_own_bit_for_bit():
    model = build_model()
    final = torch.randn(3, 7, 16)
    with torch.no_grad():
        assert torch.equal(fwd.unembed(model, final), model.unembed(final))
        model.unembed.W_U.add_(1.0)  # a changed weight is not served from the cache
        assert torch.equal(fwd.unembed(model, final), model.unembed(final))
