"""`run_bench`: each workload through the engine, the plain way and the float64 definition, and the printed table."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bench import workloads as wl
from pipeline.bench.generation import generation_throughput
from pipeline.bench.measure import (
    device_consistency,
    engine_flops,
    matmul_rates,
    peak_memory,
    plain_flops,
    reset_peak_memory,
    sync,
    timed_engine,
)
from pipeline.bench.profile import clean_cpu_times, profile_workload
from pipeline.bench.references import (
    COMPARED,
    float64_reference,
    max_abs_diff,
    max_rel_diff,
    metrics_table,
    plain_way,
    precision_cost,
)
from pipeline.bench.screen import screen_timing
from pipeline.bench.targets import check_targets, target_lines
from pipeline.core.errors import UserError
from pipeline.core.io import write_json
from pipeline.core.params.config import DTYPES
from pipeline.core.params.device import resolve_device, torch_dtype
from pipeline.core.quiet import quiet_library_warnings
from pipeline.engine.run import run_layer

DEFAULT_CONTROL_DRAWS = 8  # params.yaml's control_draws: the study runs them


def run_workload(w: wl.Workload, device: torch.device, dtypes: list[str], skip_plain: bool, log,
                 reference: bool = True, control_draws: int = 0) -> dict[str, Any]:
    inputs = wl.prepare(w, device)
    model, sae, tokens, features, hook, resume_at = (inputs.model, inputs.sae, inputs.tokens, inputs.features,
                                                     inputs.hook, inputs.resume_at)
    run_layer(model, sae, resume_at, tokens[:2, :16].cpu(), features[:1], [2.0], batch_size=2)  # warm-up

    reset_peak_memory(device)
    cpu_start = time.process_time()
    result, engine_table, engine_s = timed_engine(model, sae, resume_at, tokens, features, w)
    engine_cpu_s = time.process_time() - cpu_start
    engine_peak = peak_memory(device)
    flops = engine_flops(result, w.n_passages, w.max_len, resume_at)
    rate, rate_cpu = matmul_rates(device)
    n_variants = len(features) * len(w.alphas)
    out: dict[str, Any] = {
        "workload": w.describe(),
        "tokens": w.n_passages * w.max_len,
        "measured_density": float((result.acts[:, 1:-1] > 0).mean()),
        "engine_s": engine_s,
        "tokens_per_s": w.n_passages * w.max_len * n_variants / engine_s,
        "engine_flops": flops,
        "matmul_flops_per_s": rate,
        "floor_fraction": flops / rate / engine_s,
        # the same from CPU time per thread (the engine's, and the matmul rate's): what the floor fraction would be
        # if the engine had had the cores to itself; a shared machine lengthens the wall times, not these. With
        # several threads a thread that waits for a descheduled one spins, which counts as CPU time: only with
        # one thread (--threads 1) are they clean, and only then are they printed.
        "engine_cpu_s": engine_cpu_s,
        "matmul_flops_per_cpu_s": rate_cpu,
        "floor_fraction_cpu_time": flops / rate_cpu / (engine_cpu_s / torch.get_num_threads()),
        "peak_mem_bytes": engine_peak,
        "rows_run": result.stats.rows_run,
        "rows_total": result.stats.rows_total,
        "min_position_kl": float(result.kl.min()),  # >= 0: no position's KL is negative
    }
    log(f"  engine  {engine_s:8.2f} s  ({out['tokens_per_s']:,.0f} intervened tokens/s, "
        f"floor fraction {out['floor_fraction']:.2f}, {result.stats.rows_run}/{result.stats.rows_total} rows run)"
        + (f"; by CPU time: floor fraction {out['floor_fraction_cpu_time']:.2f}" if clean_cpu_times(device) else ""))

    if not skip_plain:
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        plain = plain_way(model, sae, tokens, hook, features, w.alphas, w.batch_size)
        plain_table = metrics_table(plain["ce_clean"], plain["ce_int"], plain["kl"], plain["acts"],
                                    len(features), len(w.alphas))
        sync(device)
        plain_s, plain_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        out |= {
            "plain_s": plain_s,
            "plain_cpu_s": plain_cpu_s,
            "plain_flops": plain_flops(w.n_passages, w.max_len, n_variants),
            "speedup_vs_plain": plain_s / engine_s,
            "speedup_vs_plain_cpu_time": plain_cpu_s / engine_cpu_s,
            "max_rel_diff": max_rel_diff(engine_table, plain_table),
            "max_abs_diff": float(np.nanmax(np.abs(engine_table - plain_table))),
        }
        log(f"  plain   {plain_s:8.2f} s  -> engine speed-up {out['speedup_vs_plain']:.1f}x"
            + (f" (by CPU time {out['speedup_vs_plain_cpu_time']:.1f}x)" if clean_cpu_times(device) else "")
            + f", max relative difference {out['max_rel_diff']:.2e}")
    if control_draws:  # what the study pays on top: its random-direction controls (the plain way runs none)
        reset_peak_memory(device)
        cpu_start = time.process_time()
        ctrl, _, ctrl_s = timed_engine(model, sae, resume_at, tokens, features, w,
                                       controls=wl.control_directions(w, inputs, control_draws))
        ctrl_cpu_s = time.process_time() - cpu_start
        out |= {"control_draws": control_draws, "engine_with_controls_s": ctrl_s, "controls_s": ctrl_s - engine_s,
                "engine_with_controls_cpu_s": ctrl_cpu_s, "controls_cpu_s": ctrl_cpu_s - engine_cpu_s,
                "peak_mem_with_controls_bytes": peak_memory(device), "rows_run_with_controls": ctrl.stats.rows_run,
                "min_position_kl_controls": float(ctrl.ctrl_kl.min()) if ctrl.ctrl_kl.size else None}
        if "plain_s" in out:
            out["speedup_vs_plain_with_controls"] = out["plain_s"] / ctrl_s
        log(f"  engine with {control_draws} control draws {ctrl_s:8.2f} s: the controls cost {ctrl_s - engine_s:.2f} s "
            f"({ctrl_s / engine_s:.1f}x the engine alone; {ctrl.stats.rows_run} rows run)"
            + (f"; by CPU time {ctrl_cpu_s - engine_cpu_s:.2f} s ({ctrl_cpu_s / engine_cpu_s:.1f}x)"
               if clean_cpu_times(device) else "")
            + (f"; against the plain way (which runs no controls) {out['speedup_vs_plain_with_controls']:.2f}x"
               if "plain_s" in out else ""))
    if not skip_plain and reference:
        ref = float64_reference(model, sae, tokens, hook, features, w.alphas, w.batch_size)
        ref_table = metrics_table(ref["ce_clean"], ref["ce_int"], ref["kl"], ref["acts"], len(features),
                                  len(w.alphas))
        out["engine_vs_float64"] = max_rel_diff(engine_table, ref_table)
        out["plain_vs_float64"] = max_rel_diff(plain_table, ref_table)
        out["per_metric"] = {
            name: {"engine_vs_plain_abs": max_abs_diff(engine_table[..., k], plain_table[..., k]),
                   "engine_vs_float64_abs": max_abs_diff(engine_table[..., k], ref_table[..., k]),
                   "plain_vs_float64_abs": max_abs_diff(plain_table[..., k], ref_table[..., k]),
                   "scale": float(np.nanmax(np.abs(ref_table[..., k])))}
            for k, name in enumerate(COMPARED)
        }
        log(f"  float64 reference: engine {out['engine_vs_float64']:.2e}, plain {out['plain_vs_float64']:.2e} "
            "max relative difference")

    if device.type != "cpu" and not w.name.startswith("full"):
        out |= device_consistency(model, sae, resume_at, tokens, features, w, engine_table, log)

    for dtype in dtypes:
        low_model = wl.build_model(device, torch_dtype(dtype))
        low_model.load_state_dict(model.state_dict())
        low_sae = wl.build_sae(device, dtype, hook)
        low_sae.load_state_dict(sae.state_dict())
        _, low_table, low_s = timed_engine(low_model, low_sae, resume_at, tokens, features, w)
        cost = precision_cost(low_table, engine_table)
        out.setdefault("dtypes", {})[dtype] = {"engine_s": low_s} | cost
        worst = max(cost["rel_diff_vs_float32"], key=cost["rel_diff_vs_float32"].get)
        log(f"  {dtype:8s}{low_s:8.2f} s  max relative difference vs float32 {cost['max_rel_diff_vs_float32']:.2e} "
            f"({worst}); delta_ce {cost['rel_diff_vs_float32']['delta_ce']:.2e}, kl {cost['rel_diff_vs_float32']['kl']:.2e}"
            + (f"; {cost['nan_mismatches']} metric(s) defined in one precision only" if cost["nan_mismatches"] else ""))
    return out


def run_bench(device: str = "auto", out: Path | None = None, quick: bool = False, full: bool = False,
              skip_plain: bool = False, dtypes: list[str] | None = None, reference: bool | None = None,
              control_draws: int = DEFAULT_CONTROL_DRAWS, profile: bool = False, threads: int | None = None,
              log=print) -> dict[str, Any]:
    quiet_library_warnings()
    dev = resolve_device(device, "--device")
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads is {threads}; allowed: 1 or more")
        torch.set_num_threads(threads)  # 1 on a shared machine: no thread waits on another, so CPU times are clean
    for name in dtypes or []:
        if name not in DTYPES:
            raise UserError(f"--dtype is '{name}'; allowed: {', '.join(DTYPES)}")
    if dtypes is None:
        dtypes = ["bfloat16", "float16"] if dev.type == "cuda" else []
    dtypes = [d for d in dtypes if d != "float32"]  # float32 always runs: `--dtype float32` means only it
    if control_draws < 0:
        raise UserError(f"--control-draws is {control_draws}; allowed: 0 (none) or more")
    results: dict[str, Any] = {
        "device": _device_name(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
        "shape": "quick" if quick else "full" if full else "default",
        "workloads": {},
    }
    log(f"bench on {results['device']} (GPT-2-Small-shaped random weights, SAE 768 x {wl.D_SAE})")
    if profile:  # the first workload (dense) by part, and nothing else
        w = wl.workloads(quick, full)[0]
        log(w.describe())
        results["profile"] = {w.name: profile_workload(w, dev, control_draws, log)}
        if out is not None:
            write_json(out, results)
            log(f"wrote {out}")
        return results
    for w in wl.workloads(quick, full):
        log(w.describe())
        results["workloads"][w.name] = run_workload(w, dev, dtypes, skip_plain, log,
                                                    reference=(not full) if reference is None else reference,
                                                    control_draws=control_draws)
    # Headline figures at the top level: the sparse workload is the realistic one.
    head = results["workloads"].get("sparse") or next(iter(results["workloads"].values()))
    for key in ("speedup_vs_plain", "max_rel_diff", "engine_vs_float64", "plain_vs_float64", "tokens_per_s",
                "floor_fraction", "peak_mem_bytes"):
        if key in head:
            results[key] = head[key]
    if "dense" in results["workloads"]:
        results["floor_fraction_dense"] = results["workloads"]["dense"]["floor_fraction"]
        results["speedup_vs_plain_dense"] = results["workloads"]["dense"].get("speedup_vs_plain")
    if full:  # the headline is the whole study, not its first layer
        runs = list(results["workloads"].values())
        engine_s = sum(r["engine_s"] for r in runs)
        results |= {
            "full_study_engine_s": engine_s,
            "full_study_peak_mem_bytes": max(r["peak_mem_bytes"] for r in runs),
            "peak_mem_bytes": max(r["peak_mem_bytes"] for r in runs),
            "tokens_per_s": sum(r["tokens_per_s"] * r["engine_s"] for r in runs) / engine_s,
            "floor_fraction": (sum(r["engine_flops"] for r in runs) / engine_s
                               / max(r["matmul_flops_per_s"] for r in runs)),
        }
        line = (f"full study (12 layers x 5 features x 5 alphas x 200 x 256): {engine_s:.1f} s of engine time, "
                f"peak {results['full_study_peak_mem_bytes'] / 2**30:.2f} GiB")
        if all("engine_with_controls_s" in r for r in runs):
            results |= {"full_study_engine_with_controls_s": sum(r["engine_with_controls_s"] for r in runs),
                        "full_study_peak_mem_with_controls_bytes": max(r["peak_mem_with_controls_bytes"] for r in runs)}
            line += (f"; with {control_draws} control draws {results['full_study_engine_with_controls_s']:.1f} s, "
                     f"peak {results['full_study_peak_mem_with_controls_bytes'] / 2**30:.2f} GiB")
        if all("plain_s" in r for r in runs):
            plain_s = sum(r["plain_s"] for r in runs)
            results |= {"full_study_plain_s": plain_s, "speedup_vs_plain": plain_s / engine_s,
                        "max_rel_diff": max(r["max_rel_diff"] for r in runs)}
            line += f"; the plain way {plain_s:.1f} s ({plain_s / engine_s:.1f}x)"
        log(line)
    if not full:
        results["generation"] = generation_throughput(dev, quick, log)
        results["generation_tokens_per_s"] = results["generation"]["tokens_per_s"]
        results["screen"] = screen_timing(dev, quick, log)
        results["screen_over_floor"] = results["screen"]["screen_over_floor"]
    _table(results, log)
    results["targets"] = check_targets(results, by_cpu_time=clean_cpu_times(dev))
    if results["targets"]:
        log("targets on this CPU:")
        for line in target_lines(results["targets"]):
            log(line)
    if out is not None:
        write_json(out, results)
        log(f"wrote {out}")
    return results


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _table(results: dict[str, Any], log) -> None:
    def cell(r: dict[str, Any], key: str, fmt: str, width: int) -> str:
        return format(r[key], fmt) if r.get(key) is not None else f"{'-':>{width}}"

    log("")
    log(f"{'workload':<12} {'engine s':>9} {'plain s':>9} {'speed-up':>9} {'max rel diff':>13} {'eng vs f64':>11} "
        f"{'plain vs f64':>12} {'min KL':>9} {'tok/s':>10} {'floor':>6} {'peak MB':>8}")
    for name, r in results["workloads"].items():
        speed = f"{r['speedup_vs_plain']:8.1f}x" if "speedup_vs_plain" in r else f"{'-':>9}"
        log(f"{name:<12} {r['engine_s']:9.2f} {cell(r, 'plain_s', '9.2f', 9)} {speed} "
            f"{cell(r, 'max_rel_diff', '13.2e', 13)} {cell(r, 'engine_vs_float64', '11.2e', 11)} "
            f"{cell(r, 'plain_vs_float64', '12.2e', 12)} {r['min_position_kl']:9.1e} {r['tokens_per_s']:10,.0f} "
            f"{r['floor_fraction']:6.2f} {r['peak_mem_bytes'] / 2**20:8.0f}")
