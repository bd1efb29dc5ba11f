"""The real gpt2-small loaders, run offline on the hub twin (`python -m pipeline twin DIR`; the study end to
end on it: tests/e2e/test_twin_study.py).

The twin is a Hugging Face cache holding GPT-2, the res-jb SAEs and WikiText-2 in the formats the
hub serves, with seeded random weights. Nothing is stubbed: TransformerLens converts the Hugging
Face weights, SAE-Lens parses the release's legacy configs, `datasets` reads WikiText-2 from its
cache, and the study's stages run as `dvc exp run` with the committed params.yaml and size
overrides only. The numbers mean nothing (random weights); the code path is what is proved.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.params.config import parse_params
from pipeline.core.plan.layers import plan_layers
from pipeline.twin.build import D_SAE, RELEASE, SCALES
from pipeline.twin.hub_cache import repo_folder
from tests.conftest import run_cli

CPU = torch.device("cpu")
SAE_REPO = "jbloom/GPT2-Small-SAEs-Reformatted"
SIZE = ["-S", "max_passages=4", "-S", "max_len=32", "-S", "features_per_layer=1"]


def snapshot(twin: Path, repo_id: str) -> Path:
    root = twin / "hub" / repo_folder(repo_id)
    return root / "snapshots" / (root / "refs" / "main").read_text()


def twin_env(twin: Path, **extra: str) -> dict[str, str]:
    return {"HF_HOME": str(twin), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "NO_PROXY": "127.0.0.1,localhost", **extra}


def twin_without(twin: Path, tmp_path: Path, relative: str) -> Path:
    """A cheap copy of the twin (links to its blobs) with one snapshot file missing."""
    home = tmp_path / "hf"
    for top in ("hub", "datasets"):
        shutil.copytree(twin / top, home / top, symlinks=True,
                        ignore=lambda d, names: names if Path(d).name == "blobs" else [])
    for blobs in (twin / "hub").glob("*/blobs"):
        target = home / "hub" / blobs.parent.name / "blobs"
        target.rmdir()
        target.symlink_to(blobs)
    (home / relative).unlink()
    return home


@pytest.fixture(scope="module")
def study():
    return parse_params({"device": "cpu"})


@pytest.fixture(scope="module")
def plans(study):
    return {p.layer: p for p in plan_layers(study)}


# ---- what the loaders make of the twin ---------------------------------------------------------

@pytest.mark.usefixtures("offline_twin")
def test_transformer_lens_logits_equal_hugging_face_gpt2_from_the_same_files():
    """TransformerLens's weight processing (fold_ln, center_writing_weights, center_unembed) keeps
    the log-probabilities of Hugging Face's own GPT2LMHeadModel, from the same cached files."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from pipeline.load.library import model_from_source

    model = model_from_source("gpt2-small", CPU, "float32", {"center_writing_weights": True})
    hf = GPT2LMHeadModel.from_pretrained("gpt2").eval()
    tokenizer = AutoTokenizer.from_pretrained("gpt2")
    assert model.cfg.d_model == SCALES["tiny"].n_embd and model.cfg.d_vocab == SCALES["tiny"].vocab_size
    assert tokenizer.bos_token_id == model.tokenizer.bos_token_id == SCALES["tiny"].vocab_size - 1
    tokens = model.to_tokens(["The cat sat on the mat.", "Lists are mutable sequences of objects"])
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    with torch.no_grad():
        ours = torch.log_softmax(model(tokens), -1)
        theirs = torch.log_softmax(hf(tokens).logits, -1)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert not torch.equal(ours[0, 1], ours[0, 2])  # not a degenerate model


def test_sae_lens_loads_the_twins_tensors_and_the_releases_config(offline_twin, plans):
    from pipeline.load.library import sae_from_source

    plan = plans[3]
    assert plan.sae_id == "blocks.4.hook_resid_pre"
    sae = sae_from_source(RELEASE, plan, CPU, "float32")
    files = snapshot(offline_twin, SAE_REPO) / plan.sae_id
    tensors = load_file(files / "sae_weights.safetensors")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name).detach(), tensors[name]), name
    assert sae.cfg.d_sae == D_SAE and sae.cfg.d_in == SCALES["tiny"].n_embd
    assert sae.cfg.architecture() == "standard" and sae.cfg.apply_b_dec_to_input
    assert sae.cfg.metadata.hook_name == "blocks.4.hook_resid_pre"
    assert sae.cfg.metadata.context_size == 128
    assert sae.cfg.metadata.model_from_pretrained_kwargs == {"center_writing_weights": True}
    assert sae.cfg.metadata.neuronpedia_id == "gpt2-small/4-res-jb"


@pytest.mark.usefixtures("offline_twin")
def test_the_gpt2_tokenizers_offsets_give_the_same_tokens_and_each_token_its_document():
    from pipeline.load.corpus import heading_starts, window_documents
    from pipeline.load.tokenizer import HFTokenizer

    tok = HFTokenizer("gpt2")
    text = " = First = \n\n The first article , with words .\n \n = = A section = = \n More text .\n = Second = \n Its text .\n"
    ids, starts = tok.encode_with_starts(text)
    assert ids == tok.encode(text)
    assert starts == sorted(starts) and starts[0] >= 0 and starts[-1] < len(text)
    second = text.index(" = Second")
    doc_starts = heading_starts(text)
    assert doc_starts == (0, second)
    docs = window_documents(np.asarray(starts), doc_starts, n_windows=1, max_len=len(ids) + 1)
    assert docs.tolist() == [0]  # most of the one window is the first article
    last = window_documents(np.asarray(starts[-6:]), doc_starts, n_windows=1, max_len=7)
    assert last.tolist() == [1]


@pytest.mark.usefixtures("offline_twin")
def test_engine_numbers_equal_sae_lens_own_splice_on_the_loaded_model(plans):
    """run_layer on the pipeline's model against HookedSAETransformer with the SAE spliced in
    (use_error_term) and its feature activation scaled: the plain way of SAE-Lens's docs."""
    from sae_lens import HookedSAETransformer

    from pipeline.bench import max_rel_diff, metrics_table, plain_way
    from pipeline.engine.run import run_layer
    from pipeline.load.library import model_from_source, sae_from_source

    plan = plans[5]
    model = model_from_source("gpt2-small", CPU, "float32", {"center_writing_weights": True})
    sae = sae_from_source(RELEASE, plan, CPU, "float32")
    spliced = HookedSAETransformer.from_pretrained("gpt2-small", center_writing_weights=True, device="cpu")
    text = "Sequences are ordered collections. A dictionary maps keys to values, and sets hold unique items."
    tokens = model.to_tokens([text, text[::-1]], padding_side="right")[:, :24]
    with torch.no_grad():
        acts = sae.encode(model.run_with_cache(tokens, names_filter=[plan.hook])[1][plan.hook])[:, 1:-1]
    features = acts.amax(dim=(0, 1)).topk(3).indices.tolist()  # features that fire here
    alphas = (0.0, 1.0, 2.0, 4.0)
    result = run_layer(model, sae, plan.resume_at, tokens, features, list(alphas), batch_size=2)
    ours = metrics_table(result.ce_clean, result.ce_int, result.kl, result.acts, len(features), len(alphas))
    plain = plain_way(spliced, sae, tokens, plan.hook, features, alphas, batch_size=2)
    theirs = metrics_table(plain["ce_clean"], plain["ce_int"], plain["kl"], plain["acts"], len(features), len(alphas))
    # Two float32 computations of the same definition: equal to float32 rounding (~1e-8 nats absolute on
    # these small effects; a wrong hook, sign or position would be off by the effect itself).
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-6)
    assert max_rel_diff(ours, theirs) < 1e-2
    assert np.all(result.kl[:, 1] == 0) and np.all(result.ce_int[:, 1] == result.ce_clean)  # alpha = 1


# ---- a file missing from the twin: one line, naming it ------------------------------------------

@pytest.mark.parametrize(("stage", "missing", "named"), [
    ("model", f"hub/{repo_folder('gpt2')}/snapshots/*/model.safetensors", "gpt2/model.safetensors"),
    ("model", f"hub/{repo_folder(SAE_REPO)}/snapshots/*/blocks.7.hook_resid_pre/sae_weights.safetensors",
     f"{SAE_REPO}/blocks.7.hook_resid_pre/sae_weights.safetensors"),
    ("tokenize", "datasets/Salesforce___wikitext/wikitext-2-raw-v1/*/*/wikitext-test.arrow", "wikitext-test.arrow"),
])
def test_a_file_missing_from_the_cache_is_one_line_naming_it(twin, tmp_path, stage, missing, named):
    [relative] = [p.relative_to(twin) for p in twin.glob(missing)]
    home = twin_without(twin, tmp_path, str(relative))
    work = tmp_path / "work"
    work.mkdir()
    env = twin_env(home)
    if stage == "tokenize":  # it needs the model stage's record first
        assert run_cli(["--params", str(Path(__file__).parents[2] / "params.yaml"), "model"], cwd=work,
                       env=env).returncode == 0
    result = run_cli(["--params", str(Path(__file__).parents[2] / "params.yaml"), stage], cwd=work, env=env)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and named in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_scale_is_one_line(tmp_path):
    result = run_cli(["twin", str(tmp_path / "t"), "--scale", "huge"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --scale is 'huge'; allowed: tiny, full"


def test_no_stage_knows_about_the_twin():
    """To the pipeline the twin is only a Hugging Face cache: only the `twin` command imports it."""
    package = Path(__file__).parents[2] / "pipeline"
    importers = {str(p.relative_to(package)) for p in package.rglob("*.py")
                 if "pipeline.twin" in p.read_text(encoding="utf-8") and p.parent.name != "twin"}
    assert importers == {"cli.py"}


@pytest.mark.parametrize("scale", list(SCALES))
def test_each_scales_wikitext_holds_the_default_studys_passages(scale):
    """200 windows of 255 tokens (max_len 256 less BOS) from the test split, at each scale's tokenizer."""
    from pipeline.twin import build, gpt2, wikitext

    splits = {name: wikitext.wikitext_rows(items) for name, items in build.split_articles(build.articles()).items()}
    tokenizer = gpt2.train_tokenizer("".join(r for rows in splits.values() for r in rows), SCALES[scale].vocab_size,
                                     build.LEARNED_VOCAB)
    from tokenizers import Tokenizer

    n_tokens = len(Tokenizer.from_str(tokenizer.tokenizer_json).encode("".join(splits["test"])).ids)
    defaults = parse_params({})
    assert n_tokens // (defaults.max_len - 1) >= defaults.max_passages
    assert any(row.startswith(" = ") and row.endswith(" = \n") for row in splits["test"])  # article headings
