"""The product as a user meets it: `dvc repro`, `dvc exp run -S ...`, `dvc metrics diff`.

Runs in a fresh copy of the working tree (a git repo with one commit), on the toy preset with a
small corpus so the whole file takes about two minutes on two CPU cores.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.core.columns import PER_FEATURE_COLUMNS
from tests.conftest import make_project_copy, run_dvc

pytestmark = pytest.mark.slow

SMALL = ["-S", "preset=toy", "-S", "layers=[0,11]", "-S", "max_passages=8", "-S", "max_len=32",
         "-S", "toy_lm_steps=0", "-S", "toy_sae_steps=0", "-S", "screen_top_k=3", "-S", "screen_random=6"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project_copy(tmp_path_factory.mktemp("study"))


def test_committed_params_fail_clearly_offline_before_any_stage_output(project, tmp_path):
    result = run_dvc(["repro"], project, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode != 0
    out = result.stdout + result.stderr
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "-S preset=toy" in errors[0], out
    assert "Traceback" not in out
    assert not (project / "data" / "model.json").exists()  # the model stage, the first, wrote nothing


def test_toy_study_runs_end_to_end_with_every_output(project):
    result = run_dvc(["exp", "run", "-n", "base", *SMALL], project)
    assert result.returncode == 0, result.stdout + result.stderr
    # a fresh clone's first `dvc exp run` prints no warning: none from DVC per output (the committed
    # dvc.lock, tests/contracts/test_dvc_lock.py), none from a library
    warned = [line for line in (result.stdout + result.stderr).splitlines() if "warning" in line.lower()]
    assert warned == [], warned

    tokens = np.load(project / "data/tokens.npy")
    assert tokens.dtype == np.int32 and tokens.shape == (8, 32) and (tokens[:, 0] == 256).all()
    features = pd.read_csv(project / "data/features.csv")
    assert len(features) == 2 * 5 and set(features["layer"]) == {0, 11}
    assert {"layer", "feature", "label", "source"} <= set(features.columns)

    metric_keys = ["ce_clean", "ce_int", "delta_ce", "delta_ce_se", "kl", "kl_se", "live_threshold", "n_live",
                   "frac_live", "mean_act_live", "delta_ce_live", "kl_live", "top_promoted", "top_suppressed"]
    for layer in (0, 11):
        table = pd.read_csv(project / f"metrics/layers/layer_{layer}.csv")
        assert len(table) == 5 * 5  # features x alphas
        assert set(metric_keys) <= set(table.columns)
        detail = json.loads((project / f"data/detail/layer_{layer}.json").read_text())
        assert len(detail["features"]) == 5

    per_feature = pd.read_csv(project / "metrics/per_feature_metrics.csv")
    assert tuple(per_feature.columns) == PER_FEATURE_COLUMNS
    assert len(per_feature) == 2 * 5 * 5
    per_layer = pd.read_csv(project / "metrics/per_layer_summary.csv")
    assert len(per_layer) == 2 * 5
    summary = json.loads((project / "metrics/summary.json").read_text())
    assert summary["alpha"] == 2.0 and summary["n_features"] == 10
    assert summary["sanity"]["identity_rows_nonzero"] == 0 and summary["sanity"]["nan_values"] == 0
    # the statistics: controls ran (3 draws by default), every test row got a Holm-adjusted p
    assert per_feature["ctrl_kl"].notna().all() and (per_feature["ctrl_kl"] >= 0).all()
    tests = per_feature[per_feature["alpha"] != 1.0]
    assert (tests["p_adj_delta_ce_live"].notna() == tests["p_delta_ce_live"].notna()).all()
    assert (tests["p_adj_delta_ce_live"].dropna() >= tests["p_delta_ce_live"].dropna()).all()
    assert summary["tests"]["n_tests"] == int(tests["p_delta_ce_live"].notna().sum()) > 0
    assert {"mean_delta_ce_live", "mean_kl_live", "mean_delta_ce", "mean_kl", "max_kl_live"} <= set(summary)
    for name in ("layer_vs_dloss_alpha2.png", "dce_vs_alpha.png", "kl_vs_alpha.png", "kl_heatmap.png",
                 "layer_dce.csv", "alpha_sweep.csv", "kl_heatmap.csv"):
        assert (project / "plots" / name).stat().st_size > 0, name
    html = (project / "report/report.html").read_text()
    assert "data:image/png;base64," in html and "<math" in html
    # the screen: every feature of both layers (the toy's d_sae is 512), verified at every alpha, in the report
    for layer in (0, 11):
        assert len(pd.read_csv(project / f"metrics/screen/layer_{layer}.csv")) == 512
    agreement = json.loads((project / "metrics/screen/agreement.json").read_text())
    assert set(agreement) == {"layer_0", "layer_11"} and set(agreement["layer_0"]) == {"alpha_0", "alpha_0.5",
                                                                                       "alpha_2", "alpha_4"}
    assert 'id="sec-screen"' in html


def test_another_alpha_changes_the_metrics_and_dvc_diffs_them(project):
    before = json.loads((project / "metrics/summary.json").read_text())
    result = run_dvc(["exp", "run", "-n", "alpha4", *SMALL, "-S", "alpha=4"], project)
    assert result.returncode == 0, result.stdout + result.stderr
    ran = [line for line in result.stdout.splitlines() if line.startswith("Running stage")]
    assert not any("'model'" in r or "'tokenize'" in r or "'features'" in r for r in ran), ran
    after = json.loads((project / "metrics/summary.json").read_text())
    assert after["alpha"] == 4.0 and after["mean_kl"] != before["mean_kl"]
    assert (project / "plots/layer_vs_dloss_alpha4.png").exists()
    assert not (project / "plots/layer_vs_dloss_alpha2.png").exists()

    diff = run_dvc(["metrics", "diff", "base", "--json"], project)
    assert diff.returncode == 0, diff.stderr
    changes = json.loads(diff.stdout)["metrics/summary.json"]
    assert changes["alpha"]["old"] == 2.0 and changes["alpha"]["new"] == 4.0
    assert changes["mean_kl"]["old"] == before["mean_kl"] and changes["mean_kl"]["new"] == after["mean_kl"]
    assert "metrics/screen/agreement.json" not in json.loads(diff.stdout)  # kept out of the headline


def test_feature_source_screen_measures_the_screens_first_features(project):
    result = run_dvc(["exp", "run", "-n", "screen", *SMALL, "-S", "feature_source=screen", "-S", "max_density=0.2"],
                     project)
    assert result.returncode == 0, result.stdout + result.stderr
    features = pd.read_csv(project / "data/features.csv")
    assert (features["source"] == "screen").all()
    for layer in (0, 11):
        ranks = pd.read_csv(project / f"data/screen/layer_{layer}.csv")
        band = ranks[(ranks["density"] >= 1e-4) & (ranks["density"] <= 0.2) & (ranks["n_firing"] > 0)]
        assert features.loc[features["layer"] == layer, "feature"].tolist() == band.sort_values("rank")[
            "feature"].head(5).tolist()
    per_feature = pd.read_csv(project / "metrics/per_feature_metrics.csv")
    assert set(zip(per_feature["layer"], per_feature["feature"], strict=True)) == set(
        zip(features["layer"], features["feature"], strict=True))
    diff = run_dvc(["metrics", "diff", "base", "--targets", "metrics/screen/agreement.json", "--json"], project)
    assert diff.returncode == 0, diff.stderr


def test_a_plot_only_change_reruns_no_forward_pass(project):
    result = run_dvc(["exp", "run", *SMALL, "-S", "alpha=4", "-S", "plot_dpi=80"], project)
    assert result.returncode == 0, result.stdout + result.stderr
    ran = [line for line in result.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'plot':", "Running stage 'report':"], result.stdout
    status = run_dvc(["status", "--json"], project)
    assert json.loads(status.stdout) == {}


def test_dvc_plots_show_and_diff_read_the_declared_plots(project):
    shown = run_dvc(["plots", "show", "--json"], project)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)["data"]
    for name in ("plots/layer_dce.csv", "plots/alpha_sweep.csv", "plots/kl_heatmap.csv", "plots/dce_vs_alpha.png"):
        assert name in data and not any(item.get("errors") for item in data[name]), name
    diff = run_dvc(["plots", "diff", "base", "--json"], project)
    assert diff.returncode == 0, diff.stderr
    revisions = json.loads(diff.stdout)["data"]["plots/layer_dce.csv"][0]["revisions"]
    assert set(revisions) == {"base", "workspace"}
