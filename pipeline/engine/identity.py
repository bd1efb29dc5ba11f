"""Which value of each intervention leaves the model untouched (torch-free, so params parsing can
import it in milliseconds). The interventions themselves are in pipeline.engine.interventions."""

from __future__ import annotations

# scale: alpha = 1 keeps a_i; clamp: no single value does (it depends on the clean activation, so
# only the clean activation itself would); add: adding 0 times the direction.
INTERVENTION_IDENTITY: dict[str, float | None] = {"scale": 1.0, "clamp": None, "add": 0.0}
INTERVENTION_NAMES = tuple(INTERVENTION_IDENTITY)
