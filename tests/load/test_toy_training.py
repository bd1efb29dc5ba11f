"""The toy's training path end to end, on a narrow toy for a few steps (seconds, offline, CPU).

`build_trained_toy` is what the model stage runs for `preset: toy` with toy_lm_steps /
toy_sae_steps > 0; here it gets 2 layers of width 16 instead of 12 of width 64, and a handful of
steps, so the numbers mean little but every piece runs: the LM loop, SAE-Lens's SAETrainer, the
save formats, SAE-Lens's evals and quality.json.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from pipeline.core.plan.layers import LayerPlan
from pipeline.load.library import local_model, sae_from_source
from pipeline.toy import train
from pipeline.toy.build import build_trained_toy
from pipeline.toy.layout import TOY_MODEL_KWARGS, toy_sae_folder
from pipeline.toy.train import LMSettings, SAESettings

TINY_MODEL = {**TOY_MODEL_KWARGS, "n_layers": 2, "d_model": 16, "n_heads": 2, "d_head": 8, "d_mlp": 32, "n_ctx": 32}
TINY_LM = LMSettings(steps=4, batch_size=4)
TINY_SAE = SAESettings(steps=6, d_sae=32, batch_size=64, n_windows=8, norm_estimate_batches=2)


def build_tiny(out_dir: Path) -> dict:
    out_dir.mkdir()
    return build_trained_toy(out_dir, seed=5, lm=TINY_LM, sae=TINY_SAE, base=TINY_MODEL)


def weight_hashes(out_dir: Path) -> dict[str, str]:
    files = [out_dir / "model" / "model.safetensors", *sorted(out_dir.glob("saes/*/sae_weights.safetensors"))]
    return {str(f.relative_to(out_dir)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_a_tiny_trained_toy_loads_back_records_its_quality_and_rebuilds_byte_identically(tmp_path, monkeypatch):
    from sae_lens import SAE, StandardSAE

    # At these sizes PyTorch's thread-order-dependent kernels run serially, so the rebuild below
    # would match even without deterministic kernels; check directly that training asks for them.
    modes = []
    real_train_lm = train.train_lm

    def spy(*args, **kwargs):
        modes.append(torch.are_deterministic_algorithms_enabled())
        return real_train_lm(*args, **kwargs)

    monkeypatch.setattr(train, "train_lm", spy)
    before = torch.are_deterministic_algorithms_enabled()
    summary = build_tiny(tmp_path / "a")
    assert modes == [True] and torch.are_deterministic_algorithms_enabled() == before

    model = local_model(tmp_path / "a" / "model", torch.device("cpu"), torch.float32)
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab) == (2, 16, 257)
    for layer in range(2):
        folder = tmp_path / "a" / "saes" / toy_sae_folder(layer)
        sae = SAE.load_from_disk(folder)
        assert isinstance(sae, StandardSAE) and sae.cfg.d_sae == 32
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        # The training-time normalisation was folded into the weights.
        assert sae.cfg.normalize_activations == "none"
        plan = LayerPlan(layer, f"blocks.{layer}.hook_resid_post", layer + 1, str(tmp_path / "a" / "saes"),
                         toy_sae_folder(layer), None)
        assert sae_from_source(plan.sae_release, plan, torch.device("cpu"), "float32").cfg.d_in == 16

    quality = json.loads((tmp_path / "a" / "quality.json").read_text())
    lm = quality["lm"]
    assert lm["weights"] == "trained" and lm["settings"]["steps"] == 4
    # A byte model's unigram entropy on English and code is 4-6 bits; nothing beats 0 or is NaN.
    assert 4.0 < lm["unigram_bits_per_byte"] < 6.0
    assert 0.0 < lm["heldout_bits_per_byte"] < 10.0 and math.isfinite(lm["train_bits_per_byte"])
    assert quality["corpus"]["heldout_bytes"][0] == quality["corpus"]["train_bytes"][1]
    assert set(quality["saes"]["layers"]) == {"0", "1"}
    for q in quality["saes"]["layers"].values():
        assert 0.0 <= q["l0"] <= 32 and q["explained_variance"] <= 1.0
        assert all(math.isfinite(q[k]) for k in ("ce_loss_score", "ce_loss_with_sae", "ce_loss_with_ablation",
                                                  "ce_loss_without_sae", "kl_div_score"))
        assert 0 <= q["features_never_firing"] <= 32
    assert summary["weights"] == "trained" and summary["unigram_bits_per_byte"] == lm["unigram_bits_per_byte"]

    build_tiny(tmp_path / "b")
    assert weight_hashes(tmp_path / "a") == weight_hashes(tmp_path / "b")
    assert (tmp_path / "a" / "quality.json").read_bytes() == (tmp_path / "b" / "quality.json").read_bytes()
