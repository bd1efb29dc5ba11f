"""One record per intervention mode (pipeline.core.modes): the engine's delta functions follow the record's
definition, and every sentence, caption and label is built from it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from pipeline.core.modes import MODE_NAMES, MODES
from pipeline.core.params.config import PARAM_SPECS
from pipeline.engine.interventions import INTERVENTIONS
from pipeline.report.fragments import FIGURE_CAPTIONS, figure_fragment
from pipeline.report.statistics import intervention_fragment


def fake_inputs(intervention: str, alpha: float = 2.0):
    headline = pd.DataFrame({"n_docs": [12], "n_passages": [16]})
    figures = {key: Path(f"plots/{key}.png") for key in FIGURE_CAPTIONS}
    return SimpleNamespace(intervention=intervention, alpha=alpha, headline=headline, figures=figures,
                           model=SimpleNamespace(hook="resid_post"))


def test_the_engine_has_one_delta_function_per_record_and_params_accept_exactly_the_records():
    assert set(INTERVENTIONS) == set(MODES) == set(MODE_NAMES)
    for name, intervention in INTERVENTIONS.items():
        assert intervention.mode is MODES[name]
    assert PARAM_SPECS["intervention"].check("scale") is None
    assert PARAM_SPECS["intervention"].check("steer") is not None


@pytest.mark.parametrize("name", list(MODES))
@pytest.mark.parametrize("value", [-1.5, 0.0, 0.5, 1.0, 2.0])
def test_each_engine_delta_is_the_records_shift_times_the_direction_never_at_bos(name, value):
    g = torch.Generator().manual_seed(3)
    acts = torch.randn(4, 7, generator=g, dtype=torch.float64).relu()  # silent positions included
    direction = torch.randn(5, generator=g, dtype=torch.float64)
    delta = INTERVENTIONS[name].delta(acts, direction, value)
    expected = MODES[name].shift(acts, value)[..., None] * direction
    expected[:, 0] = 0.0
    assert torch.allclose(delta, expected, rtol=0, atol=1e-12)
    changes = INTERVENTIONS[name].changes(acts, value)
    assert torch.equal(changes, (expected != 0).any(-1))
    assert torch.equal(INTERVENTIONS[name].coefficient(acts, value)[:, 1:], MODES[name].shift(acts, value)[:, 1:])


@pytest.mark.parametrize("name", list(MODES))
def test_the_identity_value_moves_nothing_and_acts_where_silent_is_true_to_the_shift(name):
    mode = MODES[name]
    silent = torch.zeros(3)
    if mode.identity is not None:
        assert torch.equal(mode.shift(torch.rand(3), mode.identity), torch.zeros(3))
        assert f"= {mode.identity:g} (dashed) is the clean model" in mode.identity_note
    else:
        assert f"No {name} value is the clean model" in mode.identity_note
    assert bool((mode.shift(silent, 2.0) != 0).any()) == mode.acts_where_silent


def test_scale_speaks_of_alpha_and_the_others_do_not():
    assert MODES["scale"].applied(2) == "scaled by α = 2"
    assert MODES["clamp"].applied(2) == "clamped to c = 2"
    assert MODES["add"].applied(-1.5) == "pushed by c = -1.5 × its decoder direction"
    for name in ("clamp", "add"):
        for key in FIGURE_CAPTIONS:
            caption = figure_fragment(fake_inputs(name), key)
            assert "α" not in caption and "scaled" not in caption


def test_the_sweep_caption_marks_the_clean_value_of_the_intervention():
    assert "α = 1 (dashed) is the clean model" in figure_fragment(fake_inputs("scale"), "dce_vs_alpha")
    assert "c = 0 (dashed) is the clean model" in figure_fragment(fake_inputs("add"), "dce_vs_alpha")
    assert "No clamp value is the clean model" in figure_fragment(fake_inputs("clamp"), "dce_vs_alpha")


@pytest.mark.parametrize("name,formula", [("scale", r"(\alpha - 1)\, a_i(x_t)"), ("clamp", r"(c - a_i(x_t))"),
                                          ("add", r"c\, W_\text{dec}[i]")])
def test_the_method_section_states_the_chosen_interventions_formula(name, formula):
    text = intervention_fragment(fake_inputs(name))
    assert formula in text
    assert ("\\alpha" in text) == (name == "scale")
