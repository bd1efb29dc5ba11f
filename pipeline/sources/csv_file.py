"""feature_source `csv`: a curated file of features, validated row by row.

Format (see data/neuronpedia_features_template.csv): columns `layer` (resid_post layer, 0-based)
and `feature` (SAE latent index), optional `label` and any others. Each layer in `layers` needs
at least `features_per_layer` rows; the first `features_per_layer` of each layer, in file order,
are used. Rows for layers not in `layers` are refused (so a typo cannot silently drop a layer).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from pipeline.core import artifacts
from pipeline.core.errors import UserError
from pipeline.sources.selection import FeatureChoice

REQUIRED = ("layer", "feature")


def _int_cell(path: Path, row_no: int, column: str, value: str) -> int:
    text = (value or "").strip()
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not text or not math.isfinite(number) or number != int(number):
        raise UserError(f"{path} row {row_no}: {column} is {text!r}; it needs a whole number")
    return int(number)


def read_curated_csv(path: str | Path, layers: tuple[int, ...], per_layer: int,
                     d_sae: dict[int, int] | None) -> list[FeatureChoice]:
    """The chosen rows; `d_sae` None skips the index range check (before the SAEs are known)."""
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"features_csv {path} not found; copy {artifacts.FEATURES_TEMPLATE} to it and "
            "fill it in (README: 'Choosing features'), or set feature_source to auto or neuronpedia"
        )
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if not columns:
            raise UserError(f"{path} is empty; it needs a header row with columns {', '.join(REQUIRED)}")
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise UserError(f"{path} lacks column(s) {', '.join(missing)}; it has: {', '.join(columns)}")
        rows = [{(k or "").strip(): v for k, v in r.items()} for r in reader]
    if not rows:
        raise UserError(f"{path} has a header but no rows")

    seen: dict[tuple[int, int], int] = {}
    by_layer: dict[int, list[FeatureChoice]] = {layer: [] for layer in layers}
    for i, row in enumerate(rows, start=2):  # row 1 is the header
        layer = _int_cell(path, i, "layer", row["layer"])
        feature = _int_cell(path, i, "feature", row["feature"])
        if layer not in by_layer:
            raise UserError(f"{path} row {i}: layer {layer} is not in params `layers` {list(layers)}")
        if feature < 0:
            raise UserError(f"{path} row {i}: feature {feature} is negative; SAE feature indices start at 0")
        if d_sae is not None and feature >= d_sae[layer]:
            raise UserError(f"{path} row {i}: feature {feature} is out of range for layer {layer}; "
                            f"allowed: 0..{d_sae[layer] - 1}")
        if (layer, feature) in seen:
            raise UserError(f"{path} row {i}: layer {layer} feature {feature} repeats row {seen[layer, feature]}")
        seen[layer, feature] = i
        label = (row.get("label") or "").strip()
        by_layer[layer].append(FeatureChoice(layer=layer, feature=feature, label=label or "(no label)",
                                             source="csv", reason=f"{path.name} row {i}"))
    short = {layer: len(c) for layer, c in by_layer.items() if len(c) < per_layer}
    if short:
        layer, have = next(iter(short.items()))
        raise UserError(f"{path}: layer {layer} has {have} feature(s) but features_per_layer is {per_layer}; "
                        f"add rows or lower features_per_layer ({len(short)} layer(s) short)")
    return [c for layer in layers for c in by_layer[layer][:per_layer]]
