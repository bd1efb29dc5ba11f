"""Loading: the toy's files load back like a user's own, and the hub path calls SAE-Lens and
TransformerLens with the right arguments (stand-ins replace the downloads here)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.core.errors import UserError
from pipeline.core.params.config import parse_params
from pipeline.core.params.device import resolve_device
from pipeline.core.plan.layers import LayerPlan, plan_layers
from pipeline.load import library as loading
from pipeline.toy.build import new_toy_model, new_toy_sae, save_toy
from tests.builders import build_model, build_sae, build_tokens


def test_toy_files_load_back_with_sae_lens_and_give_the_same_outputs(tmp_path):
    from sae_lens import SAE

    model = new_toy_model(seed=7)
    saes = {layer: new_toy_sae(layer, model.cfg.d_model, 32, seed=7) for layer in (0, 11)}
    save_toy(tmp_path, model, saes, seed=7)

    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["n_layers"] == 12 and cfg["d_vocab"] == 257
    loaded = loading.local_model(tmp_path / "model", torch.device("cpu"), torch.float32)
    tokens = build_tokens(n=2, t=16, d_vocab=257, bos=256)
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))

    for layer, sae in saes.items():
        back = SAE.load_from_disk(tmp_path / "saes" / f"blocks.{layer}.hook_resid_post")
        assert back.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        x = torch.randn(3, 5, model.cfg.d_model)
        with torch.no_grad():
            assert torch.equal(sae.encode(x), back.encode(x))
            assert torch.equal(sae.decode(sae.encode(x)), back.decode(back.encode(x)))


def test_the_toy_is_deterministic_from_its_seed():
    a, b, c = new_toy_model(3), new_toy_model(3), new_toy_model(4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.W_E, c.W_E)


def test_hub_loading_uses_the_release_id_and_recorded_model_kwargs(monkeypatch):
    """The gpt2-small path, with SAE.from_pretrained / HookedTransformer.from_pretrained replaced
    by tiny stand-ins: what matters is what they are called with."""
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    calls = {}

    def fake_sae(release, sae_id, device="cpu", dtype="float32"):
        calls.setdefault("sae", []).append((release, sae_id, device, dtype))
        sae = build_sae(hook_name=sae_id)
        sae.cfg.metadata.model_from_pretrained_kwargs = {"center_writing_weights": True}
        return sae

    def fake_model(name, **kwargs):
        calls["model"] = (name, kwargs)
        return build_model(d_model=16)

    monkeypatch.setattr(SAE, "from_pretrained", staticmethod(fake_sae))
    monkeypatch.setattr(HookedTransformer, "from_pretrained", staticmethod(fake_model))
    monkeypatch.setattr(loading, "hub_tokenizer", lambda official, revision: ("tokenizer", official, revision))
    config = parse_params({"layers": [4, 11]})
    plans = plan_layers(config)
    saes = [loading.sae_from_source(config.sae_release, p, torch.device("cpu"), "float32") for p in plans]
    kwargs = loading.sae_model_kwargs(saes)
    loading.model_from_source(config.model, torch.device("cpu"), "float32", kwargs)
    assert calls["sae"] == [
        ("gpt2-small-res-jb", "blocks.5.hook_resid_pre", "cpu", "float32"),
        ("gpt2-small-res-jb", "blocks.11.hook_resid_post", "cpu", "float32"),
    ]
    name, kw = calls["model"]
    assert name == "gpt2-small"
    assert kw["center_writing_weights"] is True and kw["dtype"] == torch.float32
    # the tokenizer at the same revision as the weights (here: none pinned), padding nothing on the left
    assert kw["tokenizer"] == ("tokenizer", "gpt2", None) and kw["default_padding_side"] == "right"
    assert "revision" not in kw


def test_an_sae_reading_another_hook_is_refused():
    plan = LayerPlan(layer=3, hook="blocks.3.hook_resid_post", resume_at=4, sae_release="x", sae_id="y", neuronpedia=None)
    loading.check_sae(build_sae(hook_name="blocks.4.hook_resid_pre"), plan)  # same tensor: fine
    with pytest.raises(UserError, match="reads blocks.3.hook_resid_pre, not blocks.3.hook_resid_post"):
        loading.check_sae(build_sae(hook_name="blocks.3.hook_resid_pre"), plan)


def test_sae_kwargs_must_agree():
    a, b = build_sae(), build_sae()
    a.cfg.metadata.model_from_pretrained_kwargs = {"center_writing_weights": True}
    b.cfg.metadata.model_from_pretrained_kwargs = {}
    with pytest.raises(UserError, match="different model_from_pretrained_kwargs"):
        loading.sae_model_kwargs([a, b])


def test_cuda_asked_for_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="device is 'cuda' but CUDA is not available here"):
        resolve_device("cuda")
    assert resolve_device("auto").type in ("cpu", "mps")


def test_missing_local_model_names_the_fix(tmp_path):
    with pytest.raises(UserError, match="has no config.json; for the toy preset run `dvc repro model`"):
        loading.local_model(tmp_path, torch.device("cpu"), torch.float32)
