"""What an intervention does to the residual stream: one small pure delta function each.

At hook h = blocks.L.hook_resid_post, with a = a_i(x_t) feature i's activation from the SAE
encoder and d = W_dec[i] (its direction in the SAE's decode: pipeline.engine.forward.FeatureEncoder),
every position t >= 1 (never BOS) becomes x_t + delta_t:

    scale(alpha):  delta = (alpha - 1) * a * d     (SAE spliced in with its error term, feature i
                                                    scaled by alpha: alpha = 1 is the clean model,
                                                    alpha = 0 ablates the feature)
    clamp(v):      delta = (v - a) * d             (feature i's activation set to v everywhere)
    add(c):        delta = c * d                   (steer along the decoder direction)

Each mode's record (words, identity value, its defining `shift`) is pipeline.core.modes's; this module
keeps the table from mode to its delta function, which tests compare with the record's `shift`.

`value` may be a float or a tensor broadcasting against `acts` (one value per row), and
`direction` a [d_model] vector or one per row ([rows, 1, d_model]), so many variants are built in
one call. Each also says where its delta is non-zero (`changes`), which is what lets the engine skip work
exactly: rows and positions that nothing changed are the clean model's, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from pipeline.core.modes import MODES, Mode


@dataclass(frozen=True)
class Intervention:
    mode: Mode  # the record: name, identity value, words
    # delta(acts [... pos], direction [d_model], value) -> [... pos d_model], before BOS masking
    delta_fn: Callable[[Tensor, Tensor, float], Tensor]
    # changes(acts [... pos], value) -> bool [... pos]: where delta_fn is non-zero
    changes_fn: Callable[[Tensor, float], Tensor]

    @property
    def name(self) -> str:
        return self.mode.name

    @property
    def identity(self) -> float | None:
        """The value that leaves the model untouched, if any."""
        return self.mode.identity

    def delta(
        self, acts: Float[Tensor, "*batch pos"], direction: Tensor, value: float | Tensor
    ) -> Float[Tensor, "*batch pos d_model"]:
        out = self.delta_fn(acts, direction, value)
        out[..., 0, :] = 0.0  # position 0 is BOS: never intervened on
        return out

    def coefficient(self, acts: Float[Tensor, "*batch pos"], value: float | Tensor) -> Float[Tensor, "*batch pos"]:
        """c_t with delta_t = c_t * direction: how far along the decoder row each position is pushed."""
        return self.delta(acts, torch.ones(1, dtype=acts.dtype, device=acts.device), value)[..., 0]

    def changes(self, acts: Float[Tensor, "*batch pos"], value: float | Tensor) -> Bool[Tensor, "*batch pos"]:
        mask = self.changes_fn(acts, value).clone()
        mask[..., 0] = False
        return mask


SCALE = Intervention(
    mode=MODES["scale"],
    delta_fn=lambda a, d, alpha: ((alpha - 1.0) * a).unsqueeze(-1) * d,
    changes_fn=lambda a, alpha: (a != 0) & (alpha != 1.0),
)

CLAMP = Intervention(
    mode=MODES["clamp"],
    delta_fn=lambda a, d, v: (v - a).unsqueeze(-1) * d,
    changes_fn=lambda a, v: a != v,
)

ADD = Intervention(
    mode=MODES["add"],
    delta_fn=lambda a, d, c: (torch.zeros_like(a) + c).unsqueeze(-1) * d,
    changes_fn=lambda a, c: (torch.zeros_like(a) + c) != 0.0,
)

# mode name -> its delta function (tests/engine check the keys are pipeline.core.modes.MODES's)
INTERVENTIONS: dict[str, Intervention] = {i.name: i for i in (SCALE, CLAMP, ADD)}
