"""What the bench measures besides accuracy: wall time, peak memory, matmul FLOPs, the device's matmul rate,
and how reproducible the engine's figures are on a GPU (rerun, and against the CPU)."""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bench import workloads as wl
from pipeline.bench.references import max_rel_diff, metrics_table
from pipeline.engine.run import LayerResult, run_layer


def block_flops(tokens: int, t: int) -> float:
    d, ff = wl.GPT2_SMALL_SHAPE["d_model"], wl.GPT2_SMALL_SHAPE["d_mlp"]
    # QKV + output projection 8 d^2, MLP 4 d ff, attention scores and values 4 t d (per token)
    return tokens * (8 * d * d + 4 * d * ff + 4 * t * d)


def unembed_flops(positions: int) -> float:
    return positions * 2 * wl.GPT2_SMALL_SHAPE["d_model"] * wl.GPT2_SMALL_SHAPE["d_vocab"]


def engine_flops(result: LayerResult, n: int, t: int, resume_at: int) -> float:
    """Matmul FLOPs of the forward work the engine performed (from its own counters)."""
    n_layers = wl.GPT2_SMALL_SHAPE["n_layers"]
    prefix = block_flops(n * t, t) * resume_at
    suffix = block_flops((n + result.stats.rows_run) * t, t) * (n_layers - resume_at)
    unembed = unembed_flops(n * (t - 2) + result.stats.positions_unembedded)
    encoder = 2 * n * t * wl.GPT2_SMALL_SHAPE["d_model"] * len(result.features)
    return prefix + suffix + unembed + encoder


def plain_flops(n: int, t: int, n_variants: int) -> float:
    full = block_flops(n * t, t) * wl.GPT2_SMALL_SHAPE["n_layers"] + unembed_flops(n * t)
    d = wl.GPT2_SMALL_SHAPE["d_model"]
    sae = n * t * 4 * 2 * d * wl.D_SAE  # encode + decode, twice for the error term
    return full * (1 + n_variants) + sae * n_variants + n * t * 2 * d * wl.D_SAE


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-5 FLOP/s of a GPT-2-MLP-shaped matmul ([4096 x 768] @ [768 x 3072])."""
    return matmul_rates(device, dtype)[0]


def matmul_rates(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(FLOP/s, FLOP per CPU-second per thread) of a GPT-2-MLP-shaped matmul ([4096 x 768] @ [768 x 3072]), each
    the best of 6 rounds of 5. The second counts the process's CPU time instead of the wall time, so other work on
    a shared machine, which lengthens the wall time, leaves it alone (on a GPU it means nothing)."""
    a = torch.randn(4096, 768, device=device, dtype=dtype)
    b = torch.randn(768, 3072, device=device, dtype=dtype)
    best_wall = best_cpu = math.inf
    for _ in range(6):
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(5):
            a @ b
        sync(device)
        best_wall = min(best_wall, (time.perf_counter() - start) / 5)
        best_cpu = min(best_cpu, (time.process_time() - cpu_start) / 5 / torch.get_num_threads())
    flops = 2 * 4096 * 768 * 3072
    return flops / best_wall, flops / max(best_cpu, 1e-9)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int:
    """Peak bytes since the last reset: CUDA allocations, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # lifetime peak, KiB on Linux


def timed_engine(model, sae, resume_at: int, tokens: torch.Tensor, features: list[int], w: wl.Workload,
                 controls: torch.Tensor | None = None) -> tuple[LayerResult, np.ndarray, float]:
    """The engine as `intervene` runs it (run_layer + metrics), and its wall time."""
    sync(tokens.device)
    start = time.perf_counter()
    result = run_layer(model, sae, resume_at, tokens.cpu(), features, list(w.alphas), batch_size=w.batch_size,
                       controls=controls)
    table = metrics_table(result.ce_clean, result.ce_int, result.kl, result.acts, len(features), len(w.alphas))
    sync(tokens.device)
    return result, table, time.perf_counter() - start


def device_consistency(model, sae, resume_at: int, tokens: torch.Tensor, features: list[int], w: wl.Workload,
                       engine_table: np.ndarray, log) -> dict[str, Any]:
    """What a GPU user can expect of reruns: the same card twice, and this card against the CPU."""
    _, again, _ = timed_engine(model, sae, resume_at, tokens, features, w)
    cpu = torch.device("cpu")
    cpu_model = wl.build_model(cpu, torch.float32)
    cpu_model.load_state_dict(model.state_dict())
    cpu_sae = wl.build_sae(cpu, "float32", f"blocks.{w.layer}.hook_resid_post")
    cpu_sae.load_state_dict(sae.state_dict())
    _, on_cpu, _ = timed_engine(cpu_model, cpu_sae, resume_at, tokens.cpu(), features, w)
    result = {"rerun_bit_identical": bool(np.array_equal(again, engine_table, equal_nan=True)),
              "rerun_max_rel_diff": max_rel_diff(again, engine_table),
              "device_vs_cpu_max_rel_diff": max_rel_diff(engine_table, on_cpu)}
    log(f"  rerun on this device: {'bit-identical' if result['rerun_bit_identical'] else 'differs'} "
        f"(max relative difference {result['rerun_max_rel_diff']:.2e}); against the CPU: "
        f"{result['device_vs_cpu_max_rel_diff']:.2e}")
    return result
