"""Where the engine's time goes: one `run_layer` call timed by part (`python -m pipeline bench --profile`).

The parts are the functions the engine calls, wrapped for the duration of the call (`profiled`): each wrapper
adds its wall time, less that of the wrapped calls inside it, to its part, so the parts add up to the whole
call; what no wrapper covers (setting up, copying results back) is the `rest`. A part called inside a group
(the clean block, the rows) is reported under that group, so the clean suffix and the intervened ones are told
apart. On a GPU every wrapper synchronises the device on entry and exit, which costs a little time itself.
Each part is timed twice: by the wall clock and by the process's CPU time. On a CPU with one thread (`bench
--threads 1`) the CPU time is the work done, whatever else the machine runs; the wall time is what a user waits.

`ENGINE_PARTS` names the engine's functions; tests/engine/test_bench_profile.py checks that each still exists, so a
renamed function fails a test instead of silently vanishing from the profile.
"""

from __future__ import annotations

import functools
import importlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# (module, attribute path in it, label, is a group). Module attributes are patched where the engine looks
# them up (pipeline.engine.run imports them by name), methods on their class.
ENGINE_PARTS: tuple[tuple[str, str, str, bool], ...] = (
    ("pipeline.engine.run", "_LayerRun.prefix", "prefix forward + encoder", False),
    ("pipeline.engine.run", "_LayerRun.clean_block", "clean block", True),
    ("pipeline.engine.run", "_LayerRun.variant_rows", "row planning", False),
    ("pipeline.engine.run", "_LayerRun.run_rows", "rows", True),
    ("pipeline.engine.run", "_LayerRun.commit", "commit (results to the host)", False),
    ("pipeline.engine.run", "final_residual", "suffix forward", False),
    ("pipeline.engine.run", "_LayerRun.unembed", "unembedding", False),
    ("pipeline.engine.run", "clean_side", "log-softmax and CE (float64)", False),
    ("pipeline.engine.run", "scores", "CE and KL (divergence kernel)", False),
    ("pipeline.engine.run", "scores_by_logsumexp", "CE and KL (float64 log-softmax)", False),
    ("pipeline.engine.run", "_LayerRun.rescore_overflowed", "overflow check", False),
    ("pipeline.engine.run", "centred_delta_sum", "logit deltas", False),
)


REST = "rest (setting up, results)"


@dataclass
class Profile:
    total_s: float
    parts: dict[str, float]  # part -> wall seconds, exclusive of the parts inside it; REST = total - sum
    total_cpu_s: float
    cpu_parts: dict[str, float]  # the same by the process's CPU time

    def table(self, cpu: bool) -> list[str]:
        """One line a part, largest first; `cpu`: with the CPU-time columns (meaningful with one thread only)."""
        width = max(len(k) for k in self.parts)
        lines = [f"  {'part':<{width}} {'wall s':>8} {'share':>6}" + (f" {'CPU s':>8} {'share':>6}" if cpu else "")]
        order = self.cpu_parts if cpu else self.parts
        for name in sorted(self.parts, key=lambda k: -order[k]):
            lines.append(f"  {name:<{width}} {self.parts[name]:8.2f} {self.parts[name] / self.total_s:6.1%}"
                         + (f" {self.cpu_parts[name]:8.2f} {self.cpu_parts[name] / self.total_cpu_s:6.1%}"
                            if cpu else ""))
        lines.append(f"  {'total (run_layer)':<{width}} {self.total_s:8.2f} {'':6}"
                     + (f" {self.total_cpu_s:8.2f}" if cpu else ""))
        return lines


class _Timer:
    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.stack: list[list] = []  # [label, is_group, wall and CPU seconds spent in wrapped calls inside]
        self.parts: dict[str, float] = {}
        self.cpu_parts: dict[str, float] = {}

    def key(self, label: str, is_group: bool) -> str:
        if is_group:
            return f"{label}: other"
        group = next((frame[0] for frame in reversed(self.stack) if frame[1]), None)
        return f"{group}: {label}" if group else label

    def wrap(self, fn: Callable, label: str, is_group: bool) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.sync()
            key = self.key(label, is_group)
            self.stack.append([label, is_group, 0.0, 0.0])
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
                _, _, inner, cpu_inner = self.stack.pop()
                self.parts[key] = self.parts.get(key, 0.0) + elapsed - inner
                self.cpu_parts[key] = self.cpu_parts.get(key, 0.0) + cpu_elapsed - cpu_inner
                if self.stack:
                    self.stack[-1][2] += elapsed
                    self.stack[-1][3] += cpu_elapsed

        return timed


def clean_cpu_times(device: torch.device) -> bool:
    """CPU times say how much work was done only on the CPU and with one thread (with more, a thread spinning
    while it waits for a descheduled one counts as CPU time)."""
    return device.type == "cpu" and torch.get_num_threads() == 1


def _resolve(module: str, path: str) -> tuple[object, str]:
    owner: object = importlib.import_module(module)
    *outer, attr = path.split(".")
    for name in outer:
        owner = getattr(owner, name)
    return owner, attr


@contextmanager
def profiled(parts=ENGINE_PARTS, device: torch.device | None = None) -> Iterator[_Timer]:
    """Within the block, the named functions are timed; yields the timer whose `parts` (wall seconds) and
    `cpu_parts` (CPU seconds) it fills."""
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    timer = _Timer(sync)
    patched = []
    try:
        for module, path, label, is_group in parts:
            owner, attr = _resolve(module, path)
            original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
            patched.append((owner, attr, original))
            setattr(owner, attr, timer.wrap(original, label, is_group))
        yield timer
    finally:
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)


def profile_call(fn: Callable[[], object], device: torch.device, parts=ENGINE_PARTS) -> tuple[object, Profile]:
    """Run fn() with the engine's parts timed: (its result, the profile)."""
    with profiled(parts, device) as timer:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total, total_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    wall, cpu = dict(timer.parts), dict(timer.cpu_parts)
    wall[REST] = max(0.0, total - sum(wall.values()))
    cpu[REST] = max(0.0, total_cpu - sum(cpu.values()))
    return out, Profile(total_s=total, parts=wall, total_cpu_s=total_cpu, cpu_parts=cpu)


def profile_workload(w, device: torch.device, control_draws: int, log) -> dict[str, dict]:
    """The engine's parts on workload `w` (`pipeline.bench.workloads`), without controls and, if control_draws,
    with that many random-direction controls per feature and value, as the study runs them; CPU times printed
    where they are clean (`clean_cpu_times`)."""
    from pipeline.bench import workloads as wl
    from pipeline.engine.run import run_layer

    inputs = wl.prepare(w, device)
    tokens = inputs.tokens.cpu()
    run_layer(inputs.model, inputs.sae, inputs.resume_at, tokens[:2, :16], inputs.features[:1], [2.0],
              batch_size=2)  # warm-up
    out = {}
    for draws in sorted({0, control_draws}):
        controls = wl.control_directions(w, inputs, draws)
        result, prof = profile_call(
            lambda controls=controls: run_layer(inputs.model, inputs.sae, inputs.resume_at, tokens, inputs.features,
                                                list(w.alphas), batch_size=w.batch_size, controls=controls), device)
        log(f"profile of the engine on '{w.name}', {draws} control draws ({result.stats.rows_run} rows run):")
        for line in prof.table(cpu=clean_cpu_times(device)):
            log(line)
        out[f"control_draws_{draws}"] = {"total_s": prof.total_s, "parts": prof.parts, "total_cpu_s": prof.total_cpu_s,
                                         "cpu_parts": prof.cpu_parts, "rows_run": result.stats.rows_run}
    return out
