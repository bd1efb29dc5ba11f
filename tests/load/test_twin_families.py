"""The equality tests tests/load/test_twin.py holds for res-jb, for OpenAI's TopK SAEs and for Gemma-2-2B with Gemma
Scope, through the pipeline's own loaders on the hub twin: the loaded model equals Hugging Face's from the same files
(and so does what later stages load from the model stage's processed files), the loaded SAE equals the twin's
tensors, and the engine's numbers equal SAE-Lens's own splice (HookedSAETransformer, error term kept). The worst
differences are printed (`pytest -s`) for docs/sae_families.md.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.core.params.config import parse_params
from pipeline.core.plan.layers import plan_layers, pretrained_directory
from tests.load.test_twin import CPU, snapshot

OAI = "gpt2-small-resid-post-v5-32k"
OAI_REPO = "jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs"
SCOPE = "gemma-scope-2b-pt-res-canonical"
SCOPE_REPO = "google/gemma-scope-2b-pt-res"
TEXT = ["Sequences are ordered collections. A dictionary maps hashable keys to arbitrary values, and sets hold "
        "unique items; a list is mutable, a tuple is not.", "The with statement wraps the execution of a block "
        "with methods defined by a context manager, so that common try, except and finally patterns are reused."]


@pytest.fixture
def offline(hub_twin, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hub_twin))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub_twin / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return hub_twin


def tokens_of(tokenizer_name: str, n_tokens: int) -> torch.Tensor:
    """BOS + each text's first tokens, with the pipeline's own tokenizer (which never pads)."""
    from pipeline.load.tokenizer import HFTokenizer

    tok = HFTokenizer(tokenizer_name)
    rows = [[tok.bos_token_id, *tok.encode(text)] for text in TEXT]
    width = min(n_tokens, *(len(r) for r in rows))
    return torch.tensor([r[:width] for r in rows])


def firing(sae, resid: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        acts = sae.encode(resid)[:, 1:-1]
    return torch.argsort((acts != 0).flatten(0, 1).sum(0), descending=True, stable=True)[:n].tolist()


def engine_against_splice(model, sae, plan, tokens: torch.Tensor, family: str, atol: float = 1e-6) -> float:
    """run_layer's metrics against the plain way through HookedSAETransformer with the same weights; returns the
    worst absolute difference of the compared metrics (and checks it). Two float32 computations of one definition:
    the splice recomputes decode(a') - decode(a) in float32, so even its alpha = 1 rows are off 0 by rounding
    (~1e-6 nats on Gemma's 2,304-wide residual), where the engine's are exactly 0."""
    from sae_lens import HookedSAETransformer

    from pipeline.bench import metrics_table, plain_way
    from pipeline.engine.forward import residual_at
    from pipeline.engine.run import run_layer

    spliced = HookedSAETransformer(model.cfg)
    spliced.load_state_dict(model.state_dict())
    spliced.eval()
    features = firing(sae, residual_at(model, tokens, plan.resume_at), 3)
    alphas = (0.0, 1.0, 2.0, 4.0)
    result = run_layer(model, sae, plan.resume_at, tokens, features, list(alphas), batch_size=2)
    ours = metrics_table(result.ce_clean, result.ce_int, result.kl, result.acts, len(features), len(alphas))
    plain = plain_way(spliced, sae, tokens, plan.hook, features, alphas, batch_size=2)
    theirs = metrics_table(plain["ce_clean"], plain["ce_int"], plain["kl"], plain["acts"], len(features), len(alphas))
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=atol)
    assert np.nanmax(np.abs(theirs[:, 0, 2])) > 1e-4  # ablating a feature that fires moves the model: not vacuous
    assert np.all(result.kl[:, 1] == 0) and np.all(result.ce_int[:, 1] == result.ce_clean)  # alpha = 1
    worst = float(np.nanmax(np.abs(ours - theirs)))
    print(f"{family} on the twin: engine vs SAE-Lens's splice, worst |difference| of the metrics = {worst:.1e}")
    return worst


# ---- OpenAI's TopK SAEs on GPT-2 Small ------------------------------------------------------------

@pytest.mark.usefixtures("offline")
def test_openai_topk_gpt2_loaded_as_the_release_asks_equals_hugging_faces():
    """The release records no model_from_pretrained_kwargs: GPT-2 with TransformerLens's defaults, whose
    log-probabilities are Hugging Face's from the same files."""
    from transformers import GPT2LMHeadModel

    from pipeline.core.plan.layers import model_from_pretrained_kwargs
    from pipeline.load.library import model_from_source

    config = parse_params({"sae_release": OAI})
    assert model_from_pretrained_kwargs(config) == {}
    model = model_from_source(config.model, CPU, "float32", model_from_pretrained_kwargs(config))
    hf = GPT2LMHeadModel.from_pretrained("gpt2").eval()
    tokens = tokens_of("gpt2", 24)
    with torch.no_grad():
        diff = (torch.log_softmax(model(tokens), -1) - torch.log_softmax(hf(tokens).logits, -1)).abs().max().item()
    assert diff < 1e-4


def test_openai_topk_engine_equals_sae_lens_splice_on_the_twin(offline):
    from safetensors.torch import load_file

    from pipeline.load.library import model_from_source, sae_from_source

    [plan] = plan_layers(parse_params({"sae_release": OAI, "layers": [6]}))
    sae = sae_from_source(OAI, plan, CPU, "float32")
    tensors = load_file(snapshot(offline, OAI_REPO) / pretrained_directory()[OAI].saes_map[plan.sae_id]
                        / "sae_weights.safetensors")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name).detach(), tensors[name]), name
    assert sae.cfg.normalize_activations == "layer_norm"
    model = model_from_source("gpt2-small", CPU, "float32", dict(sae.cfg.metadata.model_from_pretrained_kwargs or {}))
    assert engine_against_splice(model, sae, plan, tokens_of("gpt2", 24), "OpenAI TopK (layer_norm)") < 1e-4


# ---- Gemma-2-2B and Gemma Scope ------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma_stage(hub_twin, tmp_path_factory):
    """The model stage of the gemma-2-2b preset run on the twin: its record, and the directory it ran in."""
    import huggingface_hub.constants as c

    from pipeline.stages.model import run_model_stage

    work = tmp_path_factory.mktemp("gemma-model-stage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(hub_twin))
        mp.setattr(c, "HF_HUB_CACHE", str(hub_twin / "hub"))
        mp.setattr(c, "HF_HUB_OFFLINE", True)
        mp.chdir(work)
        record = run_model_stage(parse_params({"preset": "gemma-2-2b", "layers": [0, 13, 25], "device": "cpu"}))
    return record, work


def test_the_model_stage_records_gemma_2s_sharded_files_and_each_scope_sae(gemma_stage, hub_twin):
    record, _ = gemma_stage
    manifest = json.loads((hub_twin / "twin.json").read_text())
    files = {f["file"] for f in record["model"]["hub"]}
    index = json.loads((snapshot(hub_twin, "google/gemma-2-2b") / "model.safetensors.index.json").read_text())
    assert files >= {"config.json", "model.safetensors.index.json", "tokenizer.json", *index["weight_map"].values()}
    assert {f["revision"] for f in record["model"]["hub"]} == {manifest["repos"]["google/gemma-2-2b"]}
    assert record["tokenizer"] == {"type": "hf", "name": "google/gemma-2-2b", "bos_token_id": 2,
                                   "revision": manifest["repos"]["google/gemma-2-2b"]}
    assert [e["sae_id"] for e in record["layers"]] == [f"layer_{n}/width_16k/canonical" for n in range(26)]
    for entry in record["layers"]:
        [npz] = entry["hub"]
        assert npz["file"] == pretrained_directory()[SCOPE].saes_map[entry["sae_id"]] + "/params.npz"
        assert npz["revision"] == manifest["repos"][SCOPE_REPO] and len(npz["blob"]) == 64  # an LFS file: sha256
    assert (record["model"]["n_layers"], record["model"]["d_model"]) == (26, 2304)


@pytest.mark.usefixtures("offline")
def test_gemma_2_as_later_stages_load_it_equals_hugging_faces(gemma_stage, monkeypatch):
    """What the model stage loaded (config read from config.json) and what later stages load from its processed
    files give Hugging Face's Gemma2ForCausalLM log-probabilities; the processed model is the loaded one, bit for bit."""
    from transformers import Gemma2ForCausalLM

    from pipeline.core.plan.record import ModelRecord
    from pipeline.load import load_model
    from pipeline.load.library import model_from_source

    _, work = gemma_stage
    monkeypatch.chdir(work)
    record = ModelRecord.read()
    loaded = model_from_source("gemma-2-2b", CPU, "float32", {})
    later = load_model(record, CPU, "float32")
    hooked = load_model(record, CPU, "float32", hooks=True)
    hf = Gemma2ForCausalLM.from_pretrained("google/gemma-2-2b").eval()
    tokens = tokens_of("google/gemma-2-2b", 40)
    assert tokens.shape[1] > hf.config.sliding_window  # the local layers' window matters here
    with torch.no_grad():
        ours = loaded(tokens)
        assert torch.equal(later(tokens), ours) and torch.equal(hooked(tokens), ours)
        diff = (torch.log_softmax(ours, -1) - torch.log_softmax(hf(tokens).logits, -1)).abs().max().item()
    print(f"Gemma-2 twin through the pipeline's loaders: max |log p - log p_HF| = {diff:.1e}")
    assert diff < 1e-4


def test_gemma_scope_as_later_stages_load_it_equals_its_params_npz(gemma_stage, offline, monkeypatch):
    from pipeline.core.plan.record import ModelRecord
    from pipeline.load import load_sae
    from pipeline.load.processed.sae import ProcessedSAE

    _, work = gemma_stage
    monkeypatch.chdir(work)
    index = json.loads((work / "data/gemma-2-2b/processed/saes.json").read_text())
    assert {e["tensors"] for e in index.values()} == {"npz"}  # read from the cache, no 302 MB copy each
    sae = load_sae(ModelRecord.read(), 13, CPU, "float32")
    assert isinstance(sae, ProcessedSAE) and sae.cfg.metadata.hook_name == "blocks.13.hook_resid_post"
    folder = pretrained_directory()[SCOPE].saes_map["layer_13/width_16k/canonical"]
    with np.load(snapshot(offline, SCOPE_REPO) / folder / "params.npz") as params:
        for name in params:
            assert torch.equal(getattr(sae, name), torch.from_numpy(np.ascontiguousarray(params[name]))), name


@pytest.mark.usefixtures("offline")
def test_gemma_scope_engine_equals_sae_lens_splice_on_the_twin():
    from pipeline.load.library import model_from_source, sae_from_source

    [plan] = plan_layers(parse_params({"preset": "gemma-2-2b", "layers": [20]}))
    sae = sae_from_source(SCOPE, plan, CPU, "float32")
    model = model_from_source("gemma-2-2b", CPU, "float32", dict(sae.cfg.metadata.model_from_pretrained_kwargs or {}))
    worst = engine_against_splice(model, sae, plan, tokens_of("google/gemma-2-2b", 24), "Gemma Scope (JumpReLU)",
                                  atol=1e-5)
    assert worst < 1e-4
