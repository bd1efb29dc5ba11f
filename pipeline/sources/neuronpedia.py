"""feature_source `neuronpedia`: features a researcher would call interpretable, per Neuronpedia.

Candidates come from curated lists of indices: data/res_jb_documented_features.csv, res-jb
features whose meaning is stated in public material (tutorials, papers, tests) or by Neuronpedia's
autointerp, and data/gemma_scope_documented_features.csv, the few Gemma Scope (width 16k) features we found
documented (all at layer 20), in an order shuffled with `seed`; a layer with too few of them (resid_post 11,
i.e. Neuronpedia's 12-res-jb, has none; nor has any Gemma Scope layer but 20, nor OpenAI's v5 SAEs) continues
with seeded random indices in [0, d_sae). Each row names its Neuronpedia source: a `neuronpedia` column
(`gemma-2-2b/20-gemmascope-res-16k`), or res-jb's `neuronpedia_layer` N for `gpt2-small/N-res-jb`. We chose
this over explanation search, whose hits depend on a free-text query (biasing the study toward
whatever we searched for), are limited to 200 searches an hour and shift as explanations are
added, and over the bulk S3 export, which is far more to download than five features per layer
need. The list is in git, so the candidate set is reviewable and the same on every machine.

Each candidate's Neuronpedia record (pipeline.sources.neuronpedia_client: fetched once, then cached on disk) must
have an explanation, an explanation score of at least `MIN_EXPLANATION_SCORE` where the record has
scores, a `frac_nonzero` in [min_density, max_density] and a max activation; the first
`features_per_layer` that pass are chosen, at most `neuronpedia_max_fetch` being looked at per
layer. Features Neuronpedia does not have (HTTP 404) are skipped and logged. The choice depends only
on `seed`, the list and the records, so a rerun from the cache gives the same rows.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import artifacts
from pipeline.core.errors import UserError
from pipeline.core.params.config import Config
from pipeline.core.plan.layers import LayerPlan
from pipeline.core.plan.record import ModelRecord
from pipeline.sources.neuronpedia_client import NeuronpediaClient, NeuronpediaFeature, split_neuronpedia_id
from pipeline.sources.selection import FeatureChoice

log = logging.getLogger(__name__)

RES_JB_SOURCE = "gpt2-small/{layer}-res-jb"  # a list with `neuronpedia_layer` documents these sources
MIN_EXPLANATION_SCORE = 0.5  # mean of Neuronpedia's scores for the chosen explanation, where it has any
NP_TOP_TOKENS = 10  # Neuronpedia's top promoted / suppressed logit tokens kept per feature


@dataclass(frozen=True)
class Candidate:
    index: int
    origin: str  # why it was looked at, for the `reason` column


def documented_indices(csv_path: str | Path, neuronpedia_id: str, d_sae: int) -> dict[int, int]:
    """Feature index -> row number in the documented list, for one Neuronpedia source."""
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise UserError(f"{csv_path} not found; it ships with the repository (git checkout -- {csv_path})")
    found: dict[int, int] = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        source_column = "neuronpedia" if "neuronpedia" in columns else "neuronpedia_layer"
        missing = [c for c in (source_column, "feature") if c not in columns]
        if missing:
            raise UserError(f"{csv_path} lacks column(s) {', '.join(missing)} (a source: neuronpedia or "
                            "neuronpedia_layer; and feature)")
        for row_no, row in enumerate(reader, start=2):  # row 1 is the header
            try:
                index = int(row["feature"])
                source = (row["neuronpedia"].strip() if source_column == "neuronpedia"
                          else RES_JB_SOURCE.format(layer=int(row["neuronpedia_layer"])))
            except (TypeError, ValueError, AttributeError):
                raise UserError(f"{csv_path} row {row_no}: feature (and neuronpedia_layer) need whole numbers, "
                                "neuronpedia a source such as gemma-2-2b/20-gemmascope-res-16k") from None
            if source != neuronpedia_id:
                continue
            if not 0 <= index < d_sae:
                raise UserError(f"{csv_path} row {row_no}: feature {index} is out of range for {neuronpedia_id}; "
                                f"allowed: 0..{d_sae - 1}")
            found.setdefault(index, row_no)
    return found


def candidates(documented: dict[int, int], d_sae: int, rng: np.random.Generator,
               csv_name: str) -> Iterator[Candidate]:
    """The documented features in a seeded order, then seeded random indices not yet seen."""
    listed = sorted(documented)  # the file's order must not matter, only the seed
    for i in rng.permutation(len(listed)):
        index = listed[int(i)]
        yield Candidate(index, f"documented in {csv_name} (row {documented[index]})")
    for index in rng.permutation(d_sae):
        if int(index) not in documented:
            yield Candidate(int(index), f"random index (seeded; {len(listed)} documented for this source)")


def rejection(feature: NeuronpediaFeature | None, min_density: float, max_density: float) -> str | None:
    """Why a candidate is not chosen (a short category, counted in errors), or None if it passes."""
    if feature is None:
        return "not on Neuronpedia (404)"
    best = feature.best_explanation
    if best is None:
        return "no explanation"
    if best.score is not None and best.score < MIN_EXPLANATION_SCORE:
        return f"explanation score below {MIN_EXPLANATION_SCORE:g}"
    if not min_density <= feature.frac_nonzero <= max_density:
        return f"frac_nonzero outside [{min_density:g}, {max_density:g}]"
    if feature.max_act is None or feature.max_act <= 0:
        return "no positive maxActApprox"
    return None


def tokens_json(pairs: tuple[tuple[str, float], ...]) -> str:
    return json.dumps([[token, value] for token, value in pairs[:NP_TOP_TOKENS]], ensure_ascii=False)


def _choice(layer: int, plan: LayerPlan, feature: NeuronpediaFeature, origin: str, n_seen: int,
            config: Config) -> FeatureChoice:
    best = feature.best_explanation
    assert best is not None and feature.max_act is not None  # rejection() checked both
    by = best.model or "unknown explainer"
    score = "unscored" if best.score is None else f"score {best.score:.2f}"
    reason = (f"neuronpedia: {origin}; candidate {n_seen} for this layer; explanation by {by} ({score}); "
              f"frac_nonzero {feature.frac_nonzero:.4%} in [{config.min_density:g}, {config.max_density:g}]")
    return FeatureChoice(
        layer=layer, feature=feature.index, label=best.description, source="neuronpedia", reason=reason,
        density=feature.frac_nonzero, max_act=feature.max_act,
        neuronpedia_url=plan.neuronpedia_url(feature.index) or "",
        np_pos_tokens=tokens_json(feature.pos_tokens), np_neg_tokens=tokens_json(feature.neg_tokens),
    )


def documented_for(lists: Sequence[str | Path], neuronpedia_id: str, d_sae: int) -> tuple[dict[int, int], Path]:
    """The documented features of one Neuronpedia source and the list they come from (the first list that has any;
    a source is documented in one list). No list has any: an empty dict, and the first list's path."""
    paths = [Path(p) for p in lists]
    for path in paths:
        found = documented_indices(path, neuronpedia_id, d_sae)
        if found:
            return found, path
    return {}, paths[0]


def choose_layer(client: NeuronpediaClient, config: Config, layer: int, plan: LayerPlan, d_sae: int,
                 documented_csv: str | Path | Sequence[str | Path]) -> list[FeatureChoice]:
    assert plan.neuronpedia is not None
    model_id, source = split_neuronpedia_id(plan.neuronpedia)
    lists = [documented_csv] if isinstance(documented_csv, (str, Path)) else list(documented_csv)
    documented, documented_csv = documented_for(lists, plan.neuronpedia, d_sae)
    # Seeded per layer, so adding or removing other layers never changes this layer's choice.
    rng = np.random.default_rng([config.seed, layer])
    chosen: list[FeatureChoice] = []
    rejected: Counter[str] = Counter()
    requests_before, hits_before = client.requests_made, client.cache_hits
    n_seen = 0
    for cand in candidates(documented, d_sae, rng, Path(documented_csv).name):
        if n_seen == config.neuronpedia_max_fetch:
            break
        n_seen += 1
        feature = client.feature(model_id, source, cand.index)
        why = rejection(feature, config.min_density, config.max_density)
        if why is None:
            assert feature is not None
            chosen.append(_choice(layer, plan, feature, cand.origin, n_seen, config))
            if len(chosen) == config.features_per_layer:
                break
            continue
        rejected[why] += 1
        if feature is None:
            log.info("skipping %s/%d: not on Neuronpedia (HTTP 404)", plan.neuronpedia, cand.index)
        else:
            log.debug("rejected %s/%d: %s", plan.neuronpedia, cand.index, why)
    why_text = ", ".join(f"{reason}: {n}" for reason, n in sorted(rejected.items())) or "none rejected"
    if len(chosen) < config.features_per_layer:
        ran_out = n_seen < config.neuronpedia_max_fetch
        raise UserError(
            f"layer {layer} ({plan.neuronpedia}): only {len(chosen)} of features_per_layer="
            f"{config.features_per_layer} passed after fetching {n_seen} candidate(s)"
            f"{' (no candidates left)' if ran_out else f' (neuronpedia_max_fetch={config.neuronpedia_max_fetch})'}; "
            f"rejected: {why_text}; raise neuronpedia_max_fetch, widen min_density/max_density, "
            "or set feature_source to csv or auto"
        )
    log.info("layer %d (%s): chose %d of %d candidates (%d from cache, %d HTTP requests); rejected: %s",
             layer, plan.neuronpedia, len(chosen), n_seen, client.cache_hits - hits_before,
             client.requests_made - requests_before, why_text)
    return chosen


def choose_from_neuronpedia(config: Config, model_record: ModelRecord, *, client: NeuronpediaClient | None = None,
                            documented_csv: str | Path | Sequence[str | Path] = artifacts.DOCUMENTED_FEATURE_LISTS,
                            ) -> list[FeatureChoice]:
    """`features_per_layer` Neuronpedia-vetted features for every layer in `config.layers`."""
    plans = {layer: model_record.layer(layer).plan() for layer in config.layers}
    # Checked for every layer before any request, so a toy SAE fails at once, not after fetching.
    for layer, plan in plans.items():
        if plan.neuronpedia is None:
            raise UserError(
                f"layer {layer}: feature_source neuronpedia needs SAEs with a Neuronpedia source, and "
                f"{plan.sae_release} {plan.sae_id} has none; set feature_source to auto (chosen from "
                "activations on the corpus, offline) or csv (a curated file)"
            )
        split_neuronpedia_id(plan.neuronpedia)
    client = client or NeuronpediaClient()
    return [choice for layer, plan in plans.items()
            for choice in choose_layer(client, config, layer, plan, model_record.layer(layer).d_sae, documented_csv)]
