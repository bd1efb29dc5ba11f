"""The attribution screen (pipeline.engine.attribution) against the plain ways, on tiny random models.

The slope is the derivative of delta_ce in alpha at alpha = 1. It is checked against autograd through
SAE-Lens's own splice (error term kept, feature scaled by alpha at hook_sae_acts_post), against a central
finite difference of the engine's exact delta_ce, and its sparse contraction against the dense one; a
feature that never fires has slope 0 exactly; several layers in one pass give what one layer at a time
gives; ProcessedTransformer and HookedTransformer give the same slopes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.engine import attribution as attr
from pipeline.engine.attribution import ScreenLayer, dense_slope_sums, feature_directions, scored_ce_gradients, screen
from pipeline.engine.forward import FeatureEncoder
from pipeline.engine.run import run_layer
from tests.builders import build_model, build_sae, build_tokens

LAYER = 1  # blocks.1.hook_resid_post of the 3-layer model: the residual entering block 2
HOOK = f"blocks.{LAYER}.hook_resid_post"
RESUME = LAYER + 1


def sparse_sae(**kwargs):
    return build_sae(hook_name=HOOK, enc_bias=-0.3, **kwargs)


def one_layer(model, sae, tokens, **kwargs) -> attr.LayerScreen:
    return screen(model, [ScreenLayer(LAYER, sae, RESUME)], tokens, **kwargs).layers[LAYER]


def sampled_features(layer_screen: attr.LayerScreen, n_top: int = 3, n_random: int = 3, seed: int = 0) -> list[int]:
    """The largest |slope| and a few random firing features: the extremes and the typical."""
    firing = np.flatnonzero(layer_screen.n_firing > 0)
    top = firing[np.argsort(-np.abs(layer_screen.slope[firing]))[:n_top]]
    rest = np.setdiff1d(firing, top)
    rng = np.random.default_rng(seed)
    return [int(f) for f in np.concatenate([top, rng.choice(rest, n_random, replace=False)])]


def assert_equal_up_to_float32_rounding(ours: np.ndarray, expected: np.ndarray) -> None:
    """Slope sums from float32 passes that differ only in operation order or shapes: equal to a millionth of
    the layer's largest slope sum."""
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def splice_delta_ce(sae_model, sae, tokens, feature, alpha: torch.Tensor) -> torch.Tensor:
    """delta_ce's alpha-dependent part through SAE-Lens's splice: mean scored CE with feature i scaled by alpha
    at positions >= 1, differentiable in alpha."""

    def scale(acts, hook):  # noqa: ARG001
        factor = torch.ones_like(acts)
        factor[:, 1:, feature] = 0.0
        mask = 1.0 - factor
        return acts * factor + acts * mask * alpha

    acts_hook = f"{sae.cfg.metadata.hook_name}.hook_sae_acts_post"
    with sae_model.saes([sae], use_error_term=True):
        logits = sae_model.run_with_hooks(tokens, fwd_hooks=[(acts_hook, scale)])
    return torch.nn.functional.cross_entropy(logits[:, 1:-1].reshape(-1, logits.shape[-1]).double(),
                                             tokens[:, 2:].reshape(-1))


@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
def test_slope_is_the_autograd_derivative_through_sae_lens_splice(architecture):
    from sae_lens import HookedSAETransformer

    model = build_model()
    sae_model = build_model(HookedSAETransformer)  # the same weights
    sae = sparse_sae(architecture=architecture)
    tokens = build_tokens(n=6, t=12)
    ours = one_layer(model, sae, tokens)
    features = sampled_features(ours)
    for feature in features:
        alpha = torch.tensor(1.0, requires_grad=True)
        (theirs,) = torch.autograd.grad(splice_delta_ce(sae_model, sae, tokens, feature, alpha), alpha)
        assert abs(ours.slope[feature] - theirs.item()) <= 1e-5 * max(1.0, abs(theirs.item())), feature
    assert np.abs(ours.slope[features]).max() > 1e-3  # the features checked do move the loss


def test_slope_is_a_finite_difference_of_the_engines_exact_delta_ce():
    model = build_model(dtype=torch.float64)  # the engine's logits are float32 whatever the model; the rest is not
    sae = sparse_sae()
    tokens = build_tokens(n=6, t=12)
    ours = one_layer(model, sae, tokens)
    features = sampled_features(ours)
    h = 1e-2
    exact = run_layer(model, sae, RESUME, tokens, features, [1 - h, 1 + h], shortcuts=False)
    delta_ce = (exact.ce_int - exact.ce_clean[None, None]).mean(axis=(2, 3))  # [F, 2]
    central = (delta_ce[:, 1] - delta_ce[:, 0]) / (2 * h)
    scale = np.abs(ours.slope[features]).max()
    np.testing.assert_allclose(ours.slope[features], central, rtol=0, atol=1e-3 * scale)
    # and the clean CE is the engine's
    assert abs(ours.ce_clean - exact.ce_clean.mean()) < 1e-5


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_the_sparse_contraction_equals_the_dense_one(architecture):
    model = build_model()
    sae = sparse_sae(architecture=architecture)
    tokens = build_tokens(n=5, t=12)
    resids, grads, _ = scored_ce_gradients(model, tokens, [RESUME])
    dense = dense_slope_sums(sae, resids[RESUME], grads[RESUME]).numpy()
    for chunk_elems in (1 << 26, 200):  # one chunk; chunks of 3 positions, 12 firing pairs, 5 logit rows
        sparse = one_layer(model, sae, tokens, batch_size=5, chunk_elems=chunk_elems)
        # float32 products summed in float64 against float64 throughout: rounding only
        np.testing.assert_allclose(sparse.slope_sum, dense, rtol=0, atol=1e-6 * np.abs(dense).max())
    acts = sae.encode(resids[RESUME][:, 1:-1]).detach()
    assert np.array_equal(sparse.n_firing, (acts != 0).sum((0, 1)).numpy())
    np.testing.assert_allclose(sparse.max_act, acts.abs().amax((0, 1)).numpy(), rtol=1e-6)  # matmul shape: rounding
    assert sparse.n_scored == 5 * 10


def test_batching_does_not_change_the_screen():
    model = build_model()
    sae = sparse_sae()
    tokens = build_tokens(n=7, t=12)
    whole = one_layer(model, sae, tokens, batch_size=7)
    batched = one_layer(model, sae, tokens, batch_size=3, by_passage=True)
    assert_equal_up_to_float32_rounding(batched.slope_sum, whole.slope_sum)
    assert np.array_equal(batched.n_firing, whole.n_firing)
    # per-passage sums add up to the total, and each passage's is its own screen's
    np.testing.assert_allclose(batched.passage_slope_sum.sum(0), batched.slope_sum, rtol=1e-10, atol=1e-12)
    third = one_layer(model, sae, tokens[2:3])
    np.testing.assert_allclose(batched.passage_slope_sum[2], third.slope_sum, rtol=1e-5, atol=1e-8)


def test_a_feature_that_never_fires_has_slope_exactly_zero():
    model = build_model()
    sae = sparse_sae()
    dead = [4, 17]
    with torch.no_grad():
        sae.b_enc[dead] = -1e4
    tokens = build_tokens(n=4, t=12)
    ours = one_layer(model, sae, tokens)
    assert np.all(ours.slope[dead] == 0.0) and np.all(ours.n_firing[dead] == 0) and np.all(ours.max_act[dead] == 0)
    assert np.all(np.isnan(ours.slope_per_firing[dead]))
    assert set(ours.rank()[dead].tolist()) <= set(range(ours.d_sae - int((ours.slope == 0).sum()) + 1, ours.d_sae + 1))
    assert (ours.n_firing > 0).sum() > 10  # the others do fire


def test_firing_at_bos_or_the_last_position_only_is_not_counted():
    """The intervention never moves BOS, and position T-1 is not scored: neither counts as firing, and a
    push there changes no scored CE."""
    model = build_model()
    sae = sparse_sae()
    tokens = build_tokens(n=4, t=12)
    resids, grads, _ = scored_ce_gradients(model, tokens, [RESUME])
    assert torch.all(grads[RESUME][:, -1] == 0)  # causal: the last position's residual reaches no scored CE
    ours = one_layer(model, sae, tokens)
    acts = sae.encode(resids[RESUME]).detach()
    edge_only = ((acts[:, 0] != 0) | (acts[:, -1] != 0)).any(0) & ~(acts[:, 1:-1] != 0).any((0, 1))
    assert np.all(ours.n_firing[edge_only.numpy()] == 0)
    assert np.all(ours.slope[edge_only.numpy()] == 0)


def test_several_layers_in_one_pass_equal_one_layer_at_a_time():
    model = build_model()
    # resume_at 0 (the embedding), 2, and 3 = n_layers (after the last block, before ln_final)
    specs = [ScreenLayer(layer, build_sae(hook_name=f"blocks.{layer}.hook_resid_pre", seed=layer, enc_bias=-0.3),
                         resume) for layer, resume in ((0, 0), (2, 2), (3, 3))]
    tokens = build_tokens(n=5, t=12)
    together = screen(model, specs, tokens, batch_size=3)
    for spec in specs:
        alone = screen(model, [spec], tokens, batch_size=3).layers[spec.layer]
        assert_equal_up_to_float32_rounding(together.layers[spec.layer].slope_sum, alone.slope_sum)
        assert np.array_equal(together.layers[spec.layer].n_firing, alone.n_firing)
    # and each layer's slope is its exact derivative (layers differ: a wrong hook would not match)
    for spec in specs[1:]:
        layer_screen = together.layers[spec.layer]
        features = sampled_features(layer_screen, 2, 2)
        h = 1e-2
        exact = run_layer(model, spec.sae, spec.resume_at, tokens, features, [1 - h, 1 + h], shortcuts=False)
        delta_ce = (exact.ce_int - exact.ce_clean[None, None]).mean(axis=(2, 3))
        central = (delta_ce[:, 1] - delta_ce[:, 0]) / (2 * h)
        np.testing.assert_allclose(layer_screen.slope[features], central, rtol=0,
                                   atol=2e-3 * np.abs(central).max())


def test_processed_and_hooked_transformer_give_the_same_slopes():
    from tests.load.test_processed import processed_sae, processed_twin

    model = build_model()
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    sae = sparse_sae()
    tokens = build_tokens(n=4, t=12)
    hooked = one_layer(model, sae, tokens)
    processed = one_layer(processed_twin(model), processed_sae(sae), tokens)
    assert_equal_up_to_float32_rounding(processed.slope_sum, hooked.slope_sum)
    assert np.array_equal(processed.n_firing, hooked.n_firing)


@pytest.mark.parametrize("architecture,rescale", [("standard", False), ("jumprelu", False), ("topk", False),
                                                  ("topk", True)])
def test_feature_directions_are_the_engines(architecture, rescale):
    sae = build_sae(architecture=architecture)
    sae.cfg.rescale_acts_by_decoder_norm = rescale
    every = list(range(sae.cfg.d_sae))
    assert torch.equal(feature_directions(sae), FeatureEncoder(sae, every).directions)


@pytest.mark.parametrize("architecture,normalize", [("standard", "layer_norm"), ("topk", "layer_norm"),
                                                    ("standard", "constant_norm_rescale")])
def test_an_input_normalising_sae_is_screened_along_the_direction_its_splice_adds(architecture, normalize):
    """For an SAE that normalises its input, SAE-Lens's splice adds (alpha - 1) * a_i * s_t * d_i
    (pipeline.engine.normalization); the slope is the derivative of that splice, and s_t mattered."""
    from sae_lens import HookedSAETransformer

    model = build_model()
    sae_model = build_model(HookedSAETransformer)
    sae = sparse_sae(architecture=architecture, normalize_activations=normalize)
    tokens = build_tokens(n=4, t=12)
    ours = one_layer(model, sae, tokens)
    unscaled = attr.LayerScreen(LAYER, ours.n_scored, np.zeros(ours.d_sae), ours.n_firing, ours.act_sum, ours.max_act)
    resids, grads, _ = scored_ce_gradients(model, tokens, [RESUME])
    x = resids[RESUME][:, 1:-1].reshape(-1, resids[RESUME].shape[-1])
    g = grads[RESUME][:, 1:-1].reshape(-1, x.shape[-1]).double()
    unscaled.slope_sum = (sae.encode(x).double() * (g @ feature_directions(sae).double().T)).sum(0).detach().numpy()
    for feature in sampled_features(ours, 2, 2):
        alpha = torch.tensor(1.0, requires_grad=True)
        (theirs,) = torch.autograd.grad(splice_delta_ce(sae_model, sae, tokens, feature, alpha), alpha)
        assert abs(ours.slope[feature] - theirs.item()) <= 1e-5 * max(1.0, abs(theirs.item()))
        assert ours.slope[feature] != pytest.approx(unscaled.slope[feature], rel=1e-3)  # s_t mattered


def test_out_of_memory_halves_the_batch_and_counts_nothing_twice(monkeypatch):
    model = build_model()
    sae = sparse_sae()
    tokens = build_tokens(n=10, t=12)
    expected = one_layer(model, sae, tokens, batch_size=2)
    real = attr.scored_ce_gradients
    calls = {"n": 0}

    def flaky(model, tokens, resume_ats, chunk_elems):
        calls["n"] += 1
        if calls["n"] == 2:  # passages 4..7, after 0..3 were added: then 4..5, 6..7, 8..9 by two
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(model, tokens, resume_ats, chunk_elems)

    monkeypatch.setattr(attr, "scored_ce_gradients", flaky)
    result = screen(model, [ScreenLayer(LAYER, sae, RESUME)], tokens, batch_size=4)
    assert result.stats.oom_halvings == 1 and result.stats.batch_size == 2 and calls["n"] == 5
    assert_equal_up_to_float32_rounding(result.layers[LAYER].slope_sum, expected.slope_sum)
    assert np.array_equal(result.layers[LAYER].n_firing, expected.n_firing)


def test_the_screen_table_reads_per_feature():
    model = build_model()
    sae = sparse_sae()
    tokens = build_tokens(n=4, t=12)
    ours = one_layer(model, sae, tokens)
    table = ours.table(alpha=2.0)
    assert len(table) == sae.cfg.d_sae and list(table["feature"]) == list(range(sae.cfg.d_sae))
    first = table.loc[table["rank"] == 1].iloc[0]
    assert abs(first["slope_delta_ce"]) == np.abs(ours.slope).max()
    assert sorted(table["rank"]) == list(range(1, sae.cfg.d_sae + 1))
    np.testing.assert_allclose(table["est_delta_ce"], 1.0 * table["slope_delta_ce"])
    # slope = density x slope per firing position (where it fires)
    fires = table["n_firing"] > 0
    np.testing.assert_allclose(table.loc[fires, "slope_delta_ce"],
                               table.loc[fires, "density"] * table.loc[fires, "slope_per_firing"], rtol=1e-12)
    assert table.loc[fires, "mean_act_firing"].gt(0).all()


def test_the_floor_is_the_same_forward_without_the_contraction():
    model = build_model()
    tokens = build_tokens(n=4, t=12)
    ce = attr.forward_backward(model, tokens, batch_size=3)
    logits = model(tokens)
    expected = torch.nn.functional.cross_entropy(logits[:, 1:-1].reshape(-1, logits.shape[-1]),
                                                 tokens[:, 2:].reshape(-1))
    assert abs(ce - expected.item()) < 1e-5


# ---- second order ----------------------------------------------------------------------------


def test_second_order_is_the_second_derivative_through_sae_lens_splice():
    from sae_lens import HookedSAETransformer

    model = build_model()
    sae_model = build_model(HookedSAETransformer)
    sae = sparse_sae()
    tokens = build_tokens(n=5, t=12)
    ours = one_layer(model, sae, tokens)
    features = sampled_features(ours, 2, 2)
    first, curvature = attr.second_order_sums(model, sae, RESUME, tokens, features, batch_size=3)
    np.testing.assert_allclose(first / ours.n_scored, ours.slope[features], rtol=1e-5, atol=1e-8)
    for fi, feature in enumerate(features):
        alpha = torch.tensor(1.0, requires_grad=True)
        (d1,) = torch.autograd.grad(splice_delta_ce(sae_model, sae, tokens, feature, alpha), alpha, create_graph=True)
        (d2,) = torch.autograd.grad(d1, alpha)
        assert abs(curvature[fi] / ours.n_scored - d2.item()) <= 1e-4 * max(1.0, abs(d2.item())), feature
    assert np.abs(curvature).max() > 0
