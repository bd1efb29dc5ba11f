"""SAEs that normalise their input (OpenAI's TopK SAEs: `layer_norm`): every path of the engine moves the residual by
delta_t = c_t * s_t * d_i (pipeline.engine.normalization), and its numbers equal SAE-Lens's own splice.

The plain way throughout is HookedSAETransformer with the SAE spliced in (error term kept) and the feature's code
edited at `hook_sae_acts_post`, or the bench's float64 definition, whose s_t is read off SAE-Lens's decode
(pipeline.bench.references.decode_scale), not computed by the engine's module. Tiny random models, no download.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.bench.references import (
    decode_scale,
    definition_metrics,
    float64_reference,
    metrics_table,
    plain_way,
    sae_lens_splice,
)
from pipeline.engine import forward as fwd
from pipeline.engine.controls import random_unit_directions
from pipeline.engine.generate import Rows, generate_batch
from pipeline.engine.interventions import INTERVENTIONS
from pipeline.engine.metrics import variant_metrics
from pipeline.engine.normalization import position_scale
from pipeline.engine.run import run_layer
from pipeline.engine.snippets import feature_snippets
from pipeline.load.tokenizer import ByteTokenizer
from pipeline.stats.resampling import Resampler
from pipeline.stats.rows import row_statistics
from tests.builders import build_model, build_sae, build_tokens

LAYER = 1
HOOK = f"blocks.{LAYER}.hook_resid_post"
RESUME = LAYER + 1
NORMALISING = [("topk", "layer_norm"), ("jumprelu", "layer_norm"), ("standard", "constant_norm_rescale")]
IDS = [f"{a}-{n}" for a, n in NORMALISING]
EDITS = {  # mode: (value, what SAE-Lens's user writes at hook_sae_acts_post)
    "scale": (3.0, lambda a: a * 3.0),
    "clamp": (4.0, lambda a: torch.full_like(a, 4.0)),
    "add": (-1.5, lambda a: a - 1.5),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def setup(architecture: str, normalize: str, d_vocab: int = 40):
    from sae_lens import HookedSAETransformer

    model = build_model(d_vocab=d_vocab)
    spliced = build_model(HookedSAETransformer, d_vocab=d_vocab)  # the same weights
    sae = build_sae(architecture=architecture, normalize_activations=normalize, enc_bias=-0.5, hook_name=HOOK)
    return model, spliced, sae


def firing(sae, model, tokens, n: int = 3) -> list[int]:
    with torch.no_grad():
        acts = sae.encode(fwd.residual_at(model, tokens, RESUME))[:, 1:]
    return torch.argsort((acts != 0).flatten(0, 1).sum(0), descending=True, stable=True)[:n].tolist()


def splice_run(spliced, sae, tokens, feature: int, edit, stop_at_layer: int | None = None, capture: str | None = None):
    """SAE-Lens's splice with feature `feature`'s code edited at every position but BOS: the logits, or the residual
    at `capture`."""
    seen = {}

    def edit_hook(acts, hook):  # noqa: ARG001 (TransformerLens passes the hook)
        acts = acts.clone()
        acts[:, 1:, feature] = edit(acts[:, 1:, feature])
        return acts

    hooks = [(f"{HOOK}.hook_sae_acts_post", edit_hook)]
    if capture is not None:
        hooks.append((capture, lambda r, hook: seen.setdefault("r", r.detach().clone())))  # noqa: ARG005
    with torch.no_grad(), spliced.saes([sae], use_error_term=True):
        out = spliced.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=stop_at_layer)
    return seen["r"] if capture is not None else out


@pytest.mark.parametrize(("architecture", "normalize"), NORMALISING, ids=IDS)
def test_the_scale_from_sae_lens_decode_is_the_engines(architecture, normalize):
    """s_t read off SAE-Lens's decode (the reference) and computed by the engine (position_scale) agree in float64,
    and differ from 1 on these inputs (the scale matters)."""
    sae = build_sae(architecture=architecture, normalize_activations=normalize).double()
    x = torch.randn(3, 9, 16, dtype=torch.float64) * 4 + 1
    with torch.no_grad():
        theirs = decode_scale(sae, torch.float64)(x)
    torch.testing.assert_close(position_scale(sae.cfg, x), theirs, rtol=1e-10, atol=1e-12)
    assert (theirs - 1).abs().max() > 0.5
    assert decode_scale(build_sae(architecture=architecture), torch.float64) is None


@pytest.mark.parametrize("mode", list(EDITS))
@pytest.mark.parametrize(("architecture", "normalize"), NORMALISING, ids=IDS)
def test_engine_logits_equal_sae_lens_splice(architecture, normalize, mode):
    model, spliced, sae = setup(architecture, normalize)
    tokens = build_tokens()
    features = firing(sae, model, tokens)
    encoder = fwd.FeatureEncoder(sae, features)
    value, edit = EDITS[mode]
    resid = fwd.residual_at(model, tokens, RESUME).detach()
    for pos, feature in enumerate(features):
        with torch.no_grad():
            ours = fwd.intervened_logits(model, encoder, RESUME, tokens, pos, value, INTERVENTIONS[mode])
            # the same without s_t, to show the comparison can fail
            unscaled = fwd.intervened_residual(resid, encoder(resid)[..., pos], encoder.directions[pos],
                                               INTERVENTIONS[mode], value)
            unscaled = fwd.unembed(model, fwd.final_residual(model, unscaled, RESUME))
        theirs = splice_run(spliced, sae, tokens, feature, edit)
        assert (ours - theirs).abs().max().item() < 1e-4
        assert (unscaled - theirs).abs().max().item() > 1e-2


@pytest.mark.parametrize("shortcuts", [True, False])
@pytest.mark.parametrize(("architecture", "normalize"), NORMALISING, ids=IDS)
def test_every_metric_equals_sae_lens_splice_and_the_float64_definition(architecture, normalize, shortcuts):
    model, spliced, sae = setup(architecture, normalize)
    tokens = build_tokens(n=7, t=14)
    features, values = firing(sae, model, tokens), [0.0, 1.0, 2.5]
    res = run_layer(model, sae, RESUME, tokens, features, values, batch_size=3, shortcuts=shortcuts)
    plain = plain_way(spliced, sae, tokens, HOOK, features, tuple(values), batch_size=4)
    ours = metrics_table(res.ce_clean, res.ce_int, res.kl, res.acts, len(features), len(values))
    theirs = metrics_table(plain["ce_clean"], plain["ce_int"], plain["kl"], plain["acts"], len(features), len(values))
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-6)
    assert np.abs(theirs[:, 0, 2]).max() > 1e-3  # alpha = 0 moves the model: the comparison is not vacuous
    defn = float64_reference(model, sae, tokens, HOOK, features, values, batch_size=len(tokens), dtype=torch.float32)
    for fi in range(len(features)):
        for ai in range(len(values)):
            m = variant_metrics(res.ce_clean, res.ce_int[fi, ai], res.kl[fi, ai], res.acts_scored(fi), res.live[fi])
            ref = definition_metrics(defn["ce_clean"], defn["ce_int"][fi, ai], defn["kl"][fi, ai],
                                     defn["acts"][:, 1:-1, fi], 90.0)
            for key in ("ce_int", "delta_ce", "kl", "delta_ce_live", "kl_live"):
                assert abs(m[key] - ref[key]) <= 1e-6 + 1e-4 * abs(ref[key]), (key, m[key], ref[key])


@pytest.mark.parametrize(("architecture", "normalize"), NORMALISING, ids=IDS)
def test_control_rows_push_the_scaled_norm_and_equal_the_plain_way(architecture, normalize):
    model, _, sae = setup(architecture, normalize)
    tokens = build_tokens()
    features, values = firing(sae, model, tokens), [0.0, 3.0]
    controls = random_unit_directions(7, LAYER, features, 2, 16)
    ours = run_layer(model, sae, RESUME, tokens, features, values, batch_size=4, controls=controls)
    plain = float64_reference(model, sae, tokens, HOOK, features, values, 3, dtype=torch.float32, controls=controls)
    np.testing.assert_allclose(ours.ctrl_ce_int, plain["ce_int"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(ours.ctrl_kl, plain["kl"], rtol=0, atol=2e-6)


@pytest.mark.parametrize(("architecture", "normalize"), NORMALISING, ids=IDS)
def test_dose_is_the_splices_relative_move_of_the_residual(architecture, normalize):
    """dose_rel_norm = mean over live positions of ||delta_t|| / ||x_t||, with delta_t what SAE-Lens's splice moves
    the residual by; push_max_act stays in the SAE's units (c_t over the max activation)."""
    model, spliced, sae = setup(architecture, normalize)
    tokens = build_tokens(n=6, t=12)
    feature = firing(sae, model, tokens, 1)[0]
    res = run_layer(model, sae, RESUME, tokens, [feature], [3.0], batch_size=4)
    x = fwd.residual_at(model, tokens, RESUME).detach().double()
    moved = splice_run(spliced, sae, tokens, feature, EDITS["scale"][1], stop_at_layer=RESUME + 1,
                       capture=f"blocks.{RESUME}.hook_resid_pre").double()
    rel = ((moved - x).norm(dim=-1) / x.norm(dim=-1))[:, 1:-1].numpy()
    acts = res.acts[:, 1:-1, 0].astype(np.float64)
    coef = 2.0 * acts  # (alpha - 1) a_t
    live = res.live[0].mask
    assert live.any()
    stats = row_statistics(Resampler.for_passages([0, 1, 2, 3, 4, 5], seed=0, stream=0), ce_clean=res.ce_clean,
                           ce_int=res.ce_int[0, 0], kl=res.kl[0, 0], live=live, acts=res.acts_scored(0),
                           ctrl_ce_int=None, ctrl_kl=None, coef=coef,
                           dir_norm=float(fwd.FeatureEncoder(sae, [feature]).directions[0].detach().double().norm()),
                           resid_norm=res.resid_norm[:, 1:-1].astype(np.float64), max_act=float(np.abs(acts).max()),
                           context_size=None, scale=res.scale[:, 1:-1].astype(np.float64))
    assert stats["dose_rel_norm"] == pytest.approx(float(rel[live].mean()), rel=1e-4)
    assert stats["push_max_act"] == pytest.approx(float(coef[live].mean() / np.abs(acts).max()), rel=1e-12)


@pytest.mark.parametrize("mode", ["scale", "add"])
@pytest.mark.parametrize(("architecture", "normalize"), NORMALISING[:1], ids=IDS[:1])
def test_greedy_generation_with_the_cache_equals_sae_lens_splice_without_it(architecture, normalize, mode):
    """Each new position's delta carries that position's own s_t: KV-cache generation equals a loop of full forward
    passes through SAE-Lens's splice."""
    model, spliced, sae = setup(architecture, normalize)
    prompts = [[0, 5, 9, 2], [0, 7], [0, 11, 3, 3, 8, 1, 30]]
    features = firing(sae, model, build_tokens())
    encoder = fwd.FeatureEncoder(sae, features)
    value, edit = {"scale": (6.0, lambda a: a * 6.0), "add": (2.5, lambda a: a + 2.5)}[mode]
    rows = Rows([], [], [], [])
    for p in range(len(prompts)):
        for fi in range(len(features)):
            rows.prompt.append(p)
            rows.feature.append(fi)
            rows.value.append(value)
            rows.sampled.append(False)
    n_tokens = 6
    ours = generate_batch(model, encoder, RESUME, prompts, rows, n_tokens, 1.0, 0, INTERVENTIONS[mode])
    changed = 0
    for r in range(len(rows)):
        tokens = list(prompts[rows.prompt[r]])
        for _ in range(n_tokens):
            logits = splice_run(spliced, sae, torch.tensor([tokens]), features[rows.feature[r]], edit)
            tokens.append(int(logits[0, -1].argmax()))
        assert ours[r].tolist() == tokens[len(prompts[rows.prompt[r]]):], r
        with torch.no_grad():
            clean = [*prompts[rows.prompt[r]]]
            for _ in range(n_tokens):
                clean.append(int(model(torch.tensor([clean]))[0, -1].argmax()))
        changed += tokens != clean
    assert changed > 0  # the steering changes some continuations


@pytest.mark.parametrize(("architecture", "normalize"), NORMALISING[:1], ids=IDS[:1])
def test_snippets_show_the_splices_predictions(architecture, normalize):
    model, spliced, sae = setup(architecture, normalize, d_vocab=257)
    tokens = build_tokens(n=4, t=12, d_vocab=257, bos=256)
    feature = firing(sae, model, tokens, 1)[0]
    encoder = fwd.FeatureEncoder(sae, [feature])
    with torch.no_grad():
        acts = encoder(fwd.residual_at(model, tokens, RESUME))[:, 1:-1, 0].numpy()
    snippets = feature_snippets(model, encoder, RESUME, tokens.numpy(), 0, acts, 3.0, INTERVENTIONS["scale"],
                                ByteTokenizer(), 2)
    assert snippets
    for snip in snippets:
        theirs = torch.softmax(sae_lens_splice(spliced, sae, tokens[[snip["passage"]]], feature, 3.0)[0, snip["position"]], -1)
        for _, token_id, prob in snip["intervened_top"]:
            assert prob == pytest.approx(float(theirs[token_id]), abs=2e-6)
