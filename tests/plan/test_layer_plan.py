"""Hook -> SAE id -> Neuronpedia source, resolved from SAE-Lens's pretrained directory."""

from __future__ import annotations

import pytest

from pipeline.core.errors import UserError
from pipeline.core.params.config import parse_params
from pipeline.core.plan.hooks import same_tensor
from pipeline.core.plan.layers import plan_layers, pretrained_directory


def test_our_reading_of_the_directory_equals_sae_lens_own():
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    theirs = get_pretrained_saes_directory()
    ours = pretrained_directory()
    assert set(ours) == set(theirs)
    for release, lookup in theirs.items():
        mine = ours[release]
        assert mine.repo_id == lookup.repo_id
        assert mine.model == lookup.model
        assert mine.saes_map == lookup.saes_map
        assert mine.neuronpedia_id == lookup.neuronpedia_id
        assert mine.config_overrides == (lookup.config_overrides or {})
        assert mine.conversion_func == lookup.conversion_func


# resid_post L is the same tensor as resid_pre L+1; res-jb only has resid_pre SAEs for 0..11 and
# one resid_post SAE for block 11 (facts.md), and Neuronpedia numbers sources by resid_pre layer.
RES_JB = [(layer, f"blocks.{layer + 1}.hook_resid_pre", f"gpt2-small/{layer + 1}-res-jb") for layer in range(11)]
RES_JB.append((11, "blocks.11.hook_resid_post", "gpt2-small/12-res-jb"))


def test_gpt2_small_res_jb_table_for_all_twelve_layers():
    plans = plan_layers(parse_params({}))
    got = [(p.layer, p.sae_id, p.neuronpedia) for p in plans]
    assert got == RES_JB
    assert [p.hook for p in plans] == [f"blocks.{L}.hook_resid_post" for L in range(12)]
    assert [p.resume_at for p in plans] == list(range(1, 13))
    assert len({p.sae_id for p in plans}) == 12  # none twice
    assert plans[9].neuronpedia_url(16899) == "https://www.neuronpedia.org/gpt2-small/10-res-jb/16899"


def test_another_release_works_by_changing_params_only():
    plans = plan_layers(parse_params({"sae_release": "gpt2-small-resid-post-v5-32k"}))
    assert [p.sae_id for p in plans] == [f"blocks.{L}.hook_resid_post" for L in range(12)]
    assert plans[3].neuronpedia == "gpt2-small/3-res_post_32k-oai"


def test_resid_pre_hook_resolves_to_the_exact_ids():
    plans = plan_layers(parse_params({"hook": "resid_pre", "layers": [0, 7]}))
    assert [(p.sae_id, p.resume_at) for p in plans] == [("blocks.0.hook_resid_pre", 0), ("blocks.7.hook_resid_pre", 7)]


def test_layers_out_of_range_or_uncovered_are_clear_errors():
    with pytest.raises(UserError, match=r"layers \[12\] are out of range; the model has 12 layers"):
        plan_layers(parse_params({"layers": [3, 12]}))
    with pytest.raises(UserError, match="has no SAE at blocks.0.hook_resid_post or blocks.1.hook_resid_pre"):
        plan_layers(parse_params({"sae_release": "gpt2-small-res_sce-ajt"}))
    with pytest.raises(UserError, match="is not in SAE-Lens's pretrained directory"):
        plan_layers(parse_params({"sae_release": "gpt2-small-res-jbb"}))


def test_the_toy_plan_needs_no_built_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plans = plan_layers(parse_params({"preset": "toy"}))
    assert [p.sae_id for p in plans] == [f"blocks.{L}.hook_resid_post" for L in range(12)]
    assert all(p.neuronpedia is None for p in plans)


@pytest.mark.parametrize("a,b,same", [
    ("blocks.3.hook_resid_post", "blocks.4.hook_resid_pre", True),
    ("blocks.3.hook_resid_post", "blocks.3.hook_resid_pre", False),
    ("blocks.11.hook_resid_post", "blocks.11.hook_resid_post", True),
    ("blocks.3.hook_mlp_out", "blocks.3.hook_resid_post", False),
])
def test_same_tensor(a, b, same):
    assert same_tensor(a, b) is same
