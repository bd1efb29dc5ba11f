"""Feature selection: `auto` from activation statistics, `csv` from a curated file."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.core.errors import UserError
from pipeline.core.plan.layers import LayerPlan
from pipeline.load.tokenizer import ByteTokenizer
from pipeline.sources.auto import activation_stats, choose_layer, firing_profiles, shortlist
from pipeline.sources.csv_file import read_curated_csv
from tests.builders import build_model, build_sae, build_tokens

PLAN = LayerPlan(layer=1, hook="blocks.1.hook_resid_post", resume_at=2, sae_release="local", sae_id="x",
                 neuronpedia=None)


def test_shortlist_spans_the_density_band_and_refuses_too_few():
    counts = np.array([0, 1, 2, 5, 10, 20, 40, 80, 1000])
    maxes = np.arange(9, dtype=float)
    groups, density, n = shortlist(0, counts, maxes, n_scored=1000, k=3, min_density=0.001, max_density=0.1)
    assert n == 7  # 0 (dead) and 1000 (always on) are out of the band
    assert [sorted(g.tolist()) for g in groups] == [[1, 2, 3], [4, 5], [6, 7]]
    assert [int(g[0]) for g in groups] == [3, 5, 7]  # strongest first within each group
    assert density[7] == 0.08
    with pytest.raises(UserError, match=r"layer 0: only 7 features fire on between 0.001 and 0.1 .* features_per_layer=8"):
        shortlist(0, counts, maxes, 1000, 8, 0.001, 0.1)


def test_activation_stats_match_a_direct_count():
    model = build_model(d_vocab=257)
    sae = build_sae(enc_bias=-0.6)
    tokens = build_tokens(n=5, t=12, d_vocab=257, bos=256).numpy()
    counts, maxes, n_scored = activation_stats(model, {1: sae}, {1: PLAN}, tokens, batch_size=2)
    _, cache = model.run_with_cache(torch.from_numpy(tokens).long(), names_filter=[PLAN.hook])
    acts = sae.encode(cache[PLAN.hook][:, 1:-1]).detach()
    assert n_scored == 5 * 10
    assert np.array_equal(counts[1], (acts > 0).sum(dim=(0, 1)).numpy())
    assert np.allclose(maxes[1], acts.amax(dim=(0, 1)).numpy())


def test_auto_choice_is_deterministic_in_band_labelled_and_avoids_repeating_a_token():
    model = build_model(d_vocab=257)
    sae = build_sae(d_sae=64, enc_bias=-0.9)
    tokens = build_tokens(n=12, t=24, d_vocab=257, bos=256).numpy()
    counts, maxes, n = activation_stats(model, {1: sae}, {1: PLAN}, tokens, batch_size=4)
    kw = dict(tokenizer=ByteTokenizer(), counts=counts[1], maxes=maxes[1], n_scored=n, k=4, min_density=0.01,
              max_density=0.3, batch_size=4)
    first = choose_layer(model, sae, PLAN, tokens, **kw)
    again = choose_layer(model, sae, PLAN, tokens, **kw)
    assert first == again and len(first) == 4 and len({c.feature for c in first}) == 4
    assert all(0.01 <= c.density <= 0.3 and c.source == "auto" for c in first)
    assert all(c.label.startswith("fires on ") and "(after " in c.label for c in first)
    profiles = firing_profiles(model, sae, PLAN, tokens, [c.feature for c in first], 4)
    tops = [profiles[c.feature].top() for c in first]
    assert len(set(tops)) == len(tops)  # no two chosen features share their main firing token


def test_firing_profile_counts_the_token_and_the_one_before():
    model = build_model(d_vocab=257)
    sae = build_sae(d_sae=16, enc_bias=0.0)
    tokens = build_tokens(n=3, t=10, d_vocab=257, bos=256).numpy()
    profile = firing_profiles(model, sae, PLAN, tokens, [5], batch_size=3)[5]
    enc = sae.encode(model.run_with_cache(torch.from_numpy(tokens).long(), names_filter=[PLAN.hook])[1][PLAN.hook])
    fired = (enc[:, 1:-1, 5] > 0).numpy()
    n, t = np.nonzero(fired)
    assert sum(profile.on.values()) == fired.sum()
    assert profile.on == Counter(tokens[n, t + 1].tolist())
    assert profile.before == Counter(tokens[n, t].tolist())


def test_curated_csv_takes_the_first_rows_of_each_layer_in_file_order(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text("layer,feature,label,extra\n3,7,seven,a\n0,1,one,b\n3,2,,c\n0,9,nine,d\n3,4,four,e\n")
    rows = read_curated_csv(path, (0, 3), 2, {0: 10, 3: 10})
    assert [(r.layer, r.feature, r.label) for r in rows] == [(0, 1, "one"), (0, 9, "nine"), (3, 7, "seven"), (3, 2, "(no label)")]
    assert rows[0].reason == "f.csv row 3" and rows[0].source == "csv"


def test_the_shipped_curated_file_covers_layers_0_to_10():
    from tests.conftest import ROOT

    rows = read_curated_csv(ROOT / "data/neuronpedia_features.csv", tuple(range(11)), 5, {L: 24576 for L in range(11)})
    assert len(rows) == 55
    with pytest.raises(UserError, match="layer 11 has 0 feature"):
        read_curated_csv(ROOT / "data/neuronpedia_features.csv", tuple(range(12)), 5, None)
