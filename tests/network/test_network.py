"""The real gpt2-small preset, checked against published numbers (facts.md cites each source).

These need the internet (GPT-2 and the res-jb SAEs from the Hugging Face hub, ~150 MB per SAE) and
are skipped, and reported as skipped, where it is unreachable. They prove the loading, the
resid_post -> SAE id mapping and TransformerLens's weight processing are right: a wrong hook or a
model loaded without the release's `center_writing_weights` would miss these numbers.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from pipeline.core.params.config import parse_params
from pipeline.core.plan.layers import plan_layers
from pipeline.engine import forward as fwd
from pipeline.engine.interventions import SCALE
from pipeline.load.library import model_from_source, sae_from_source, sae_model_kwargs
from tests.conftest import ROOT

pytestmark = pytest.mark.network

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def study():
    return parse_params({})


@pytest.fixture(scope="module")
def plans(study):
    return {p.layer: p for p in plan_layers(study)}


@pytest.fixture(scope="module")
def saes(study, plans):
    cache = {}

    def get(layer: int):
        if layer not in cache:
            cache[layer] = sae_from_source(study.sae_release, plans[layer], CPU, "float32")
        return cache[layer]

    return get


@pytest.fixture(scope="module")
def gpt2(saes):
    return model_from_source("gpt2-small", CPU, "float32", sae_model_kwargs([saes(6)]))


def acts_at(model, sae, plan, text: str) -> tuple[torch.Tensor, list[str]]:
    """All SAE activations at resid_post of plan.layer, by the engine's own prefix route."""
    tokens = model.to_tokens(text)  # BOS prepended, as the SAEs were trained
    with torch.no_grad():
        resid = fwd.residual_at(model, tokens, plan.resume_at)
        return sae.encode(resid)[0], model.to_str_tokens(tokens)


def test_the_release_records_center_writing_weights(saes):
    assert sae_model_kwargs([saes(6)]) == {"center_writing_weights": True}


def test_cats_feature_peaks_on_cat(gpt2, saes, plans):
    """10-res-jb/16899 (resid_post 9): 57.75 on ' cat' (Neuronpedia's CI accepts 54.0..61.5)."""
    assert plans[9].sae_id == "blocks.10.hook_resid_pre" and plans[9].neuronpedia == "gpt2-small/10-res-jb"
    acts, strs = acts_at(gpt2, saes(9), plans[9], "My cat is sleeping on the couch.")
    cat = acts[:, 16899]
    peak = int(cat.argmax())
    assert strs[peak] == " cat"
    assert 54.0 <= float(cat[peak]) <= 61.5
    assert abs(float(cat[strs.index(" is")]) - 0.922) < 0.3


def test_arena_top_three_latents_on_the_global_prompt(gpt2, saes, plans):
    """7-res-jb (resid_post 6), final token: 17676, 17053, 792 in that order (ARENA 1.3.3)."""
    acts, _ = acts_at(gpt2, saes(6), plans[6], "Mitigating the risk of extinction from AI should be a global")
    assert acts[-1].topk(3).indices.tolist() == [17676, 17053, 792]


def test_hello_world_activations(gpt2, saes, plans):
    """7-res-jb: 16653 = 46.47 at 'Hello', 2494 = 33.55 at ',' (fp32, tolerance 0.1)."""
    acts, strs = acts_at(gpt2, saes(6), plans[6], "Hello, world!")
    assert abs(float(acts[strs.index("Hello"), 16653]) - 46.47) < 0.1
    assert abs(float(acts[strs.index(","), 2494]) - 33.55) < 0.1


def test_direct_logit_effect_of_7_res_jb_9(gpt2, saes):
    """W_dec[9] @ W_U of the processed model: 'bies' +1.327, 'bie' +1.297, ' arrivals' +1.218."""
    effect = (saes(6).W_dec[9] @ gpt2.W_U).detach()
    top = effect.topk(3)
    assert [gpt2.to_single_str_token(int(i)) for i in top.indices] == ["bies", "bie", " arrivals"]
    assert torch.allclose(top.values, torch.tensor([1.327, 1.297, 1.218]), atol=0.01)


def test_engine_equals_sae_lens_splice_on_gpt2(gpt2, saes, plans):
    from sae_lens import HookedSAETransformer

    sae = saes(6)
    spliced = HookedSAETransformer.from_pretrained("gpt2-small", center_writing_weights=True, device="cpu")
    tokens = gpt2.to_tokens(["When John and Mary went to the shops, John gave the bag to",
                             "My cat is sleeping on the couch and the dog is awake."])
    feature = 17676

    def scale(a, hook):  # noqa: ARG001
        a = a.clone()
        a[:, 1:, feature] *= 2.0
        return a

    with torch.no_grad(), spliced.saes([sae], use_error_term=True):
        theirs = spliced.run_with_hooks(tokens, fwd_hooks=[(f"{sae.cfg.metadata.hook_name}.hook_sae_acts_post", scale)])
    ours = fwd.intervened_logits(gpt2, fwd.FeatureEncoder(sae, [feature]), plans[6].resume_at, tokens, 0, 2.0, SCALE)
    assert (ours - theirs).abs().max().item() < 2e-3
    clean = fwd.intervened_logits(gpt2, fwd.FeatureEncoder(sae, [feature]), plans[6].resume_at, tokens, 0, 1.0, SCALE)
    with torch.no_grad():
        assert torch.equal(clean, fwd.unembed(gpt2, fwd.final_residual(gpt2, fwd.residual_at(gpt2, tokens, 7), 7)))


@pytest.mark.slow
def test_one_layer_of_the_real_study_end_to_end(tmp_path, monkeypatch):
    """model -> tokenize (WikiText-2) -> features (curated csv) -> intervene (layer 6) -> aggregate."""
    from pipeline.stages.aggregate import run_aggregate_stage
    from pipeline.stages.features import run_features_stage
    from pipeline.stages.generate import run_generate_stage
    from pipeline.stages.intervene import run_intervene_stage
    from pipeline.stages.model import run_model_stage
    from pipeline.stages.tokenize import run_tokenize_stage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "data/neuronpedia_features.csv", tmp_path / "data/neuronpedia_features.csv")
    config = parse_params({"layers": [6], "max_passages": 4, "max_len": 64, "feature_source": "csv",
                           "device": "cpu", "n_snippets": 2, "generate_tokens": 4, "generate_prompts": ["The"]})
    resolved = run_model_stage(config)
    assert resolved["layers"][6]["sae_id"] == "blocks.7.hook_resid_pre"
    assert resolved["model"]["hub"][0]["revision"] != "unknown"
    run_tokenize_stage(config)
    run_features_stage(config)
    frame = run_intervene_stage(config)[6]
    assert len(frame) == 5 * 5
    ones = frame[frame["alpha"] == 1.0]
    assert (ones["delta_ce"] == 0).all() and (ones["kl"] == 0).all()
    assert (frame[frame["alpha"] != 1.0]["kl"] >= 0).all()
    assert len(run_generate_stage(config)) == 5 * 4 * 2  # features x generate_alphas x decodings
    summary = run_aggregate_stage(config)
    assert summary["n_features"] == 5
    per_feature = pd.read_csv(tmp_path / "metrics/per_feature_metrics.csv")
    assert per_feature["label"].notna().all()
