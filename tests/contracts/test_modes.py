"""Words follow the intervention: every sentence, caption and label is built from its identity value."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from pipeline.core.modes import MODES
from pipeline.report.fragments import FIGURE_CAPTIONS, figure_fragment
from pipeline.report.statistics import intervention_fragment


def fake_inputs(intervention: str, alpha: float = 2.0):
    headline = pd.DataFrame({"n_docs": [12], "n_passages": [16]})
    figures = {key: Path(f"plots/{key}.png") for key in FIGURE_CAPTIONS}
    return SimpleNamespace(intervention=intervention, alpha=alpha, headline=headline, figures=figures,
                           model=SimpleNamespace(hook="resid_post"))


@pytest.mark.parametrize("name", list(MODES))
def test_each_intervention_names_its_own_identity(name):
    words = MODES[name]
    assert words.identity == MODES[name].identity
    if words.identity is None:
        assert "No clamp value is the clean model" in words.identity_note
    else:
        assert f"= {words.identity:g} (dashed) is the clean model" in words.identity_note


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
