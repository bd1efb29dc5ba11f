"""Random-direction controls and the float64 KL/CE: the engine against the plain way, on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.bench.references import float64_reference
from pipeline.engine.controls import random_unit_directions
from pipeline.engine.interventions import INTERVENTIONS
from pipeline.engine.run import run_layer
from tests.builders import build_model, build_sae, build_tokens

LAYER = 1
HOOK = f"blocks.{LAYER}.hook_resid_post"
RESUME = LAYER + 1
FEATURES = [3, 7, 11]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_random_directions_are_unit_seeded_and_independent_of_the_model():
    u = random_unit_directions(1234, 4, [3, 9], 3, 16)
    assert u.shape == (2, 3, 16) and u.dtype == torch.float32
    assert torch.allclose(u.norm(dim=-1), torch.ones(2, 3), atol=1e-6)
    assert torch.equal(u, random_unit_directions(1234, 4, [3, 9], 3, 16))
    # another seed, layer, feature or draw gives another direction
    assert not torch.equal(u[0, 0], random_unit_directions(1235, 4, [3, 9], 3, 16)[0, 0])
    assert not torch.equal(u[0, 0], random_unit_directions(1234, 5, [3, 9], 3, 16)[0, 0])
    assert not torch.equal(u[0, 0], u[1, 0]) and not torch.equal(u[0, 0], u[0, 1])
    assert random_unit_directions(1234, 4, [3], 0, 16) is None


@pytest.mark.parametrize("intervention,values", [("scale", [0.0, 1.0, 4.0]), ("clamp", [0.0, 3.0]),
                                                 ("add", [0.0, -2.0, 5.0])])
@pytest.mark.parametrize("shortcuts", [True, False])
def test_control_rows_equal_the_plain_way(intervention, values, shortcuts):
    model, tokens = build_model(), build_tokens()
    sae = build_sae(enc_bias=-0.5)  # sparse: some passages unchanged, so the shortcuts are exercised
    controls = random_unit_directions(7, LAYER, FEATURES, 2, 16)
    ours = run_layer(model, sae, RESUME, tokens, FEATURES, values, intervention=INTERVENTIONS[intervention],
                     batch_size=4, shortcuts=shortcuts, controls=controls)
    plain = float64_reference(model, sae, tokens, HOOK, FEATURES, values, 3, intervention=intervention,
                              dtype=torch.float32, controls=controls)
    assert ours.ctrl_ce_int.shape == plain["ce_int"].shape == (3, len(values), 2, 6, 10)
    np.testing.assert_allclose(ours.ctrl_ce_int, plain["ce_int"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(ours.ctrl_kl, plain["kl"], rtol=0, atol=2e-6)
    # the feature's own rows are untouched by the controls riding along
    alone = run_layer(model, sae, RESUME, tokens, FEATURES, values, intervention=INTERVENTIONS[intervention],
                      batch_size=4, shortcuts=shortcuts)
    assert np.array_equal(ours.ce_int, alone.ce_int) and np.array_equal(ours.kl, alone.kl)
    assert np.array_equal(ours.delta_sum, alone.delta_sum)


def test_controls_at_the_identity_and_where_the_feature_is_silent_are_the_clean_model():
    model, tokens = build_model(), build_tokens()
    sae = build_sae(enc_bias=-0.5)
    controls = random_unit_directions(7, LAYER, FEATURES, 2, 16)
    res = run_layer(model, sae, RESUME, tokens, FEATURES, [1.0, 3.0], controls=controls)
    assert np.all(res.ctrl_kl[:, 0] == 0) and np.all(res.ctrl_ce_int[:, 0] == res.ce_clean)
    silent = res.acts[:, 1:-1, :] == 0  # [N, S, F]: scale changes nothing there, nor does its control
    first = np.argmax(res.acts[:, 1:, :] != 0, axis=1)  # positions before the first firing are unchanged too
    for f in range(len(FEATURES)):
        for n in range(tokens.shape[0]):
            before = np.arange(res.ctrl_kl.shape[-1]) < first[n, f]
            if silent[n, :, f].all():
                before[:] = True
            assert np.all(res.ctrl_kl[f, 1, :, n, before] == 0)


def test_the_control_moves_the_model_as_much_as_the_feature_pushes():
    """Same per-position norm: a control of a feature that is never pushed (scale at alpha 1) is zero, and
    a control's residual delta has exactly the feature delta's norm at every position."""
    model, tokens = build_model(), build_tokens()
    sae = build_sae()
    controls = random_unit_directions(7, LAYER, FEATURES, 1, 16)
    res = run_layer(model, sae, RESUME, tokens, FEATURES, [0.0], controls=controls)
    assert (res.ctrl_kl > 0).any() and (res.kl > 0).any()


def test_kl_is_non_negative_at_every_position_and_float64_accurate():
    """KL from float32 logits in float64: every position >= 0, and within float32 logit rounding of a float64
    forward pass. The plain float32 sum of p (lp_c - lp_i) over this 8,192-token vocabulary goes negative for
    tiny pushes, so the test can tell the two apart."""
    from pipeline.engine import forward as fwd
    from pipeline.engine.interventions import SCALE

    vocab = 8192
    model, tokens = build_model(d_vocab=vocab), build_tokens(d_vocab=vocab)
    sae = build_sae(enc_bias=-0.5)
    values = [0.0, 0.999, 1.001, 2.0]
    res = run_layer(model, sae, RESUME, tokens, FEATURES, values, shortcuts=False)
    assert np.all(res.kl >= 0)
    ref = float64_reference(model, sae, tokens, HOOK, FEATURES, values, 3)
    np.testing.assert_allclose(res.kl, ref["kl"], rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(res.ce_int, ref["ce_int"], rtol=0, atol=1e-5)
    with torch.inference_mode():
        encoder = fwd.FeatureEncoder(sae, FEATURES)
        clean = fwd.unembed(model, fwd.final_residual(model, fwd.residual_at(model, tokens, RESUME), RESUME))
        lp_c = torch.log_softmax(clean[:, 1:-1], -1)
        lp_i = torch.log_softmax(fwd.intervened_logits(model, encoder, RESUME, tokens, 0, 0.999, SCALE)[:, 1:-1], -1)
        assert ((lp_c.exp() * (lp_c - lp_i)).sum(-1) < 0).any()  # float32: the old way
