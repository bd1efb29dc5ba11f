"""Issue 13, item 9: robustness defects, each with its test (tiny random models, no download).

1. `feature_source: auto` at `hook: resid_pre` (and every hook the pipeline accepts) measures the
   tensor the engine intervenes on, instead of stopping the forward pass before the hook runs.
2. Features with negative activations (AbsTopK) fire where a != 0: density, the live set, auto
   selection and snippets treat a feature and its sign-flipped twin alike; for non-negative
   activations every number is the same as before, bit for bit.
3. A local model with non-causal attention is refused at loading (the engine's "positions before
   the first change are clean" shortcut assumes causal attention).
4. The direction the engine adds is feature i's contribution to SAE-Lens's own reconstruction for
   every architecture it accepts (TopK with rescale_acts_by_decoder_norm included), checked
   against SAE-Lens's decode and its splice; the others are refused in one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.bench.references import float64_reference, sae_lens_splice
from pipeline.core.errors import UserError
from pipeline.core.plan.hooks import hook_name, resume_index
from pipeline.core.plan.layers import LayerPlan
from pipeline.engine import forward as fwd
from pipeline.engine.interventions import SCALE
from pipeline.engine.metrics import density, live_positions, max_activation, variant_metrics
from pipeline.engine.run import run_layer
from pipeline.engine.snippets import top_contexts
from pipeline.load import library as loading
from pipeline.load.tokenizer import ByteTokenizer
from pipeline.sources.auto import activation_stats, choose_auto, firing_profiles
from tests.builders import build_model, build_model_cfg, build_sae, build_tokens

N_LAYERS = 3


def _plan(hook: str, layer: int) -> LayerPlan:
    return LayerPlan(layer=layer, hook=hook_name(hook, layer), resume_at=resume_index(hook, layer),
                     sae_release="local", sae_id=f"{hook}_{layer}", neuronpedia=None)


def build_any_sae(architecture: str, d_in: int = 16, d_sae: int = 64, hook: str = "blocks.1.hook_resid_post",
                  seed: int = 0, **cfg):
    """A random SAE of any SAE-Lens inference architecture, decoder rows of uneven norms."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
        "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
        "abstopk": (sae_lens.AbsTopKSAE, sae_lens.AbsTopKSAEConfig),
        "matching_pursuit": (sae_lens.MatchingPursuitSAE, sae_lens.MatchingPursuitSAEConfig),
        "temporal": (sae_lens.TemporalSAE, sae_lens.TemporalSAEConfig),
        "transcoder": (sae_lens.Transcoder, sae_lens.TranscoderConfig),
    }
    sae_cls, cfg_cls = classes[architecture]
    meta = SAEMetadata(hook_name=hook, model_name="tiny", hook_head_index=None, prepend_bos=True)
    torch.manual_seed(seed)
    sae = sae_cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=meta, **cfg))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "W_dec":
                p.copy_(torch.randn_like(p) / d_in**0.5 * torch.exp(0.7 * torch.randn(p.shape[0], 1)))
            elif name == "threshold":
                p.copy_(0.2 * torch.rand_like(p))
            elif p.ndim == 2:
                p.copy_(torch.randn_like(p) / d_in**0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return sae.eval()


def _firing(sae, x: torch.Tensor, n: int) -> list[int]:
    """The n features that fire (a != 0) at the most positions of x."""
    acts = sae.encode(x).detach()
    return torch.argsort((acts != 0).flatten(0, -2).sum(0), descending=True, stable=True)[:n].tolist()


# ---------------------------------------------------------------------------------------------
# 1. auto selection at every hook the pipeline accepts


@pytest.mark.parametrize("hook", ["resid_pre", "resid_post"])
def test_auto_statistics_read_the_engines_residual_at_every_hook(hook):
    model = build_model(d_vocab=257)
    plans = {layer: _plan(hook, layer) for layer in range(N_LAYERS)}
    saes = {layer: build_sae(hook_name=plans[layer].hook, enc_bias=-0.5, seed=layer) for layer in plans}
    tokens = build_tokens(n=6, t=16, d_vocab=257, bos=256).numpy()
    counts, maxes, n_scored = activation_stats(model, saes, plans, tokens, batch_size=4)
    tok = torch.from_numpy(tokens).long()
    for layer, plan in plans.items():
        # the tensor the engine intervenes on: the residual entering block resume_at
        acts = saes[layer].encode(fwd.residual_at(model, tok, plan.resume_at)[:, 1:-1]).detach()
        assert np.array_equal(counts[layer], (acts != 0).sum(dim=(0, 1)).numpy())
        assert np.array_equal(maxes[layer], acts.abs().amax(dim=(0, 1)).numpy())
    choices = choose_auto(model, saes, plans, tokens, ByteTokenizer(), k=2, min_density=0.0, max_density=1.0,
                          batch_size=4)
    assert [c.layer for c in choices] == [0, 0, 1, 1, 2, 2]


# ---------------------------------------------------------------------------------------------
# 2. negative activations fire


def _old_live(acts: np.ndarray, percentile: float) -> tuple[float, np.ndarray]:
    """The live set as defined before issue 13 (a > max(0, q), q of a), for non-negative activations."""
    thr = max(0.0, float(np.percentile(acts.astype(np.float64), percentile)))
    return thr, acts > thr


def _old_top_contexts(acts: np.ndarray, n: int) -> list[tuple[int, int, float]]:
    """Snippet contexts as chosen before issue 13 (strongest a > 0 per passage)."""
    best_t = acts.argmax(axis=1)
    best = acts[np.arange(acts.shape[0]), best_t]
    order = np.lexsort((np.arange(len(best)), -best))
    return [(int(p), int(best_t[p]) + 1, float(best[p])) for p in order[:n] if best[p] > 0]


@pytest.mark.parametrize("percentile", [0.0, 50.0, 90.0, 99.5, 100.0])
def test_non_negative_activations_keep_their_numbers_bit_for_bit(percentile):
    rng = np.random.default_rng(0)
    acts = (rng.standard_normal((7, 30)).clip(min=0) * rng.random((7, 30))).astype(np.float32)
    acts[2] = 0.0
    thr, mask = _old_live(acts, percentile)
    live = live_positions(acts, percentile)
    assert live.threshold == thr and np.array_equal(live.mask, mask)
    assert density(acts) == float((acts > 0).mean())
    assert max_activation(acts) == float(acts.max())
    assert top_contexts(acts, 4) == _old_top_contexts(acts, 4)


def test_a_negative_feature_fires_and_is_live_where_its_magnitude_is_high():
    rng = np.random.default_rng(1)
    pos = (rng.standard_normal((6, 20)).clip(min=0)).astype(np.float32)
    neg = -pos
    for acts in (pos, neg):
        assert density(acts) == float((pos > 0).mean()) > 0
        assert max_activation(acts) == float(pos.max())
    live_pos, live_neg = live_positions(pos, 90.0), live_positions(neg, 90.0)
    assert live_neg.mask.any() and np.array_equal(live_pos.mask, live_neg.mask)
    assert live_pos.threshold == live_neg.threshold
    pos_ctx, neg_ctx = top_contexts(pos, 3), top_contexts(neg, 3)
    assert len(neg_ctx) == 3 and [c[:2] for c in neg_ctx] == [c[:2] for c in pos_ctx]
    assert [c[2] for c in neg_ctx] == [-c[2] for c in pos_ctx]


def _sign_flipped(sae):
    """The same SAE with every feature's sign convention flipped: a -> -a, W_dec[i] -> -W_dec[i]."""
    import copy

    twin = copy.deepcopy(sae)
    with torch.no_grad():
        twin.W_enc.neg_()
        twin.b_enc.neg_()
        twin.W_dec.neg_()
    return twin


def test_abstopk_features_and_their_sign_flipped_twins_are_treated_alike():
    model = build_model(d_vocab=257)
    plan = _plan("resid_post", 1)
    sae = build_any_sae("abstopk", k=8, hook=plan.hook)
    twin = _sign_flipped(sae)
    tokens = build_tokens(n=8, t=16, d_vocab=257, bos=256).numpy()
    tok = torch.from_numpy(tokens).long()
    resid = fwd.residual_at(model, tok, plan.resume_at)
    assert torch.allclose(twin.encode(resid), -sae.encode(resid))
    assert (sae.encode(resid) < 0).any()  # some features fire negatively

    stats = activation_stats(model, {1: sae}, {1: plan}, tokens, batch_size=4)
    twin_stats = activation_stats(model, {1: twin}, {1: plan}, tokens, batch_size=4)
    assert np.array_equal(stats[0][1], twin_stats[0][1]) and np.allclose(stats[1][1], twin_stats[1][1])
    kw = dict(tokens=tokens, tokenizer=ByteTokenizer(), k=3, min_density=0.01, max_density=0.5, batch_size=4)
    chosen = choose_auto(model, {1: sae}, {1: plan}, **kw)
    assert [(c.feature, c.label, c.density) for c in chosen] == \
        [(c.feature, c.label, c.density) for c in choose_auto(model, {1: twin}, {1: plan}, **kw)]
    features = [c.feature for c in chosen]
    profiles = firing_profiles(model, twin, plan, tokens, features, batch_size=4)
    acts = sae.encode(resid).detach()[:, 1:-1]
    for f in features:
        assert sum(profiles[f].on.values()) == int((acts[..., f] != 0).sum())

    # the engine: same live sets, same effects (the delta (alpha - 1) a W_dec[i] is unchanged)
    values = [0.0, 2.0]
    res = run_layer(model, sae, plan.resume_at, tok, features, values, batch_size=4)
    res_twin = run_layer(model, twin, plan.resume_at, tok, features, values, batch_size=4)
    for fi in range(len(features)):
        assert res_twin.live[fi].mask.any()
        assert np.array_equal(res.live[fi].mask, res_twin.live[fi].mask)
        for ai in range(len(values)):
            m = variant_metrics(res.ce_clean, res.ce_int[fi, ai], res.kl[fi, ai], res.acts_scored(fi), res.live[fi])
            t = variant_metrics(res_twin.ce_clean, res_twin.ce_int[fi, ai], res_twin.kl[fi, ai],
                                res_twin.acts_scored(fi), res_twin.live[fi])
            for key in ("delta_ce", "kl", "delta_ce_live", "kl_live", "n_live"):
                assert abs(m[key] - t[key]) <= 1e-6 + 1e-4 * abs(m[key]), key


def test_abstopk_engine_equals_the_float64_definition():
    model = build_model()
    plan = _plan("resid_post", 1)
    sae = build_any_sae("abstopk", k=8, hook=plan.hook)
    tokens = build_tokens(n=6, t=12)
    features = _firing(sae, fwd.residual_at(model, tokens, plan.resume_at), 3)
    values = [0.0, 2.0]
    res = run_layer(model, sae, plan.resume_at, tokens, features, values, batch_size=4)
    ref = float64_reference(model, sae, tokens, plan.hook, features, values, batch_size=6, live_percentile=90.0)
    np.testing.assert_allclose(res.ce_int, ref["ce_int"], atol=2e-5, rtol=0)
    np.testing.assert_allclose(res.kl, ref["kl"], atol=2e-5, rtol=0)
    for fi in range(len(features)):
        assert res.live[fi].mask.any()
        for ai in range(len(values)):
            np.testing.assert_allclose(res.mean_delta(fi, ai), ref["mean_logit_delta"][fi, ai], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# 3. non-causal attention


@pytest.mark.parametrize("attention_dir", ["causal", "bidirectional"])
def test_a_local_model_with_non_causal_attention_is_refused(tmp_path, attention_dir):
    kwargs = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=24, d_vocab=40, act_fn="gelu_new",
                  normalization_type="LN", seed=0, attention_dir=attention_dir)
    from transformer_lens import HookedTransformer

    model = HookedTransformer(build_model_cfg(**kwargs))
    loading.save_local_model(model, tmp_path / "m", kwargs, {"kind": "bytes"})
    assert json.loads((tmp_path / "m" / loading.MODEL_CONFIG).read_text())["attention_dir"] == attention_dir
    if attention_dir == "causal":
        assert loading.model_from_source(str(tmp_path / "m"), torch.device("cpu"), "float32").cfg.attention_dir == "causal"
    else:
        with pytest.raises(UserError, match=r"attention_dir 'bidirectional'.*only causal"):
            loading.model_from_source(str(tmp_path / "m"), torch.device("cpu"), "float32")


# ---------------------------------------------------------------------------------------------
# 4. the direction is the feature's contribution to SAE-Lens's reconstruction

SUPPORTED = [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("jumprelu", {}),
    ("gated", {}),
    ("topk", {"k": 8}),
    ("topk", {"k": 8, "rescale_acts_by_decoder_norm": True}),
    ("abstopk", {"k": 8}),
    ("abstopk", {"k": 8, "rescale_acts_by_decoder_norm": True}),
    ("matching_pursuit", {"max_iterations": 6}),
]


def _ids(case):
    arch, cfg = case
    return "-".join([arch, *(f"{k}={v}" for k, v in cfg.items() if k not in ("k", "max_iterations"))])


@pytest.mark.parametrize("case", SUPPORTED, ids=_ids)
def test_activation_times_direction_is_the_features_part_of_sae_lens_decode(case):
    arch, cfg = case
    sae = build_any_sae(arch, **cfg)
    loading.check_sae(sae, _plan("resid_post", 1))  # accepted
    x = torch.randn(3, 10, 16)
    encoder = fwd.FeatureEncoder(sae, list(range(sae.cfg.d_sae)))
    with torch.no_grad():
        acts = encoder(x)
        assert torch.allclose(acts, sae.encode(x), atol=1e-6, rtol=0)
        ours = acts @ encoder.directions + sae.decode(torch.zeros_like(acts))
        assert torch.allclose(ours, sae.decode(sae.encode(x)), atol=1e-5, rtol=0)


def _forward_splice(model, sae, hook: str, tokens: torch.Tensor, feature: int, alpha: float) -> torch.Tensor:
    """SAE-Lens's SAE.forward with its error term, written out at the hook: decode(acts with feature
    scaled at t >= 1) + (x - decode(acts)). For a MatchingPursuitSAE, whose encode never runs
    hook_sae_acts_post, this is the only way to scale a feature in SAE-Lens."""

    def splice(resid, hook):  # noqa: ARG001
        acts = sae.encode(resid)
        scaled = acts.clone()
        scaled[:, 1:, feature] *= alpha
        return sae.decode(scaled) + (resid - sae.decode(acts))

    return model.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])


@pytest.mark.parametrize("alpha", [0.0, 2.0])
@pytest.mark.parametrize("case", SUPPORTED, ids=_ids)
def test_engine_logits_equal_sae_lens_splice_for_every_accepted_sae(case, alpha):
    from sae_lens import HookedSAETransformer

    arch, cfg = case
    model = build_model()
    sae_model = build_model(HookedSAETransformer)  # the same weights
    plan = _plan("resid_post", 1)
    sae = build_any_sae(arch, hook=plan.hook, **cfg)
    tokens = build_tokens()
    features = _firing(sae, fwd.residual_at(model, tokens, plan.resume_at), 3)
    encoder = fwd.FeatureEncoder(sae, features)
    for pos, feature in enumerate(features):
        with torch.no_grad():
            ours = fwd.intervened_logits(model, encoder, plan.resume_at, tokens, pos, alpha, SCALE)
            spliced = _forward_splice(model, sae, plan.hook, tokens, feature, alpha)
            assert (ours - spliced).abs().max().item() < 1e-4
            if arch != "matching_pursuit":  # its hook_sae_acts_post never fires, so the hooked splice is a no-op
                theirs = sae_lens_splice(sae_model, sae, tokens, feature, alpha)
                assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("case,message", [
    (("temporal", {"n_heads": 2, "bottleneck_factor": 4}), "temporal SAE"),
    (("transcoder", {"d_out": 16, "apply_b_dec_to_input": False}), "transcoder"),
    (("standard", {"normalize_activations": "expected_average_only_in"}), "normalises its input"),
])
def test_saes_whose_splice_is_not_a_feature_direction_are_refused_in_one_line(case, message):
    arch, cfg = case
    sae = build_any_sae(arch, **cfg)
    with pytest.raises(UserError, match=message) as exc:
        loading.check_sae(sae, _plan("resid_post", 1))
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match=message):
        fwd.FeatureEncoder(sae, [0, 1])
