"""The record every feature source produces: one chosen feature and why it was chosen."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pipeline.core.columns import FEATURE_COLUMNS


@dataclass(frozen=True)
class FeatureChoice:
    layer: int
    feature: int
    label: str
    source: str  # csv | auto | neuronpedia | screen
    reason: str
    density: float = math.nan  # firing rate as the source measured it (auto: our corpus)
    max_act: float = math.nan  # largest activation the source saw
    neuronpedia_url: str = ""
    np_pos_tokens: str = ""  # Neuronpedia's top promoted logit tokens, JSON list
    np_neg_tokens: str = ""  # ... and suppressed

    def row(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in FEATURE_COLUMNS}
