"""The words for the chosen intervention, so every sentence, axis label and caption follows it.

scale multiplies the feature's activation by alpha (alpha = 1 is the clean model); clamp sets it to a value
(no single value is the clean model: clamping to each position's own clean activation would be); add pushes
the residual by value x the decoder direction (0 is the clean model). The identity values come from
pipeline.engine.identity, the one place they are defined.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.engine.identity import INTERVENTION_IDENTITY


@dataclass(frozen=True)
class InterventionWords:
    name: str
    identity: float | None
    symbol: str  # what the swept value is called in prose: "α", "the clamp value c", "the added amount c"
    axis: str  # x-axis label for the swept value
    done: str  # "{v}" filled with a value: "scaled by α = 2"
    acts_where_silent: bool  # does it change the residual where the feature's activation is 0? (add, clamp)

    def applied(self, value: float) -> str:
        """e.g. 'scaled by α = 2', 'clamped to 2', 'pushed by 2 × W_dec[i]'."""
        return self.done.format(v=f"{value:g}")

    @property
    def identity_note(self) -> str:
        """Which swept value is the clean model, for captions of sweep figures."""
        if self.identity is None:
            return "No clamp value is the clean model in general (each position's own activation would be)."
        return f"{self.symbol} = {self.identity:g} (dashed) is the clean model."


_WORDS = {
    "scale": InterventionWords("scale", INTERVENTION_IDENTITY["scale"], "α", "α (feature activation scale)",
                               "scaled by α = {v}", acts_where_silent=False),
    "clamp": InterventionWords("clamp", INTERVENTION_IDENTITY["clamp"], "c", "c (activation clamped to)",
                               "clamped to c = {v}", acts_where_silent=True),
    "add": InterventionWords("add", INTERVENTION_IDENTITY["add"], "c", "c (added × the decoder direction)",
                             "pushed by c = {v} × its decoder direction", acts_where_silent=True),
}


def words_for(intervention: str) -> InterventionWords:
    return _WORDS[intervention]
