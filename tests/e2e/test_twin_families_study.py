"""The two SAE families beyond res-jb end to end on the hub twin: `dvc exp run` of the gemma-2-2b preset (Gemma-2-2B,
Gemma Scope) and of the gpt2-small preset with `-S sae_release=gpt2-small-resid-post-v5-32k` (OpenAI's TopK SAEs, the
README's example), each with size overrides only, offline, every loader real, the Neuronpedia stand-in answering
the new sources. The numbers mean nothing (random weights); the code path is what is proved. Each run's per-stage
wall times (data/runs/*.json) are printed for docs/sae_families.md (`pytest -s`)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.conftest import make_project_copy, run_dvc
from tests.load.test_twin import twin_env
from tests.neuronpedia_standin import FakeNeuronpedia

pytestmark = pytest.mark.slow

SIZE = ["-S", "max_passages=4", "-S", "max_len=32", "-S", "features_per_layer=1", "-S", "generate_tokens=8",
        "-S", "screen_top_k=2", "-S", "screen_random=4"]
FAMILIES = {
    "gemma-scope": {
        "set": ["-S", "preset=gemma-2-2b"],  # every one of its 26 layers (params.yaml's null `layers`)
        "layers": list(range(26)),
        "sae_ids": {layer: f"layer_{layer}/width_16k/canonical" for layer in range(26)},
        "repos": ("google/gemma-2-2b", "google/gemma-scope-2b-pt-res"),
        "neuronpedia": "https://www.neuronpedia.org/gemma-2-2b/{layer}-gemmascope-res-16k/",
        "architecture": "jumprelu",
        "bos": 2,
    },
    "openai-topk": {
        "set": ["-S", "sae_release=gpt2-small-resid-post-v5-32k"],  # the README's example: every layer
        "layers": list(range(12)),
        "sae_ids": {layer: f"blocks.{layer}.hook_resid_post" for layer in range(12)},
        "repos": ("gpt2", "jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs"),
        "neuronpedia": "https://www.neuronpedia.org/gpt2-small/{layer}-res_post_32k-oai/",
        "architecture": "topk",
        "bos": 2047,
    },
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_runs_every_stage_on_the_twin(hub_twin, tmp_path_factory, family):
    spec = FAMILIES[family]
    project = make_project_copy(tmp_path_factory.mktemp(f"twin-{family}"))
    server = FakeNeuronpedia(synthesize=True)
    try:
        result = run_dvc(["exp", "run", *spec["set"], *SIZE], project, timeout=2400,
                         env=twin_env(hub_twin, NEURONPEDIA_API_URL=server.url))
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ran = {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"model", "tokenize", "screen", "features", "intervene", "generate", "aggregate", "plot", "report"}
    assert json.loads((project / "data/runs/intervene.json").read_text())["layers"] == spec["layers"]

    manifest = json.loads((hub_twin / "twin.json").read_text())
    resolved = json.loads((project / "data/model.json").read_text())
    assert resolved["availability"] == "cache" and resolved["model"]["source"] == "hub"
    model_repo, sae_repo = spec["repos"]
    assert {f["revision"] for f in resolved["model"]["hub"]} == {manifest["repos"][model_repo]}
    assert resolved["tokenizer"]["revision"] == manifest["repos"][model_repo]
    assert {f["revision"] for e in resolved["layers"] for f in e["hub"]} == {manifest["repos"][sae_repo]}
    by_layer = {e["layer"]: e for e in resolved["layers"]}
    for layer, sae_id in spec["sae_ids"].items():
        assert by_layer[layer]["sae_id"] == sae_id and by_layer[layer]["architecture"] == spec["architecture"]

    features = pd.read_csv(project / "data/features.csv")
    assert list(features["layer"]) == spec["layers"] and (features["source"] == "neuronpedia").all()
    for layer, url in zip(features["layer"], features["neuronpedia_url"], strict=True):
        assert url.startswith(spec["neuronpedia"].format(layer=layer))

    per_feature = pd.read_csv(project / "metrics/per_feature_metrics.csv")
    assert len(per_feature) == len(spec["layers"]) * 5
    identity = per_feature[per_feature["alpha"] == 1.0]
    assert (identity["delta_ce"] == 0).all() and (identity["kl"] == 0).all()
    summary = json.loads((project / "metrics/summary.json").read_text())
    assert summary["sanity"]["identity_rows_nonzero"] == 0
    assert "data:image/png;base64," in (project / "report/report.html").read_text()

    breakdown = {path.stem: json.loads(path.read_text())["wall_s"] for path in sorted((project / "data/runs").glob("*.json"))}
    print(f"\n{family} on the twin, per-stage wall_s: " + ", ".join(f"{k} {v:.1f}" for k, v in breakdown.items())
          + f"; total {sum(breakdown.values()):.1f}")
