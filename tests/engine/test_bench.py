"""The benchmark's two ways agree, and its comparison means what it says (no timing here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.bench import COMPARED, max_rel_diff, metrics_table, plain_way, run_bench
from pipeline.engine.run import run_layer
from tests.builders import build_model, build_sae, build_tokens
from tests.conftest import ROOT, run_cli


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


@pytest.fixture
def small_bench(monkeypatch):
    """pipeline.bench with the GPT-2 shape and the SAE shrunk to toy size; the code path is the real one.

    Everything that sizes the bench is read from pipeline.bench.workloads, which is what is patched (and returned).
    """
    from pipeline.bench import workloads as shapes

    monkeypatch.setattr(shapes, "GPT2_SMALL_SHAPE", dict(n_layers=12, d_model=768 // 24, n_heads=2, d_head=16,
                                                         d_mlp=64, n_ctx=64, d_vocab=300, act_fn="gelu_new",
                                                         normalization_type="LN"))
    monkeypatch.setattr(shapes, "D_SAE", 128)

    def small_sae(device, dtype, hook, seed=0):
        from sae_lens import StandardSAE, StandardSAEConfig
        from sae_lens.saes.sae import SAEMetadata

        torch.manual_seed(seed)
        return StandardSAE(StandardSAEConfig(d_in=32, d_sae=128, dtype=dtype, device=str(device),
                                             metadata=SAEMetadata(hook_name=hook))).eval().requires_grad_(False)

    monkeypatch.setattr(shapes, "build_sae", small_sae)
    return shapes


def test_bench_runs_end_to_end_on_the_cpu_quick_path(small_bench, monkeypatch):
    """The real bench code path on toy sizes (the timings are not checked, the agreement is)."""
    monkeypatch.setattr(small_bench, "workloads", lambda quick, full: [  # noqa: ARG005
        small_bench.Workload("dense", 6, 2, (0.0, 1.0, 2.0), 3, 16, 2, None)])
    out = run_bench(device="cpu", quick=True, log=lambda *_: None)
    for key in ("speedup_vs_plain", "max_rel_diff", "tokens_per_s", "floor_fraction", "peak_mem_bytes", "device",
                "engine_vs_float64", "plain_vs_float64"):
        assert key in out, key
    assert out["max_rel_diff"] < 1e-4 and out["engine_vs_float64"] < 1e-4
    assert out["generation"]["rows"] == 1 * (1 + 2 * 2) * 2 and out["generation_tokens_per_s"] > 0
    assert out["screen"]["firing_pairs"] > 0 and out["screen_over_floor"] == out["screen"]["screen_s"] / out["screen"]["floor_s"]


def test_full_study_headline_sums_every_layer_not_the_first(small_bench, monkeypatch):
    monkeypatch.setattr(small_bench, "workloads", lambda quick, full: [  # noqa: ARG005
        small_bench.Workload(f"full-L{layer}", layer, 2, (0.0, 2.0), 3, 16, 2, None) for layer in (2, 9)])
    out = run_bench(device="cpu", full=True, log=lambda *_: None)
    runs = list(out["workloads"].values())
    engine_s, plain_s = sum(r["engine_s"] for r in runs), sum(r["plain_s"] for r in runs)
    assert math.isclose(out["full_study_engine_s"], engine_s)
    assert math.isclose(out["speedup_vs_plain"], plain_s / engine_s)
    assert out["max_rel_diff"] == max(r["max_rel_diff"] for r in runs)
    assert out["peak_mem_bytes"] == max(r["peak_mem_bytes"] for r in runs)


def test_precision_cost_is_per_metric_and_counts_one_sided_nan_instead_of_hiding_it():
    from pipeline.bench import precision_cost

    ref = np.ones((2, 3, len(COMPARED)))
    low = ref.copy()
    low[0, 0, COMPARED.index("kl")] = 1.5  # 50% of kl's scale
    low[1, 2, COMPARED.index("delta_ce")] = 1.01
    low[1, 1, COMPARED.index("kl_live")] = float("nan")  # the feature never fires in low precision
    cost = precision_cost(low, ref)
    assert math.isclose(cost["rel_diff_vs_float32"]["kl"], 0.5)
    assert math.isclose(cost["rel_diff_vs_float32"]["delta_ce"], 0.01, rel_tol=1e-9)
    assert cost["rel_diff_vs_float32"]["kl_live"] == 0.0 and cost["nan_mismatches"] == 1
    assert math.isclose(cost["max_rel_diff_vs_float32"], 0.5)


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "gpu0"], "error: --device is 'gpu0'; allowed: auto, cpu, cuda, cuda:N or mps"),
    (["--device", "cpu", "--dtype", "fp8"], "error: --dtype is 'fp8'; allowed: float32, bfloat16, float16"),
    (["--device", "cpu", "--control-draws", "-1"], "error: --control-draws is -1; allowed: 0 (none) or more"),
    (["--device", "cpu", "--threads", "0"], "error: --threads is 0; allowed: 1 or more"),
])
def test_bad_bench_options_are_one_line_naming_the_option(tmp_path, args, message):
    out = tmp_path / "bench.json"
    proc = run_cli(["bench", *args, "--out", str(out)], ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message
    assert "Traceback" not in proc.stdout + proc.stderr and not out.exists()
