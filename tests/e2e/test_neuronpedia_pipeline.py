"""`dvc exp run -S feature_source=neuronpedia` against a server at NEURONPEDIA_API_URL, then the
features stage again from its cache with the server gone.

GPT-2's weights are out of reach here, so the study runs on a tiny local model whose SAEs carry
Neuronpedia ids in their SAE-Lens metadata (as res-jb SAEs saved with `save_model` do): layer 3
reads gpt2-small/4-res-jb (documented candidates) and layer 11 gpt2-small/12-res-jb (seeded random
candidates, d_sae 6 so they land on the recorded payloads).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from pipeline.load.library import save_local_model
from pipeline.load.tokenizer import ByteTokenizer
from tests.builders import build_model, build_sae
from tests.conftest import make_project_copy, run_dvc
from tests.neuronpedia_standin import FakeNeuronpedia
from tests.stages.test_neuronpedia import GOOD_4, GOOD_12, closed_port_url

pytestmark = pytest.mark.slow


def write_fixture_model(root) -> None:
    model = build_model(n_layers=12, d_model=16, d_vocab=257, n_ctx=32)
    kwargs = dict(n_layers=12, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=32, d_vocab=257,
                  act_fn="gelu_new", normalization_type="LN", seed=0)
    save_local_model(model, root / "model", kwargs, ByteTokenizer().spec())
    for layer, d_sae, np_id in ((3, 24576, "gpt2-small/4-res-jb"), (11, 6, "gpt2-small/12-res-jb")):
        sae = build_sae(d_in=16, d_sae=d_sae, hook_name=f"blocks.{layer}.hook_resid_post", enc_bias=-0.5)
        sae.cfg.metadata.neuronpedia_id = np_id
        with torch.no_grad():
            sae.W_enc.mul_(0.5)
        sae.save_model(root / "saes" / f"blocks.{layer}.hook_resid_post")


def test_neuronpedia_features_through_dvc_then_from_the_cache_offline(tmp_path_factory):
    project = make_project_copy(tmp_path_factory.mktemp("np-study"))
    write_fixture_model(project / "np_fixture")
    server = FakeNeuronpedia()
    args = ["-S", "preset=toy", "-S", "model=np_fixture/model", "-S", "sae_release=np_fixture/saes",
            "-S", "feature_source=neuronpedia", "-S", "layers=[3,11]", "-S", "features_per_layer=2",
            "-S", "max_passages=4", "-S", "max_len=16", "-S", "toy_lm_steps=0", "-S", "toy_sae_steps=0",
            "-S", "generate_tokens=4"]  # the fixture model has a 32-token context
    env = {"NEURONPEDIA_API_URL": server.url, "NO_PROXY": "127.0.0.1,localhost"}
    try:
        result = run_dvc(["exp", "run", *args], project, env=env)
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert server.requests, "the features stage asked the server"

    features = pd.read_csv(project / "data/features.csv")
    assert list(features["layer"]) == [3, 3, 11, 11]
    assert set(features[features["layer"] == 3]["feature"]) <= GOOD_4
    assert set(features[features["layer"] == 11]["feature"]) <= GOOD_12
    assert (features["source"] == "neuronpedia").all()
    assert features["neuronpedia_url"].str.startswith("https://www.neuronpedia.org/gpt2-small/").all()
    per_feature = pd.read_csv(project / "metrics/per_feature_metrics.csv")
    head = per_feature[per_feature["alpha"] == 2.0]
    assert len(head) == 4 and head["label"].notna().all()
    assert all(len(json.loads(tokens)) == 10 for tokens in head["np_pos_tokens"])  # beside our own deltas
    cached = sorted(p.name for p in (project / "data/neuronpedia_cache").rglob("*.json"))
    assert cached

    # The same stage again, no server anywhere: every response comes from the cache.
    before = (project / "data/features.csv").read_bytes()
    again = run_dvc(["repro", "--force", "--single-item", "features"], project,
                    env={"NEURONPEDIA_API_URL": closed_port_url()})
    assert again.returncode == 0, again.stdout + again.stderr
    assert (project / "data/features.csv").read_bytes() == before
