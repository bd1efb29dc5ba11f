"""The bench's profile, control timing and targets: what they report means what it says (no timing asserted)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.bench import profile as prof
from pipeline.bench import run_bench
from pipeline.bench.targets import CPU_TARGETS, check_targets, target_lines
from pipeline.engine.controls import random_unit_directions
from pipeline.engine.run import run_layer
from tests.builders import build_model, build_sae, build_tokens
from tests.engine.test_bench import small_bench  # noqa: F401  (the fixture)


def test_every_profiled_part_names_a_function_the_engine_has():
    for module, path, _, _ in prof.ENGINE_PARTS:
        owner, attr = prof._resolve(module, path)
        assert callable(getattr(owner, attr)), (module, path)


def test_the_profile_adds_up_and_changes_no_number():
    model, sae, tokens = build_model(), build_sae(enc_bias=-0.3), build_tokens(n=5, t=12)
    controls = random_unit_directions(1, 1, [3, 7], 2, 16)

    def call():
        return run_layer(model, sae, 2, tokens, [3, 7], [0.0, 1.0, 2.0], batch_size=2, controls=controls)

    plain = call()
    originals = {path: prof._resolve(module, path) for module, path, _, _ in prof.ENGINE_PARTS}
    originals = {path: getattr(owner, attr) for path, (owner, attr) in originals.items()}
    profiled, profile = prof.profile_call(call, torch.device("cpu"))
    for name in ("ce_int", "kl", "delta_sum", "ctrl_ce_int", "ctrl_kl"):
        assert np.array_equal(getattr(profiled, name), getattr(plain, name)), name
    for part in ("prefix forward + encoder", "clean block: suffix forward", "clean block: unembedding",
                 "rows: suffix forward", "rows: unembedding", "rows: logit deltas", "row planning"):
        assert profile.parts.get(part, 0) > 0, part
    for parts, total in ((profile.parts, profile.total_s), (profile.cpu_parts, profile.total_cpu_s)):
        assert all(seconds >= 0 for seconds in parts.values())
        assert sum(parts.values()) == pytest.approx(total, rel=1e-6)
    assert set(profile.cpu_parts) == set(profile.parts)
    assert len(profile.table(cpu=True)) == len(profile.table(cpu=False)) == len(profile.parts) + 2
    for module, path, _, _ in prof.ENGINE_PARTS:  # every wrapper is gone again
        owner, attr = prof._resolve(module, path)
        assert getattr(owner, attr) is originals[path], path


def test_a_wrapped_call_inside_another_is_counted_once():
    timer = prof._Timer(lambda: None)
    inner = timer.wrap(lambda: sum(range(20000)), "inner", False)
    outer = timer.wrap(lambda: [inner() for _ in range(3)], "outer", True)
    outer()
    assert set(timer.parts) == {"outer: inner", "outer: other"}
    assert timer.parts["outer: inner"] > 0 and timer.parts["outer: other"] >= 0


def _results(device="cpu (x86_64, 2 threads)", shape="default", dense=3.1, sparse=9.9, floor=0.5):
    return {"device": device, "shape": shape,
            "workloads": {"dense": {"speedup_vs_plain": dense, "floor_fraction": floor},
                          "sparse": {"speedup_vs_plain": sparse, "floor_fraction": 0.1}}}


def test_targets_say_met_at_or_above_the_target_and_not_met_below():
    checked = {(c["workload"], c["figure"]): c for c in check_targets(_results())}
    assert len(checked) == len(CPU_TARGETS)
    assert checked["dense", "speedup_vs_plain"]["met"] and checked["dense", "floor_fraction"]["met"]  # 0.5 >= 0.5
    assert not checked["sparse", "speedup_vs_plain"]["met"]
    lines = target_lines(list(checked.values()))
    assert sum("NOT met" in line for line in lines) == 1
    assert not any("CPU time" in line for line in lines)  # not in these results: not printed
    results = _results(sparse=12.0)
    results["workloads"]["dense"]["speedup_vs_plain_cpu_time"] = 3.4
    lines = target_lines(check_targets(results))
    assert sum("by CPU time: 3.40" in line for line in lines) == 1 and not any("NOT met" in line for line in lines)
    assert not any("CPU time" in line for line in target_lines(check_targets(results, by_cpu_time=False)))


@pytest.mark.parametrize("kw", [{"device": "cuda (NVIDIA H100 80GB HBM3)"}, {"shape": "quick"}, {"shape": "full"}])
def test_targets_are_only_judged_on_the_cpu_default_shape(kw):
    assert check_targets(_results(**kw)) == []


def test_bench_times_the_controls_and_profiles_on_request(small_bench, monkeypatch):  # noqa: F811
    monkeypatch.setattr(small_bench, "workloads", lambda quick, full: [  # noqa: ARG005
        small_bench.Workload("dense", 6, 2, (0.0, 1.0, 2.0), 3, 16, 2, None)])
    out = run_bench(device="cpu", quick=True, control_draws=2, reference=False, log=lambda *_: None)
    dense = out["workloads"]["dense"]
    assert dense["control_draws"] == 2 and dense["engine_with_controls_s"] > 0
    assert dense["controls_s"] == pytest.approx(dense["engine_with_controls_s"] - dense["engine_s"])
    assert dense["rows_run_with_controls"] == 3 * dense["rows_run"]  # each row and its 2 controls
    assert dense["speedup_vs_plain_with_controls"] == pytest.approx(dense["plain_s"] / dense["engine_with_controls_s"])
    assert dense["speedup_vs_plain_cpu_time"] == pytest.approx(dense["plain_cpu_s"] / dense["engine_cpu_s"])
    assert out["targets"] == []  # the quick shape is not what the targets are for
    lines = []
    out = run_bench(device="cpu", quick=True, control_draws=2, profile=True, log=lines.append)
    assert set(out["profile"]["dense"]) == {"control_draws_0", "control_draws_2"}
    with_controls = out["profile"]["dense"]["control_draws_2"]
    assert with_controls["rows_run"] == 3 * out["profile"]["dense"]["control_draws_0"]["rows_run"]
    assert any("rows: suffix forward" in line for line in lines)
    assert out["workloads"] == {}  # the profile only: no plain way, no float64 reference
