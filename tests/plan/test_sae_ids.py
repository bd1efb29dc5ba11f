"""SAE ids that are not hook names (Gemma Scope's `layer_N/width_16k/canonical`), resolved to hooks and Neuronpedia
sources without loading any weights; the gemma-2-2b preset's plan; `sae_id_template`."""

from __future__ import annotations

import pytest

from pipeline.core.errors import UserError
from pipeline.core.params.config import parse_params
from pipeline.core.plan.layers import gemma_2_hook, plan_layers, pretrained_directory, sae_hook
from tests.conftest import ROOT, run_cli


def gemma_2_releases():
    return [r for r, info in pretrained_directory().items() if info.conversion_func == "gemma_2"]


def test_every_gemma_2_ids_hook_is_sae_lens_own():
    """`gemma_2_hook` against SAE-Lens's `get_gemma_2_config_from_hf` (which reads no file) for every id of every
    release SAE-Lens loads with its gemma_2 loader."""
    from sae_lens.loading.pretrained_sae_loaders import get_gemma_2_config_from_hf

    releases = gemma_2_releases()
    assert "gemma-scope-2b-pt-res-canonical" in releases
    checked = 0
    for release in releases:
        info = pretrained_directory()[release]
        for sae_id, folder in info.saes_map.items():
            try:
                theirs = get_gemma_2_config_from_hf(info.repo_id, folder, device="cpu")["hook_name"]
            except ValueError:  # SAE-Lens cannot name it either (no layer, no model size in the repo id)
                theirs = None
            assert sae_hook(info, sae_id) == theirs, (release, sae_id)
            checked += 1
    assert checked > 500


def test_ids_that_are_hook_names_are_their_own_hook():
    info = pretrained_directory()["gpt2-small-res-jb"]
    assert sae_hook(info, "blocks.4.hook_resid_pre") == "blocks.4.hook_resid_pre"
    assert gemma_2_hook("google/gemma-scope-2b-pt-res", "layer_7/width_16k/average_l0_20") == "blocks.7.hook_resid_post"
    assert gemma_2_hook("google/gemma-scope-2b-pt-mlp", "layer_7/width_16k/average_l0_20") == "blocks.7.hook_mlp_out"


GEMMA_LAYERS = list(range(26))


def test_the_gemma_preset_plans_all_26_layers_from_the_canonical_width_16k_ids():
    plans = plan_layers(parse_params({"preset": "gemma-2-2b", "layers": GEMMA_LAYERS}))
    assert [p.sae_id for p in plans] == [f"layer_{n}/width_16k/canonical" for n in GEMMA_LAYERS]
    assert [p.hook for p in plans] == [p.sae_hook for p in plans] == [f"blocks.{n}.hook_resid_post" for n in GEMMA_LAYERS]
    assert [p.neuronpedia for p in plans] == [f"gemma-2-2b/{n}-gemmascope-res-16k" for n in GEMMA_LAYERS]
    assert [p.resume_at for p in plans] == [n + 1 for n in GEMMA_LAYERS]
    assert plans[20].neuronpedia_url(12082) == "https://www.neuronpedia.org/gemma-2-2b/20-gemmascope-res-16k/12082"
    with pytest.raises(UserError, match=r"layers \[26\] are out of range; the model has 26 layers"):
        plan_layers(parse_params({"preset": "gemma-2-2b", "layers": [3, 26]}))


def test_the_openai_release_maps_resid_post_l_to_neuronpedia_l():
    """OpenAI's v5 SAEs read blocks.L.hook_resid_post themselves: Neuronpedia's L is the layer, not L + 1 as res-jb's."""
    plans = plan_layers(parse_params({"sae_release": "gpt2-small-resid-post-v5-32k"}))
    assert [(p.sae_id, p.neuronpedia) for p in plans] == [
        (f"blocks.{n}.hook_resid_post", f"gpt2-small/{n}-res_post_32k-oai") for n in range(12)]


def test_a_hook_with_several_saes_needs_a_template_and_a_bad_template_is_one_line():
    gemma = {"model": "gemma-2-2b", "sae_release": "gemma-scope-2b-pt-res-canonical", "layers": [5]}
    with pytest.raises(UserError, match=r"has 3 SAEs at blocks.5.hook_resid_post .*sae_id_template, e.g. "
                                        r"'layer_\{layer\}/width_16k/canonical'") as err:
        plan_layers(parse_params(gemma))  # layer 5: widths 16k, 65k and 1m
    assert "\n" not in str(err.value)
    wide = plan_layers(parse_params(gemma | {"sae_id_template": "layer_{layer}/width_65k/canonical"}))
    assert wide[0].sae_id == "layer_5/width_65k/canonical" and wide[0].neuronpedia == "gemma-2-2b/5-gemmascope-res-65k"
    with pytest.raises(UserError, match="gives 'layer_5/width_32k/canonical' for layer 5, which release "
                                        "gemma-scope-2b-pt-res-canonical does not have"):
        plan_layers(parse_params(gemma | {"sae_id_template": "layer_{layer}/width_32k/canonical"}))
    with pytest.raises(UserError, match=r"reads blocks.5.hook_resid_post, not blocks.5.hook_resid_pre or "
                                        r"blocks.4.hook_resid_post"):
        plan_layers(parse_params(gemma | {"hook": "resid_pre", "sae_id_template": "layer_{layer}/width_16k/canonical"}))


def test_the_presets_template_applies_to_its_own_release_only():
    assert parse_params({"preset": "gemma-2-2b"}).sae_id_template == "layer_{layer}/width_16k/canonical"
    assert parse_params({"preset": "gemma-2-2b", "sae_release": "gemma-scope-2b-pt-res"}).sae_id_template is None
    assert parse_params({}).sae_id_template is None
    for bad, allowed in (("layer_5/width_16k/canonical", "with {layer}"), ("layer_{n}/{layer}", "only placeholder")):
        with pytest.raises(UserError, match=allowed):
            parse_params({"sae_id_template": bad})


def test_plan_shows_id_hook_and_neuronpedia_for_the_gemma_preset_without_loading_weights(tmp_path):
    """`plan -S preset=gemma-2-2b -S layers=[...]` on the repo's params.yaml, as `dvc exp run -S` would set them:
    the mapping, with nothing downloaded (an empty, offline Hugging Face home stays empty)."""
    layers = "[" + ",".join(map(str, GEMMA_LAYERS)) + "]"
    result = run_cli(["--params", str(ROOT / "params.yaml"), "plan", "-S", "preset=gemma-2-2b", "-S", f"layers={layers}"],
                     cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    row = next(line for line in lines if line.split()[:1] == ["20"])
    assert row.split() == ["20", "blocks.20.hook_resid_post", "layer_20/width_16k/canonical", "blocks.20.hook_resid_post",
                           "gemma-2-2b/20-gemmascope-res-16k"]
    assert not (tmp_path / "hf").exists()


def test_plan_overrides_are_checked_like_params_yaml(tmp_path):
    for args, says in ((["-S", "preset"], "-S expects key=value"), (["-S", "presett=toy"], "did you mean 'preset'"),
                       (["-S", "alpha=[1"], "not valid YAML")):
        result = run_cli(["--params", str(ROOT / "params.yaml"), "plan", *args], cwd=tmp_path)
        assert result.returncode == 2 and says in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_null_layers_is_every_layer_of_the_presets_model():
    from pipeline.core.plan.show import build_plan

    assert parse_params({"preset": "gemma-2-2b"}).layers == tuple(range(26))
    assert parse_params({}).layers == parse_params({"preset": "toy"}).layers == tuple(range(12))
    plan = build_plan(parse_params({"preset": "gemma-2-2b"}))
    assert [row["layer"] for row in plan["layers"]] == list(range(26))
    assert plan["layers_line"] == "0-25 (every layer of gemma-2-2b)"
    assert build_plan(parse_params({"preset": "gemma-2-2b", "layers": [3, 20]}))["layers_line"] == \
        "3, 20 (2 of gemma-2-2b's 26)"


def test_a_null_layers_with_another_model_asks_for_the_list():
    with pytest.raises(UserError, match=r"layers is null, .* model is 'data/my_model' .* list the layers") as err:
        parse_params({"model": "data/my_model"})
    assert "\n" not in str(err.value)
    assert parse_params({"model": "data/my_model", "layers": [0, 1]}).layers == (0, 1)
