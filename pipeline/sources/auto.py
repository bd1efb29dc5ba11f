"""feature_source `auto`: choose features from activation statistics on the study's own corpus.

For each layer every SAE feature's density (fraction of scored positions where it fires) and
maximum activation are measured on data/tokens.npy. Candidates are the features whose density
lies in [min_density, max_density]: not dead, not always on. The candidates, sorted by density,
are split into `features_per_layer` equal groups and the feature with the largest maximum
activation is taken from each group, so the choice spans the density band and favours features
that fire strongly when they fire. It is deterministic (ties go to the lower index).

Each chosen feature gets a label proposed from the data: the tokens it fires on most often.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from pipeline.engine.forward import FeatureEncoder, residual_at
from pipeline.errors import UserError
from pipeline.resolve import LayerPlan
from pipeline.sources.selection import FeatureChoice
from pipeline.tokenizer import Tokenizer


@torch.inference_mode()
def activation_stats(model, saes: dict, plans: dict[int, LayerPlan], tokens: np.ndarray, batch_size: int
                     ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], int]:
    """Per layer: firing counts [d_sae] and max activations [d_sae] over the scored positions."""
    device = next(model.parameters()).device
    hooks = {plans[layer].hook: layer for layer in saes}
    stop = max(plans[layer].resume_at for layer in saes)
    counts = {layer: torch.zeros(saes[layer].cfg.d_sae, dtype=torch.long, device=device) for layer in saes}
    maxes = {layer: torch.zeros(saes[layer].cfg.d_sae, device=device) for layer in saes}
    for start in range(0, len(tokens), batch_size):
        tok = torch.from_numpy(tokens[start:start + batch_size]).long().to(device)
        _, cache = model.run_with_cache(tok, names_filter=list(hooks), stop_at_layer=stop)
        for hook, layer in hooks.items():
            acts = saes[layer].encode(cache[hook][:, 1:-1]).float()  # scored positions
            counts[layer] += (acts > 0).sum(dim=(0, 1))
            maxes[layer] = torch.maximum(maxes[layer], acts.amax(dim=(0, 1)))
    n_scored = tokens.shape[0] * (tokens.shape[1] - 2)
    return ({k: v.cpu().numpy() for k, v in counts.items()}, {k: v.cpu().numpy() for k, v in maxes.items()},
            n_scored)


def choose(layer: int, counts: np.ndarray, maxes: np.ndarray, n_scored: int, k: int,
           min_density: float, max_density: float) -> list[tuple[int, float, float, str]]:
    """(feature, density, max activation, reason) for k features spanning the density band."""
    density = counts / n_scored
    candidates = np.flatnonzero((density >= min_density) & (density <= max_density) & (counts > 0))
    if len(candidates) < k:
        raise UserError(
            f"layer {layer}: only {len(candidates)} features fire on between {min_density:g} and "
            f"{max_density:g} of the {n_scored} scored positions, fewer than features_per_layer={k}; "
            "widen min_density/max_density or use more passages"
        )
    by_density = candidates[np.lexsort((candidates, density[candidates]))]
    chosen = []
    for g, group in enumerate(np.array_split(by_density, k)):
        best = group[np.lexsort((group, -maxes[group]))[0]]
        reason = (f"auto: density {density[best]:.3%} (group {g + 1}/{k} of {len(candidates)} candidates "
                  f"in [{min_density:g}, {max_density:g}]), largest max activation in its group")
        chosen.append((int(best), float(density[best]), float(maxes[best]), reason))
    return chosen


@torch.inference_mode()
def firing_token_labels(model, sae, plan: LayerPlan, tokens: np.ndarray, features: list[int],
                        tokenizer: Tokenizer, batch_size: int, top: int = 3) -> list[str]:
    """'fires on ' the' 41%, ' a' 9%': the tokens each feature fires on most often."""
    device = next(model.parameters()).device
    encoder = FeatureEncoder(sae, features)
    counters = [Counter() for _ in features]
    for start in range(0, len(tokens), batch_size):
        tok = torch.from_numpy(tokens[start:start + batch_size]).long().to(device)
        acts = encoder(residual_at(model, tok, plan.resume_at))[:, 1:-1].cpu().numpy()
        ids = tok[:, 1:-1].cpu().numpy()
        for f in range(len(features)):
            counters[f].update(ids[acts[..., f] > 0].tolist())
    labels = []
    for counter in counters:
        total = sum(counter.values())
        parts = [f"{tokenizer.token_str(t)!r} {n / total:.0%}" for t, n in counter.most_common(top)]
        labels.append("fires on " + ", ".join(parts) if parts else "(never fires)")
    return labels


def choose_auto(model, saes: dict, plans: dict[int, LayerPlan], tokens: np.ndarray, tokenizer: Tokenizer,
                k: int, min_density: float, max_density: float, batch_size: int) -> list[FeatureChoice]:
    counts, maxes, n_scored = activation_stats(model, saes, plans, tokens, batch_size)
    out = []
    for layer in plans:
        picked = choose(layer, counts[layer], maxes[layer], n_scored, k, min_density, max_density)
        labels = firing_token_labels(model, saes[layer], plans[layer], tokens, [p[0] for p in picked],
                                     tokenizer, batch_size)
        for (feature, dens, mx, reason), label in zip(picked, labels, strict=True):
            out.append(FeatureChoice(layer=layer, feature=feature, label=label, source="auto", reason=reason,
                                     density=dens, max_act=mx,
                                     neuronpedia_url=plans[layer].neuronpedia_url(feature) or ""))
    return out
