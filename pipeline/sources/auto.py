"""feature_source `auto`: choose features from activation statistics on the study's own corpus.

For each layer every SAE feature's density (fraction of scored positions where it fires, a != 0,
so a feature that fires negatively, as AbsTopK's can, counts) and maximum |activation| are
measured on data/tokens.npy, at the tensor the engine intervenes on (the residual entering block
resume_at, whichever hook the study uses). Candidates are the features whose density lies in
[min_density, max_density]: not dead, not always on. The candidates, sorted by density, are split
into `features_per_layer` equal groups; from each group the feature with the largest maximum
|activation| is taken, unless its main firing token is that of a feature already chosen in
the layer, in which case the next strongest of the group's top 16 that differs is. So the choice
spans the density band, favours features that fire strongly when they fire, and does not fill a
layer with five features of one token. It is deterministic (ties go to the lower index).

Each chosen feature gets a label proposed from the data: the tokens it fires on most often and the
token that most often comes just before, e.g. "fires on 'd' 85%, 'D' 6% (after ' ' 37%)".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.errors import UserError
from pipeline.core.plan.layers import LayerPlan
from pipeline.engine.forward import FeatureEncoder, residual_at
from pipeline.load.tokenizer import Tokenizer, quote_token
from pipeline.sources.selection import FeatureChoice


@torch.inference_mode()
def activation_stats(model, saes: dict, plans: dict[int, LayerPlan], tokens: np.ndarray, batch_size: int
                     ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], int]:
    """Per layer: firing counts (a != 0) [d_sae] and max |activations| [d_sae] over the scored positions."""
    device = next(model.parameters()).device
    hooks = {plans[layer].hook: layer for layer in saes}
    stop = max(_hook_block(plans[layer].hook) for layer in saes) + 1  # the blocks whose hooks we read
    counts = {layer: torch.zeros(saes[layer].cfg.d_sae, dtype=torch.long, device=device) for layer in saes}
    maxes = {layer: torch.zeros(saes[layer].cfg.d_sae, device=device) for layer in saes}
    batches = tqdm(range(0, len(tokens), batch_size), desc="features: activation statistics", unit="batch",
                   disable=None, leave=False)
    for start in batches:
        tok = torch.from_numpy(tokens[start:start + batch_size]).long().to(device)
        _, cache = model.run_with_cache(tok, names_filter=list(hooks), stop_at_layer=stop)
        for hook, layer in hooks.items():
            acts = saes[layer].encode(cache[hook][:, 1:-1]).float()  # scored positions
            counts[layer] += (acts != 0).sum(dim=(0, 1))
            maxes[layer] = torch.maximum(maxes[layer], acts.abs().amax(dim=(0, 1)))
    n_scored = tokens.shape[0] * (tokens.shape[1] - 2)
    return ({k: v.cpu().numpy() for k, v in counts.items()}, {k: v.cpu().numpy() for k, v in maxes.items()},
            n_scored)


def _hook_block(hook: str) -> int:
    """The block a hook belongs to: blocks.L.hook_resid_pre runs at block L's entry, so a forward
    pass stopped before block L (stop_at_layer=L) never fires it; stopping after block L does."""
    return int(hook.split(".")[1])


SHORTLIST = 16  # candidates per density group whose firing tokens are looked at


def shortlist(layer: int, counts: np.ndarray, maxes: np.ndarray, n_scored: int, k: int,
              min_density: float, max_density: float) -> tuple[list[np.ndarray], np.ndarray, int]:
    """k density groups spanning the band, each's candidates ordered by max activation (ties: index)."""
    density = counts / n_scored
    candidates = np.flatnonzero((density >= min_density) & (density <= max_density) & (counts > 0))
    if len(candidates) < k:
        raise UserError(
            f"layer {layer}: only {len(candidates)} features fire on between {min_density:g} and "
            f"{max_density:g} of the {n_scored} scored positions, fewer than features_per_layer={k}; "
            "widen min_density/max_density or use more passages"
        )
    by_density = candidates[np.lexsort((candidates, density[candidates]))]
    groups = [g[np.lexsort((g, -maxes[g]))] for g in np.array_split(by_density, k)]
    return groups, density, len(candidates)


@dataclass
class FiringProfile:
    """Which tokens a feature fires on, and which tokens come just before them."""

    on: Counter
    before: Counter

    def top(self) -> int | None:
        return self.on.most_common(1)[0][0] if self.on else None

    def label(self, tokenizer: Tokenizer, n: int = 3) -> str:
        total = sum(self.on.values())
        if not total:
            return "(never fires)"
        parts = [f"{quote_token(tokenizer.token_str(t))} {c / total:.0%}" for t, c in self.on.most_common(n)]
        prev, c = self.before.most_common(1)[0]
        return "fires on " + ", ".join(parts) + f" (after {quote_token(tokenizer.token_str(prev))} {c / total:.0%})"


@torch.inference_mode()
def firing_profiles(model, sae, plan: LayerPlan, tokens: np.ndarray, features: list[int],
                    batch_size: int) -> dict[int, FiringProfile]:
    """Firing-token and preceding-token counts of each feature over the scored positions."""
    device = next(model.parameters()).device
    encoder = FeatureEncoder(sae, features)
    profiles = {f: FiringProfile(Counter(), Counter()) for f in features}
    for start in range(0, len(tokens), batch_size):
        tok = torch.from_numpy(tokens[start:start + batch_size]).long().to(device)
        acts = encoder(residual_at(model, tok, plan.resume_at))[:, 1:-1].cpu().numpy()
        ids = tok.cpu().numpy()
        for i, f in enumerate(features):
            n, t = np.nonzero(acts[..., i] != 0)  # t indexes scored positions: token position t + 1
            profiles[f].on.update(ids[n, t + 1].tolist())
            profiles[f].before.update(ids[n, t].tolist())
    return profiles


def choose_layer(model, sae, plan: LayerPlan, tokens: np.ndarray, tokenizer: Tokenizer, counts: np.ndarray,
                 maxes: np.ndarray, n_scored: int, k: int, min_density: float, max_density: float,
                 batch_size: int) -> list[FeatureChoice]:
    """One feature per density group: the strongest whose main firing token no chosen one shares."""
    groups, density, n_candidates = shortlist(plan.layer, counts, maxes, n_scored, k, min_density, max_density)
    looked_at = [int(f) for g in groups for f in g[:SHORTLIST]]
    profiles = firing_profiles(model, sae, plan, tokens, looked_at, batch_size)
    used: set[int | None] = set()
    out = []
    for g, group in enumerate(groups):
        options = [int(f) for f in group[:SHORTLIST]]
        fresh = [f for f in options if profiles[f].top() not in used]
        best = (fresh or options)[0]
        used.add(profiles[best].top())
        why = ("largest max activation in its group" if best == options[0] else
               "strongest in its group whose main firing token no feature chosen before shares")
        reason = (f"auto: density {density[best]:.3%} (group {g + 1}/{k} of {n_candidates} candidates in "
                  f"[{min_density:g}, {max_density:g}]), {why}")
        out.append(FeatureChoice(layer=plan.layer, feature=best, label=profiles[best].label(tokenizer),
                                 source="auto", reason=reason, density=float(density[best]),
                                 max_act=float(maxes[best]), neuronpedia_url=plan.neuronpedia_url(best) or ""))
    return out


def choose_auto(model, saes: dict, plans: dict[int, LayerPlan], tokens: np.ndarray, tokenizer: Tokenizer,
                k: int, min_density: float, max_density: float, batch_size: int) -> list[FeatureChoice]:
    counts, maxes, n_scored = activation_stats(model, saes, plans, tokens, batch_size)
    return [choice for layer in plans
            for choice in choose_layer(model, saes[layer], plans[layer], tokens, tokenizer, counts[layer],
                                       maxes[layer], n_scored, k, min_density, max_density, batch_size)]
