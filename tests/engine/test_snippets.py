"""Unit tests of the per-feature detail: top-activating contexts and the direct logit effect, on a tiny
random model and SAE (tests/builders.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.engine.forward import FeatureEncoder
from pipeline.engine.interventions import SCALE
from pipeline.engine.snippets import (
    CONTEXT_CHARS_AFTER,
    CONTEXT_CHARS_BEFORE,
    TOP_PREDICTIONS,
    direct_logit_effect,
    feature_snippets,
    top_contexts,
)
from tests.builders import build_model, build_sae, build_tokens

LAYER = 1
HOOK = f"blocks.{LAYER}.hook_resid_post"
RESUME = LAYER + 1  # resid_post: the suffix resumes at the next block
T = 40
D_VOCAB = 40
WIDTH = 12  # characters per token string


class FixedWidthTokenizer:
    """Every token prints as WIDTH characters, so context bounds in characters are token counts."""

    bos_token_id = 0
    vocab_size = D_VOCAB

    def encode(self, text):  # pragma: no cover - not used
        raise NotImplementedError

    def token_str(self, token_id: int) -> str:
        s = f"[token-{int(token_id):04d}]"
        assert len(s) == WIDTH
        return s


def expected_bounds(t: int, length: int) -> tuple[int, int]:
    """[lo, hi) holding at least CONTEXT_CHARS_BEFORE characters before t and CONTEXT_CHARS_AFTER
    after it where the passage allows, BOS (position 0) never included."""
    lo = max(1, t - math.ceil(CONTEXT_CHARS_BEFORE / WIDTH))
    hi = min(length, t + 1 + math.ceil(CONTEXT_CHARS_AFTER / WIDTH))
    return lo, hi


@pytest.fixture(scope="module")
def setup():
    model = build_model(n_ctx=T)
    sae = build_sae(hook_name=HOOK, enc_bias=-0.3)
    tokens = build_tokens(n=8, t=T, d_vocab=D_VOCAB).numpy().astype(np.int32)
    _, cache = model.run_with_cache(torch.from_numpy(tokens).long(), names_filter=HOOK)
    acts = sae.encode(cache[HOOK]).detach()  # [N, T, d_sae], SAE-Lens's own encoder
    return model, sae, tokens, acts


def reference_hook(sae, feature: int, alpha: float):
    """The scale intervention written out: x_t + (alpha - 1) a_i(x_t) W_dec[i] at every t >= 1."""

    def hook(resid, hook=None):  # noqa: ARG001
        a = sae.encode(resid)[..., feature]
        delta = (alpha - 1.0) * a[..., None] * sae.W_dec[feature]
        delta[:, 0] = 0.0
        return resid + delta

    return hook


# ---- top_contexts on hand-made activations

def test_top_contexts_take_each_passages_best_position_strongest_first():
    acts = np.zeros((4, 6))
    acts[0, 2] = 1.0
    acts[1, 4], acts[1, 1] = 3.0, 2.5  # passage 1 fires twice: only its best counts
    acts[3, 0] = 2.0
    out = top_contexts(acts, 5)
    assert out == [(1, 5, 3.0), (3, 1, 2.0), (0, 3, 1.0)]  # position t = column + 1


def test_top_contexts_leave_out_passages_where_the_feature_never_fires():
    acts = np.zeros((3, 5))
    assert top_contexts(acts, 3) == []
    acts[1, 2] = -0.5  # a negative activation fires (AbsTopK; issue 13): never fires means a == 0
    assert top_contexts(acts, 3) == [(1, 3, -0.5)]


def test_top_contexts_break_ties_by_earlier_passage_then_earlier_position():
    acts = np.zeros((3, 5))
    acts[2, 1] = acts[0, 4] = acts[0, 3] = acts[1, 0] = 1.0
    assert top_contexts(acts, 2) == [(0, 4, 1.0), (1, 1, 1.0)]


def test_top_contexts_return_at_most_n_and_none_for_n_zero():
    acts = np.arange(20, dtype=float).reshape(4, 5) + 1
    assert len(top_contexts(acts, 2)) == 2
    assert top_contexts(acts, 0) == []


# ---- feature_snippets on a tiny model

@pytest.mark.parametrize("feature", [3, 17])
def test_snippets_sit_at_the_true_argmax_with_the_sae_encode_activation(setup, feature):
    model, sae, tokens, acts = setup
    encoder = FeatureEncoder(sae, [5, feature])
    a = acts[:, :, feature].numpy()
    scored = a[:, 1:-1]
    n = 4
    tok = FixedWidthTokenizer()
    snippets = feature_snippets(model, encoder, RESUME, tokens, 1, scored, 2.0, SCALE, tok, n)

    firing = [p for p in range(len(tokens)) if scored[p].max() > 0]
    assert len(firing) >= n, "the fixture's feature should fire in enough passages"
    strongest = sorted(firing, key=lambda p: -scored[p].max())[:n]
    assert [s["passage"] for s in snippets] == strongest
    for s in snippets:
        p, t = s["passage"], s["position"]
        assert 1 <= t <= T - 2  # a scored position: not BOS, not the last token
        assert t == 1 + int(np.argmax(a[p, 1:-1]))
        assert s["activation"] == pytest.approx(float(a[p, t]), abs=1e-5)
        lo, hi = expected_bounds(t, T)
        assert s["tokens"] == [tok.token_str(i) for i in tokens[p, lo:hi]]
        assert s["tokens"][s["fire_index"]] == tok.token_str(tokens[p, t])
        assert s["next_token"] == tok.token_str(tokens[p, t + 1])
    activations = [s["activation"] for s in snippets]
    assert activations == sorted(activations, reverse=True)


def test_snippet_predictions_are_the_clean_and_intervened_models_top_tokens_at_the_firing_position(setup):
    model, sae, tokens, acts = setup
    feature, alpha = 3, 4.0
    encoder = FeatureEncoder(sae, [feature])
    scored = acts[:, 1:-1, feature].numpy()
    snippets = feature_snippets(model, encoder, RESUME, tokens, 0, scored, alpha, SCALE, FixedWidthTokenizer(), 3)
    assert snippets
    with torch.inference_mode():
        batch = torch.from_numpy(tokens).long()
        clean = torch.softmax(model(batch), -1)
        intervened = torch.softmax(model.run_with_hooks(batch, fwd_hooks=[(HOOK, reference_hook(sae, feature, alpha))]),
                                   -1)
    for s in snippets:
        p, t = s["passage"], s["position"]
        for key, probs in (("clean_top", clean), ("intervened_top", intervened)):
            top = torch.topk(probs[p, t], TOP_PREDICTIONS)
            assert len(s[key]) == TOP_PREDICTIONS
            assert [ident for _, ident, _ in s[key]] == top.indices.tolist()
            assert [v for _, _, v in s[key]] == pytest.approx(top.values.tolist(), abs=1e-5)
    changed = [s["clean_top"] != s["intervened_top"] for s in snippets]
    assert any(changed), "scaling a firing feature by 4 should move some prediction"


@pytest.mark.parametrize("t", [1, 2, 20, T - 3, T - 2])
def test_snippet_context_is_cut_around_the_firing_position_without_bos(setup, t):
    model, sae, tokens, _ = setup
    encoder = FeatureEncoder(sae, [3])
    scored = np.zeros((len(tokens), T - 2))
    scored[5, t - 1] = 1.0  # the feature "fires" once, at passage 5, position t
    tok = FixedWidthTokenizer()
    (s,) = feature_snippets(model, encoder, RESUME, tokens, 0, scored, 2.0, SCALE, tok, 3)
    lo, hi = expected_bounds(t, T)
    assert (s["passage"], s["position"], s["activation"]) == (5, t, 1.0)
    assert s["tokens"] == [tok.token_str(i) for i in tokens[5, lo:hi]]
    assert s["fire_index"] == t - lo
    assert tok.token_str(tok.bos_token_id) not in s["tokens"]


def test_no_snippets_for_a_feature_that_never_fires(setup):
    model, sae, tokens, _ = setup
    encoder = FeatureEncoder(sae, [3])
    scored = np.zeros((len(tokens), T - 2))
    assert feature_snippets(model, encoder, RESUME, tokens, 0, scored, 2.0, SCALE, FixedWidthTokenizer(), 5) == []


# ---- direct logit effect

@pytest.mark.parametrize("feature", [0, 9, 63])
def test_direct_logit_effect_is_the_decoder_row_times_the_unembedding(setup, feature):
    model, sae, _, _ = setup
    k = 6
    out = direct_logit_effect(model, sae.W_dec[feature], FixedWidthTokenizer(), k)
    effect = (sae.W_dec[feature].double() @ model.W_U.double()).detach().numpy()  # no b_U, no centring
    order = np.argsort(-effect, kind="stable")
    assert [i for _, i, _ in out["promoted"]] == order[:k].tolist()
    assert [i for _, i, _ in out["suppressed"]] == order[::-1][:k].tolist()
    assert [v for _, _, v in out["promoted"]] == pytest.approx(effect[order[:k]], abs=1e-5)
    assert [v for _, _, v in out["suppressed"]] == pytest.approx(effect[order[::-1][:k]], abs=1e-5)
    assert [s for s, _, _ in out["promoted"]] == [FixedWidthTokenizer().token_str(i) for i in order[:k]]


def test_direct_logit_effect_promotes_the_tokens_whose_unembedding_is_the_direction(setup):
    model, _, _, _ = setup
    direction = model.W_U[:, 11].detach() + model.W_U[:, 29].detach()  # most aligned with tokens 11, 29
    w = model.W_U.detach()
    effect = direction @ w
    assert set(torch.topk(effect, 2).indices.tolist()) == {11, 29}, "precondition on the random W_U"
    out = direct_logit_effect(model, direction, FixedWidthTokenizer(), 2)
    assert {i for _, i, _ in out["promoted"]} == {11, 29}
    assert {i for _, i, _ in out["suppressed"]} == set(torch.topk(-effect, 2).indices.tolist())
