"""The engine's speed targets on a CPU (issue 26) and whether a bench run met them.

Each target is a figure of one workload of the default bench (`python -m pipeline bench --device cpu`) and the
least it must be. They hold for the CPU only: the quick and full shapes and other devices are not what they
were set for, so `check_targets` returns nothing there. Speed-ups compare the engine with the plain way in one
process, so they are what a shared machine's load disturbs least; the engine times exclude the random-direction
controls, which the plain way does not run (the bench reports their cost beside).
"""

from __future__ import annotations

from typing import Any

# (workload, figure in its results, least value, what it means, the same figure from CPU times). Targets are judged
# on the wall-time figure; with one thread the CPU-time one is printed beside it, because other work on a shared
# machine slows wall times unevenly (the engine and the plain way run minutes apart) and leaves CPU times alone.
CPU_TARGETS: tuple[tuple[str, str, float, str, str], ...] = (
    ("dense", "speedup_vs_plain", 3.0, "engine speed-up over the plain way, dense features",
     "speedup_vs_plain_cpu_time"),
    ("sparse", "speedup_vs_plain", 10.0, "engine speed-up over the plain way, sparse features",
     "speedup_vs_plain_cpu_time"),
    ("dense", "floor_fraction", 0.5, "floor fraction (matmul time at the measured rate / engine time), dense",
     "floor_fraction_cpu_time"),
)


def check_targets(results: dict[str, Any], by_cpu_time: bool = True) -> list[dict[str, Any]]:
    """One entry per CPU target whose workload and figure the results hold: the value, the target, met or not, and
    (if by_cpu_time: the CPU times are clean, i.e. one thread) the same figure from CPU times."""
    if not str(results.get("device", "")).startswith("cpu") or results.get("shape") != "default":
        return []
    out = []
    for workload, figure, least, what, cpu_figure in CPU_TARGETS:
        figures = results.get("workloads", {}).get(workload, {})
        if figures.get(figure) is None:
            continue
        out.append({"workload": workload, "figure": figure, "value": float(figures[figure]), "target": least,
                    "met": bool(figures[figure] >= least), "what": what,
                    "by_cpu_time": figures.get(cpu_figure) if by_cpu_time else None})
    return out


def target_lines(checked: list[dict[str, Any]]) -> list[str]:
    return [f"  {c['what']}: {c['value']:.2f} (target >= {c['target']:g}): {'met' if c['met'] else 'NOT met'}"
            + (f" (by CPU time: {c['by_cpu_time']:.2f})" if c.get("by_cpu_time") is not None else "")
            for c in checked]
