"""The engine's CE/KL kernel (pipeline.engine.divergence) against the definition, on random logits.

The yardstick is the definition evaluated in numpy's extended precision (80-bit on x86-64, 64-bit mantissa), from
the same float32 logits, so it is far more precise than either float64 way; each case also shows that a float32
way of writing it fails there, so the test can tell.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pipeline.engine import divergence as dv
from pipeline.engine import forward as fwd
from pipeline.engine.interventions import ADD
from pipeline.engine.run import run_layer
from tests.builders import build_model, build_sae, build_tokens

EXTENDED = np.longdouble
pytestmark = pytest.mark.skipif(np.finfo(EXTENDED).nmant < 60, reason="needs an extended-precision long double")


def definition(z_int: torch.Tensor, z_clean: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(CE_int - CE_clean, KL(p_clean || p_int)) per position in extended precision, written so that no term
    cancels: with d = z_int - z_clean (exact), m = logsumexp(z_int) - logsumexp(z_clean) = log1p(sum p expm1(d)),
    log p - log q = m - d =: D, and KL = sum p (D + expm1(-D)), each term >= 0."""
    zi, zc = z_int.numpy().astype(EXTENDED), z_clean.numpy().astype(EXTENDED)
    top = zc.max(-1, keepdims=True)
    lp = zc - top - np.log(np.exp(zc - top).sum(-1, keepdims=True))
    p, d = np.exp(lp), zi - zc
    m = np.log1p((p * np.expm1(d)).sum(-1, keepdims=True))
    big_d = m - d
    kl = (p * (big_d + np.expm1(-big_d))).sum(-1)
    delta_ce = np.take_along_axis(big_d, targets.numpy()[:, None], 1)[:, 0]
    return delta_ce, kl


def kernel(z_int: torch.Tensor, z_clean: torch.Tensor, targets: torch.Tensor):
    """(CE_int - CE_clean, KL, e, CE_clean) by the kernel, from d = z_int - z_clean (exact in float64)."""
    n, vocab = z_clean.shape
    work = dv.Workspace(n, n, vocab, torch.float64, torch.device("cpu"))
    _, ce, total = dv.clean_side(z_clean, targets, work.phi)
    probs = work.phi / total[:, None]
    diff = work.diff.copy_(z_int).sub_(z_clean.double())
    ce_int, kl = dv.scores(diff, probs, ce, targets, work.phi)
    return ce_int - ce, kl, diff, ce


def logits_pair(n: int, vocab: int, change: float, shift: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z_clean = 3.0 * torch.randn(n, vocab, generator=g)
    z_int = (z_clean.double() + shift + change * torch.randn(n, vocab, generator=g, dtype=torch.float64)).float()
    targets = torch.randint(0, vocab, (n,), generator=g)
    return z_int, z_clean, targets


def float32_kl(z_int, z_clean):
    """What the engine did before float64: KL from float32 log-softmaxes."""
    lp, lq = torch.log_softmax(z_clean, -1), torch.log_softmax(z_int, -1)
    return (lp.exp() * (lp - lq)).sum(-1).double().numpy()


@pytest.mark.parametrize("case,change,shift", [
    ("dense", 0.3, 0.0),
    ("sparse: ~1e-7 nats a position", 4e-4, 0.0),
    ("tiny", 3e-6, 0.0),
    ("the logits of every token shifted alike", 4e-4, 1.5),
    ("large", 4.0, -2.0),
])
def test_ce_and_kl_equal_the_definition_on_a_large_vocabulary(case, change, shift):
    z_int, z_clean, targets = logits_pair(6, 50257, change, shift)
    delta_ce, kl, _, _ = kernel(z_int, z_clean, targets)
    ref_delta_ce, ref_kl = definition(z_int, z_clean, targets)
    rel = np.abs(kl.numpy() - ref_kl) / ref_kl
    assert rel.max() < 1e-9, (case, rel.max())
    assert np.all(kl.numpy() >= 0)
    # CE_int - CE_clean to the precision of the logits' change, not of the CE (~10 nats)
    assert np.abs(delta_ce.numpy() - ref_delta_ce).max() < 1e-12 * max(1.0, change + abs(shift)), case
    if change < 1e-3:  # float32 cannot: the reason for float64 (the sparse bench lost 2.6% of its KL this way)
        assert (np.abs(float32_kl(z_int, z_clean) - ref_kl) / ref_kl).max() > 1e-2, case


def test_kl_is_never_negative_and_an_unchanged_position_is_exactly_clean():
    z_int, z_clean, targets = logits_pair(40, 3000, 1e-7)
    z_int[::3] = z_clean[::3]  # every third position unchanged, bit for bit
    delta_ce, kl, _, _ = kernel(z_int, z_clean, targets)
    assert np.all(kl.numpy() >= 0)
    assert np.all(kl[::3].numpy() == 0) and np.all(delta_ce[::3].numpy() == 0)
    assert np.all(kl[1::3].numpy() > 0)


def test_a_logit_rising_past_what_expm1_holds_is_not_finite_and_the_definition_holds_it():
    z_int, z_clean, targets = logits_pair(4, 500, 0.1)
    z_int[1, 7] += 800.0
    _, kl, _, _ = kernel(z_int, z_clean, targets)
    assert not torch.isfinite(kl[1]) and torch.isfinite(kl[[0, 2, 3]]).all()
    ce_int, ref_kl = dv.scores_by_logsumexp(z_int, z_clean, torch.logsumexp(z_clean.double(), -1), targets)
    # the definition, which the engine then uses, has no such limit
    assert torch.isfinite(ref_kl).all() and torch.isfinite(ce_int).all()


def test_the_float64_definition_leaves_its_inputs_alone():
    z_int, z_clean, targets = logits_pair(3, 200, 0.1)
    z_clean64 = z_clean.double()
    before = (z_int.clone(), z_clean64.clone())
    dv.scores_by_logsumexp(z_int, z_clean64, torch.logsumexp(z_clean64, -1), targets)
    assert torch.equal(z_int, before[0]) and torch.equal(z_clean64, before[1])


@pytest.mark.parametrize("shift", [0.0, 2.5])
def test_centred_delta_sum_is_the_sum_of_centred_deltas_whatever_the_shift(shift):
    z_int, z_clean, _ = logits_pair(9, 700, 0.5)
    d = z_int.double() - z_clean.double()
    live = (torch.arange(9) % 2 == 0).float()
    plain = ((d - d.mean(-1, keepdim=True)) * live[:, None]).sum(0)
    shifted = d - shift * torch.linspace(-1, 1, 9, dtype=torch.float64)[:, None]
    assert torch.allclose(dv.centred_delta_sum(shifted, live), plain, rtol=0, atol=1e-12)
    _, _, e, _ = kernel(z_int, z_clean, torch.zeros(9, dtype=torch.long))  # the kernel's shifted difference
    assert torch.allclose(dv.centred_delta_sum(e, live), plain, rtol=0, atol=1e-12)


def test_the_clean_side_is_the_definition_in_float64():
    _, z_clean, targets = logits_pair(5, 1000, 0.0)
    scratch = torch.empty(5, 1000, dtype=torch.float64)
    lse, ce, total = dv.clean_side(z_clean, targets, scratch)
    lp = torch.log_softmax(z_clean.double(), -1)
    assert torch.allclose(lse, torch.logsumexp(z_clean.double(), -1), rtol=1e-15, atol=0)
    assert torch.allclose(ce, -lp.gather(1, targets[:, None])[:, 0], rtol=1e-15, atol=0)
    assert torch.allclose(scratch / total[:, None], lp.exp(), rtol=1e-14, atol=0)


def test_unembedding_into_a_buffer_is_the_same_bits():
    model = build_model()
    final = torch.randn(7, 16)
    out = torch.full((7, model.cfg.d_vocab), float("nan"))
    with torch.inference_mode():  # as the engine runs it: the buffer is written by the addmm itself
        assert torch.equal(fwd.unembed_into(model, final, out), fwd.unembed(model, final))
        assert torch.equal(out, model.unembed(final))
    out.fill_(float("nan"))
    assert torch.equal(fwd.unembed_into(model, final, out), model.unembed(final))  # autograd on: by a copy


@pytest.mark.parametrize("cols", [1, 15, 16, 50257])
def test_aligned_rows_are_a_view_whose_rows_start_on_the_alignment(cols):
    rows = dv.aligned_rows(3, cols, torch.float32, torch.device("cpu"))
    assert rows.shape == (3, cols) and rows.stride(1) == 1
    assert rows.stride(0) % dv.ROW_ALIGN == 0 and cols <= rows.stride(0) < cols + dv.ROW_ALIGN
    assert dv.Workspace(4, 2, cols, torch.float64, torch.device("cpu")).logits.stride(0) == rows.stride(0)


def test_rows_are_aligned_everywhere_but_on_mps():
    assert dv.row_stride(50257, torch.device("cpu")) == 50272 == dv.row_stride(50257, torch.device("cuda"))
    assert dv.row_stride(50272, torch.device("cpu")) == 50272
    assert dv.row_stride(50257, torch.device("mps")) == 50257  # MPS has written wrong values into strided outputs


def test_unembedding_into_aligned_rows_is_the_same_bits_as_into_contiguous_ones():
    """The engine's logits buffer (`Workspace.logits`) has aligned rows: the products written there, in place,
    are those of a contiguous output (random weights and residuals of GPT-2's shapes, pieces of several sizes)."""
    model = build_model(d_vocab=50257)
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for n in (1, 5, 40):
            final = torch.randn(n, model.cfg.d_model, generator=g)
            out = dv.aligned_rows(n, model.cfg.d_vocab, torch.float32, torch.device("cpu"))
            assert fwd.unembed_into(model, final, out).data_ptr() == out.data_ptr()
            assert torch.equal(out, fwd.unembed(model, final))
            fwd.unembed_difference_into(model, final, out)
            assert torch.equal(out, fwd.unembed_difference_into(model, final, torch.empty(n, model.cfg.d_vocab)))


@pytest.mark.parametrize("shortcuts", [True, False])
def test_the_engine_scores_as_the_float64_log_softmax_does(shortcuts, monkeypatch):
    """The whole engine, kernel against reference scoring on the same logits (the route of models whose logits are
    not affine in the final residual): the same numbers to float64 rounding, tiny pushes (alpha near 1) included."""
    monkeypatch.setattr("pipeline.engine.run.unembeds_differences", lambda _model: False)
    vocab = 2048
    model, tokens = build_model(d_vocab=vocab), build_tokens(n=6, t=14, d_vocab=vocab)
    sae = build_sae(enc_bias=-0.4)
    values = [0.0, 0.999, 1.0, 1.001, 3.0]
    kw = dict(batch_size=4, shortcuts=shortcuts)
    fast = run_layer(model, sae, 2, tokens, [3, 9], values, **kw)
    ref = run_layer(model, sae, 2, tokens, [3, 9], values, reference_scoring=True, **kw)
    assert np.array_equal(fast.ce_clean, ref.ce_clean)
    np.testing.assert_allclose(fast.kl, ref.kl, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(fast.ce_int, ref.ce_int, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fast.delta_sum, ref.delta_sum, rtol=0, atol=1e-9)
    assert (fast.kl[:, [1, 3]] > 0).any() and (fast.kl[:, [1, 3]] < 1e-6).all()  # the tiny pushes are there


def test_unembedding_the_change_is_as_close_to_a_float64_forward_as_the_logits_are():
    """The engine's own route (rows unembed h_int - h_clean, several rows a call) against the float64 definition
    (forward passes in float64): per-variant mean KL and delta-CE as close as scoring the float32 logits is."""
    from pipeline.bench.references import float64_reference

    vocab = 2048
    model, tokens = build_model(d_vocab=vocab), build_tokens(n=6, t=14, d_vocab=vocab)
    sae = build_sae(enc_bias=-0.4)
    values = [0.0, 0.999, 1.001, 3.0]
    exact = float64_reference(model, sae, tokens, "blocks.1.hook_resid_post", [3, 9], values, 6)
    errors = {}
    for name, kw in (("kernel", {}), ("reference", {"reference_scoring": True})):
        res = run_layer(model, sae, 2, tokens, [3, 9], values, batch_size=4, shortcuts=False, **kw)
        kl_err = np.abs(res.kl.mean((2, 3)) - exact["kl"].mean((2, 3))) / exact["kl"].mean((2, 3))
        dce = (res.ce_int - res.ce_clean).mean((2, 3)) - (exact["ce_int"] - exact["ce_clean"]).mean((2, 3))
        errors[name] = (kl_err.max(), np.abs(dce).max())
        assert np.all(res.kl >= 0)
    assert errors["kernel"][0] <= 1.5 * errors["reference"][0] + 1e-12, errors
    assert errors["kernel"][1] <= 1.5 * errors["reference"][1] + 1e-15, errors
    assert errors["kernel"][0] < 1e-3, errors  # float32 forwards, not the scoring, limit both


def test_an_overflowing_feature_is_scored_again_by_the_definition_and_alone(caplog):
    """Without a final layer norm the logits grow with the push, so adding 1e5 times a feature's direction lifts
    some logit by more than expm1 holds in float64; the engine notices and scores that feature's rows by the
    definition, and leaves the other feature's numbers as they are without it (shards run blocks of features)."""
    vocab = 64
    model, tokens = build_model(d_vocab=vocab, normalization_type=None), build_tokens(n=4, t=10, d_vocab=vocab)
    sae = build_sae()
    with torch.no_grad():
        sae.W_dec[9] *= 1e-5  # feature 9's push stays small: scored by the kernel
    kw = dict(intervention=ADD, batch_size=2)
    with caplog.at_level(logging.WARNING):
        fast = run_layer(model, sae, 2, tokens, [3, 9], [1.0, 1e5], **kw)
    assert "scored again by the float64 log-softmax" in caplog.text
    ref = run_layer(model, sae, 2, tokens, [3, 9], [1.0, 1e5], reference_scoring=True, **kw)
    assert np.isfinite(fast.kl).all() and np.isfinite(fast.ce_int).all()
    assert fast.kl[0].max() > 709 and fast.kl[1].max() < 1
    # feature 3: the definition's numbers (the positions no row scores keep the kernel block's ce_clean)
    assert np.array_equal(fast.kl[0], ref.kl[0])
    np.testing.assert_allclose(fast.ce_int[0], ref.ce_int[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(fast.delta_sum[0], ref.delta_sum[0], rtol=1e-12)
    assert (fast.kl[1] >= 0).all() and (fast.kl[1] > 0).any()  # feature 9: the kernel's
    for f in range(2):  # each feature alone: the same bits, overflowed or not
        alone = run_layer(model, sae, 2, tokens, [[3, 9][f]], [1.0, 1e5], **kw)
        assert np.array_equal(alone.kl[0], fast.kl[f]) and np.array_equal(alone.ce_int[0], fast.ce_int[f])
        assert np.array_equal(alone.delta_sum[0], fast.delta_sum[f])
