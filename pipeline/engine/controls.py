"""Random-direction controls: does the feature's direction matter, or would any push that hard do the same?

For feature i at layer L, draw r: a unit vector u drawn from a standard normal in d_model dimensions and
normalised, seeded by (seed, layer, feature, draw) alone, so it is independent of the model and the same on
every device and run. The engine (pipeline.engine.run) adds ||delta_t|| * u where the feature's intervention
adds delta_t: the same positions, the same per-position norm, only the direction differs.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor


def random_unit_directions(seed: int, layer: int, features: list[int], n_draws: int, d_in: int
                           ) -> Float[Tensor, "n_feat n_draws d_in"] | None:
    """Unit vectors u[f, r] (float32), or None when there are no draws."""
    if n_draws <= 0:
        return None
    out = np.empty((len(features), n_draws, d_in), dtype=np.float64)
    for fi, feature in enumerate(features):
        for r in range(n_draws):
            v = np.random.default_rng([seed, layer, feature, r]).standard_normal(d_in)
            out[fi, r] = v / np.linalg.norm(v)
    return torch.from_numpy(out.astype(np.float32))
