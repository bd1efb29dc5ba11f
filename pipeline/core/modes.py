"""The intervention modes, one record each: everything the study says about a mode, in one place.

A mode is how a feature's activation is changed at the hook (docs/method.md, "The intervention"). Its
record holds its name, the value that leaves the model untouched, the symbol and words every sentence,
caption and axis label uses, its formula, and whether it changes positions where the feature is silent.
`shift(a, v)` is the mode's definition in executable form: how far along the feature's decoder direction
each position moves (delta_t = shift(a_t, v) * d_i), written with plain arithmetic so it works on floats,
numpy arrays and torch tensors alike; the engine's fast delta functions (pipeline.engine.interventions)
are tested against it.

This module imports nothing (params parsing reads it in milliseconds). Adding a mode means one record
here, one delta function in pipeline.engine.interventions, and their tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Mode:
    name: str
    identity: float | None  # the value that leaves the model untouched; None: no single value does
    symbol: str  # what the swept value is called in prose and on axes: "α", "c"
    symbol_tex: str  # the same in TeX: r"\alpha", "c"
    axis: str  # x-axis label for the swept value
    done: str  # "{v}" filled with a value: "scaled by α = 2"
    formula_tex: str  # x_t -> x_t + ..., TeX
    meaning: str  # markdown (TeX in $...$): what the formula does, and which value is the clean model
    summary: str  # one line for params.yaml and `--help`: "scale (x + (alpha - 1) a_i W_dec[i])"
    acts_where_silent: bool  # does it change the residual where the feature's activation is 0?
    shift: Callable[[Any, Any], Any]  # (activation a, value v) -> c with delta = c * d_i, before BOS masking

    def applied(self, value: float) -> str:
        """e.g. 'scaled by α = 2', 'clamped to c = 2', 'pushed by c = 2 × its decoder direction'."""
        return self.done.format(v=f"{value:g}")

    @property
    def identity_note(self) -> str:
        """Which swept value is the clean model, for captions of sweep figures."""
        if self.identity is None:
            return f"No {self.name} value is the clean model in general (each position's own activation would be)."
        return f"{self.symbol} = {self.identity:g} (dashed) is the clean model."


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode(
        name="scale", identity=1.0, symbol="α", symbol_tex=r"\alpha", axis="α (feature activation scale)",
        done="scaled by α = {v}",
        formula_tex=r"x_t \;\longmapsto\; x_t + (\alpha - 1)\, a_i(x_t)\, W_\text{dec}[i]",
        meaning="This is the same as splicing the SAE into the model with its reconstruction error kept and "
                "multiplying feature $i$'s activation by $\\alpha$: at $\\alpha = 1$ the model is exactly the clean "
                "model, at $\\alpha = 0$ the feature is ablated. Where the feature is silent ($a_i = 0$) nothing "
                "changes.",
        summary="scale (x + (alpha - 1) a_i W_dec[i]; 1 is the clean model, 0 ablates the feature)",
        acts_where_silent=False,
        shift=lambda a, v: (v - 1.0) * a,
    ),
    Mode(
        name="clamp", identity=None, symbol="c", symbol_tex="c", axis="c (activation clamped to)",
        done="clamped to c = {v}",
        formula_tex=r"x_t \;\longmapsto\; x_t + (c - a_i(x_t))\, W_\text{dec}[i]",
        meaning="This sets feature $i$'s activation to $c$ at every position, with the SAE's reconstruction error "
                "kept, so it moves positions where the feature is silent too. No single $c$ is the clean model: "
                "each position's own clean activation would be.",
        summary="clamp (a_i set to the value at every position)",
        acts_where_silent=True,
        shift=lambda a, v: v - a,
    ),
    Mode(
        name="add", identity=0.0, symbol="c", symbol_tex="c", axis="c (added × the decoder direction)",
        done="pushed by c = {v} × its decoder direction",
        formula_tex=r"x_t \;\longmapsto\; x_t + c\, W_\text{dec}[i]",
        meaning="This pushes the residual stream by $c$ times the feature's decoder direction at every position, "
                "whatever the feature's activation: $c = 0$ is the clean model.",
        summary="add (value x W_dec[i] added at every position; 0 is the clean model)",
        acts_where_silent=True,
        shift=lambda a, v: v + 0.0 * a,
    ),
)}
MODE_NAMES = tuple(MODES)
