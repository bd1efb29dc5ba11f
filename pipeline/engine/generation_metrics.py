"""The measures of steered generation, from the generated ids and the clean model's readout.

Per continuation (its `generate_tokens` generated tokens; the prompt is not scored):
- concept_act: the mean over generated tokens of the feature's SAE activation, the clean model
  reading the text (does the concept appear in what was written?); concept_frac: the share of
  generated tokens where the feature fires (activation > 0);
- loss: the clean model's mean per-token loss -log p(token | everything before it) on the
  generated tokens (does the text stay fluent, by the unsteered model's judgement?);
- distinct_1, distinct_2: distinct n-grams / n-grams in the continuation (low: repetitive);
- repetition: the share of the continuation's 4-grams that repeat an earlier 4-gram of it
  (1 - distinct_4; degenerate loops give values near 1, ordinary text near 0);
- promoted_frac: the share of generated tokens among the feature's top promoted tokens (the
  largest entries of W_dec[i] @ W_U).
A (feature, value, decoding) row of the table averages these over its prompts; the `_clean`
columns are the same measures of the clean model's continuations of the same prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pipeline.core.columns import GENERATION_MEASURES

REPEAT_N = 4
MEASURES = tuple(m.name for m in GENERATION_MEASURES)  # each declared in pipeline.core.columns


def distinct_n(ids: Sequence[int], n: int) -> float:
    """Distinct n-grams / n-grams of one sequence; NaN when it has no n-gram."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def repetition(ids: Sequence[int], n: int = REPEAT_N) -> float:
    """The share of n-grams that repeat an earlier n-gram of the same sequence; NaN when none."""
    d = distinct_n(ids, n)
    return 1.0 - d if not math.isnan(d) else math.nan


def per_row(generated: np.ndarray, acts: np.ndarray, nll: np.ndarray, promoted: list[set[int]]) -> dict[str, np.ndarray]:
    """Every measure of every continuation: feature-free ones [rows], per-feature ones [rows, n_feat].

    generated [rows, n] ids, acts [rows, n, n_feat], nll [rows, n], promoted: one id set per feature."""
    text = {
        "loss": nll.mean(axis=1),
        "distinct_1": np.array([distinct_n(r.tolist(), 1) for r in generated]),
        "distinct_2": np.array([distinct_n(r.tolist(), 2) for r in generated]),
        "repetition": np.array([repetition(r.tolist()) for r in generated]),
    }
    hits = np.stack([np.isin(generated, sorted(s)) for s in promoted], axis=-1)  # [rows, n, n_feat]
    per_feature = {
        "concept_act": acts.mean(axis=1),
        "concept_frac": (acts > 0).mean(axis=1),
        "promoted_frac": hits.mean(axis=1),
    }
    return text | per_feature


def _value(measures: dict[str, np.ndarray], name: str, rows: list[int], feature: int) -> float:
    values = measures[name][rows]
    if values.ndim == 2:
        values = values[:, feature]
    return float(np.nanmean(values)) if len(values) and not np.isnan(values).all() else math.nan


def summary_row(measures: dict[str, np.ndarray], steered: list[int], clean: list[int], feature: int,
                generated: np.ndarray) -> dict[str, float]:
    """One (feature, value, decoding) row: each measure over its prompts' continuations (`steered`)
    beside the same measure of the clean continuations of those prompts (`clean`, in the same order)."""
    out: dict[str, float] = {"n_prompts": len(steered)}
    for name in MEASURES:
        out[name] = _value(measures, name, steered, feature)
        out[f"{name}_clean"] = _value(measures, name, clean, feature)
    changed = [not np.array_equal(generated[s], generated[c]) for s, c in zip(steered, clean, strict=True)]
    out["frac_changed"] = float(np.mean(changed)) if changed else math.nan
    return out
