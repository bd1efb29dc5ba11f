"""The benchmark's two ways agree, and its comparison means what it says (no timing here)."""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.bench import COMPARED, max_rel_diff, metrics_table, plain_way
from pipeline.engine.run import run_layer
from tests.builders import build_model, build_sae, build_tokens


def test_plain_sae_lens_way_and_engine_give_the_same_metrics():
    from sae_lens import HookedSAETransformer

    model = build_model(HookedSAETransformer)
    sae = build_sae(hook_name="blocks.1.hook_resid_post", enc_bias=-0.8)
    tokens = build_tokens(n=6, t=12)
    features, alphas = [2, 9, 40], (0.0, 0.5, 1.0, 2.0, 4.0)
    plain = plain_way(model, sae, tokens, "blocks.1.hook_resid_post", features, alphas, batch_size=4)
    ours = run_layer(model, sae, 2, tokens, features, list(alphas), batch_size=4)
    plain_table = metrics_table(plain["ce_clean"], plain["ce_int"], plain["kl"], plain["acts"], 3, 5)
    our_table = metrics_table(ours.ce_clean, ours.ce_int, ours.kl, ours.acts, 3, 5)
    assert plain_table.shape == (3, 5, len(COMPARED))
    assert max_rel_diff(our_table, plain_table) < 1e-4
    assert np.abs(our_table[:, 2, COMPARED.index("kl")]).max() == 0.0  # alpha = 1: exactly the clean model


def test_max_rel_diff_is_relative_to_each_metrics_scale_and_flags_one_sided_nan():
    a = np.zeros((1, 2, len(COMPARED)))
    b = a.copy()
    b[0, 0, 0], a[0, 0, 0] = 10.0, 10.1  # 1% of the metric's largest value
    assert math.isclose(max_rel_diff(a, b), 0.01, rel_tol=1e-9)
    a[0, 1, 1] = float("nan")
    assert max_rel_diff(a, b) == math.inf
    b[0, 1, 1] = float("nan")  # NaN on both sides (e.g. no live position) is agreement
    assert math.isclose(max_rel_diff(a, b), 0.01, rel_tol=1e-9)


def test_bench_runs_end_to_end_on_the_cpu_quick_path(monkeypatch):
    """The real bench code path on a GPT-2 shape shrunk to toy size (the figures are not checked)."""
    import pipeline.bench as bench

    monkeypatch.setattr(bench, "GPT2_SMALL_SHAPE", dict(n_layers=12, d_model=768 // 24, n_heads=2, d_head=16,
                                                        d_mlp=64, n_ctx=64, d_vocab=300, act_fn="gelu_new",
                                                        normalization_type="LN"))
    monkeypatch.setattr(bench, "D_SAE", 128)
    real_build_sae = bench.build_sae

    def small_sae(device, dtype, hook, seed=0):
        from sae_lens import StandardSAE, StandardSAEConfig
        from sae_lens.saes.sae import SAEMetadata

        torch.manual_seed(seed)
        return StandardSAE(StandardSAEConfig(d_in=32, d_sae=128, dtype=dtype, device=str(device),
                                             metadata=SAEMetadata(hook_name=hook))).eval().requires_grad_(False)

    monkeypatch.setattr(bench, "build_sae", small_sae)
    monkeypatch.setattr(bench, "workloads", lambda quick, full: [  # noqa: ARG005
        bench.Workload("dense", 6, 2, (0.0, 1.0, 2.0), 3, 16, 2, None)])
    out = bench.run_bench(device="cpu", quick=True, log=lambda *_: None)
    assert real_build_sae is not small_sae
    for key in ("speedup_vs_plain", "max_rel_diff", "tokens_per_s", "floor_fraction", "peak_mem_bytes", "device",
                "engine_vs_float64", "plain_vs_float64"):
        assert key in out, key
    assert out["max_rel_diff"] < 1e-4 and out["engine_vs_float64"] < 1e-4
