"""feature_source `screen`: the features the attribution screen estimates to move the loss most.

For each layer, data/screen/layer_L.csv (stage `screen`, docs/screen.md; metrics/screen/layer_L.csv without the
headline alpha's columns) holds every SAE feature's
first-order estimate of the `scale` intervention's delta_ce. The candidates are the features that fire and whose
density lies in [min_density, max_density]; the `features_per_layer` with the largest |slope_delta_ce| (the
largest estimated effect at every alpha != 1; ties to the lower index) are chosen. The `intervene` stages then
measure them exactly, as for any other source.

Labels: where the layer's SAE has a Neuronpedia source, the feature's Neuronpedia explanation (with its URL and
top logit tokens; fetched once, then cached, pipeline.sources.neuronpedia_client); elsewhere, or where Neuronpedia
has no feature or no explanation, the `auto` source's label from the corpus (pipeline.sources.auto).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.core import artifacts
from pipeline.core.errors import UserError
from pipeline.core.plan.layers import LayerPlan
from pipeline.load.tokenizer import Tokenizer
from pipeline.sources.auto import firing_profiles
from pipeline.sources.neuronpedia import tokens_json
from pipeline.sources.neuronpedia_client import NeuronpediaClient, split_neuronpedia_id
from pipeline.sources.selection import FeatureChoice


def screen_choice(table: pd.DataFrame, k: int, min_density: float, max_density: float) -> list[int]:
    """The k features of one layer's screen table with the largest |slope_delta_ce| among those that fire with a
    density in [min_density, max_density]; ties by feature index."""
    density = table["density"].to_numpy()
    band = table[(density >= min_density) & (density <= max_density) & (table["n_firing"].to_numpy() > 0)]
    layer = int(table["layer"].iloc[0]) if len(table) else -1
    if len(band) < k:
        raise UserError(
            f"layer {layer}: only {len(band)} features of {artifacts.screen_ranks(layer)} fire with a density in "
            f"[{min_density:g}, {max_density:g}], fewer than features_per_layer={k}; widen min_density/max_density "
            "or use more passages")
    features = band["feature"].to_numpy()
    order = np.lexsort((features, -np.abs(band["slope_delta_ce"].to_numpy())))
    return [int(f) for f in features[order][:k]]


def choose_layer(model, sae, plan: LayerPlan, table: pd.DataFrame, tokens: np.ndarray, tokenizer: Tokenizer, k: int,
                 min_density: float, max_density: float, batch_size: int,
                 client: NeuronpediaClient | None) -> list[FeatureChoice]:
    chosen = screen_choice(table, k, min_density, max_density)
    profiles = firing_profiles(model, sae, plan, tokens, chosen, batch_size)
    rows = table.set_index("feature")
    out = []
    for feature in chosen:
        row = rows.loc[feature]
        label, origin, pos, neg = profiles[feature].label(tokenizer), "auto label from the corpus", "", ""
        if plan.neuronpedia is not None and client is not None:
            model_id, source = split_neuronpedia_id(plan.neuronpedia)
            found = client.feature(model_id, source, feature)
            best = None if found is None else found.best_explanation
            if best is not None:
                label, origin = best.description, f"label from Neuronpedia ({best.model or 'unknown explainer'})"
                pos, neg = tokens_json(found.pos_tokens), tokens_json(found.neg_tokens)
            else:
                origin = "auto label from the corpus (Neuronpedia has " + (
                    "no such feature)" if found is None else "no explanation)")
        reason = (f"screen: rank {int(row['rank'])} of {len(table)} by |estimated effect| (slope "
                  f"{row['slope_delta_ce']:+.4g} nats per unit alpha at alpha = 1), density {row['density']:.3%} in [{min_density:g}, {max_density:g}]; {origin}")
        out.append(FeatureChoice(layer=plan.layer, feature=feature, label=label, source="screen", reason=reason,
                                 density=float(row["density"]), max_act=float(row["max_act"]),
                                 neuronpedia_url=plan.neuronpedia_url(feature) or "", np_pos_tokens=pos,
                                 np_neg_tokens=neg))
    return out


def choose_from_screen(model, saes: dict, plans: dict[int, LayerPlan], tokens: np.ndarray, tokenizer: Tokenizer,
                       k: int, min_density: float, max_density: float, batch_size: int,
                       client: NeuronpediaClient | None = None) -> list[FeatureChoice]:
    """`features_per_layer` features per layer from the screen's tables; Neuronpedia labels where a layer has a
    source (a client is made when one is needed and none is given)."""
    tables = {layer: artifacts.read_screen_ranks(layer) for layer in plans}
    if client is None and any(plan.neuronpedia is not None for plan in plans.values()):
        client = NeuronpediaClient()
    return [choice for layer in plans
            for choice in choose_layer(model, saes[layer], plans[layer], tables[layer], tokens, tokenizer, k,
                                       min_density, max_density, batch_size, client)]
