"""The gpt2-small preset end to end on the hub twin: `dvc exp run` with the committed params.yaml (gpt2-small,
res-jb, WikiText-2, Neuronpedia features) and size overrides only, every loader real, offline. The numbers mean
nothing (random weights); the code path is what is proved."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.twin.build import SCALES
from tests.conftest import make_project_copy, run_dvc
from tests.load.test_twin import SAE_REPO, SIZE, snapshot, twin_env
from tests.neuronpedia_standin import FakeNeuronpedia

pytestmark = pytest.mark.slow
SCREEN_SIZE = ["-S", "screen_top_k=3", "-S", "screen_random=10"]  # the verification's sample, small for CI


def test_the_gpt2_small_preset_runs_every_stage_on_the_twin(hub_twin, tmp_path_factory):
    twin = hub_twin
    """`dvc exp run` with the committed params.yaml (gpt2-small, res-jb, WikiText-2, Neuronpedia
    features) and size overrides only, reading the twin as the Hugging Face cache, offline."""
    project = make_project_copy(tmp_path_factory.mktemp("twin-study"))
    server = FakeNeuronpedia(synthesize=True)
    try:
        result = run_dvc(["exp", "run", *SIZE, *SCREEN_SIZE], project, env=twin_env(twin, NEURONPEDIA_API_URL=server.url))
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ran = {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"model", "tokenize", "screen", "features", "intervene", "generate", "aggregate", "plot", "report"}
    assert json.loads((project / "data/runs/intervene.json").read_text())["layers"] == list(range(12))

    manifest = json.loads((twin / "twin.json").read_text())
    resolved = json.loads((project / "data/model.json").read_text())
    assert resolved["availability"] == "cache" and resolved["model"]["source"] == "hub"
    assert {e["revision"] for e in resolved["model"]["hub"]} == {manifest["repos"]["gpt2"]}
    weights = snapshot(twin, "gpt2") / "model.safetensors"
    assert resolved["model"]["hub"][1]["blob"] == Path(os.path.realpath(weights)).name
    assert [e["sae_id"] for e in resolved["layers"]] == [f"blocks.{i}.hook_resid_pre" for i in range(1, 12)] + [
        "blocks.11.hook_resid_post"]
    assert {h["revision"] for e in resolved["layers"] for h in e["hub"]} == {manifest["repos"][SAE_REPO]}

    meta = json.loads((project / "data/tokens.json").read_text())
    assert meta["corpus"] == "wikitext-2" and meta["source"].startswith("hf datasets Salesforce/wikitext")
    tokens = np.load(project / "data/tokens.npy")
    assert tokens.shape == (4, 32) and (tokens[:, 0] == SCALES["tiny"].vocab_size - 1).all()
    # the twin's WikiText has many ` = Title = ` articles; each passage records the one it was cut from
    assert meta["n_documents"] > 10 and len(meta["passage_documents"]) == 4
    assert all(0 <= d < meta["n_documents"] for d in meta["passage_documents"])

    features = pd.read_csv(project / "data/features.csv")
    assert list(features["layer"]) == list(range(12)) and (features["source"] == "neuronpedia").all()
    assert features["neuronpedia_url"].str.startswith("https://www.neuronpedia.org/gpt2-small/").all()

    per_feature = pd.read_csv(project / "metrics/per_feature_metrics.csv")
    assert len(per_feature) == 12 * 5
    identity = per_feature[per_feature["alpha"] == 1.0]
    assert (identity["delta_ce"] == 0).all() and (identity["kl"] == 0).all()
    summary = json.loads((project / "metrics/summary.json").read_text())
    assert summary["n_features"] == 12 and summary["sanity"]["identity_rows_nonzero"] == 0
    assert "data:image/png;base64," in (project / "report/report.html").read_text()

    # the screen of all 12 twin SAEs, verified; then the features it ranks first, labelled from Neuronpedia
    agreement = json.loads((project / "metrics/screen/agreement.json").read_text())
    assert set(agreement) == {f"layer_{i}" for i in range(12)}
    server = FakeNeuronpedia(synthesize=True)
    try:
        again = run_dvc(["exp", "run", *SIZE, *SCREEN_SIZE, "-S", "feature_source=screen", "-S", "max_density=1"], project,
                        env=twin_env(twin, NEURONPEDIA_API_URL=server.url))
    finally:
        server.stop()
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "Running stage 'screen'" not in again.stdout  # its params did not change
    features = pd.read_csv(project / "data/features.csv")
    assert (features["source"] == "screen").all() and features["reason"].str.contains("Neuronpedia").all()
    for layer in range(12):
        ranks = pd.read_csv(project / f"data/screen/layer_{layer}.csv")
        first = ranks[(ranks["density"] >= 1e-4) & (ranks["n_firing"] > 0)].sort_values("rank")["feature"].head(1)
        assert features.loc[features["layer"] == layer, "feature"].tolist() == first.tolist()
