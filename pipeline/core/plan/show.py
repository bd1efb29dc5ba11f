"""`python -m pipeline plan`: what the study will do, resolved without loading any weights."""

from __future__ import annotations

import math
from typing import Any

from pipeline.core.modes import MODES
from pipeline.core.params.config import Config
from pipeline.core.plan.layers import model_from_pretrained_kwargs, plan_layers


def forward_passes(config: Config) -> dict[str, int]:
    """Passage-forwards through the model (one passage of max_len tokens each).

    engine: per layer one prefix (embedding up to the hook) and one clean suffix per passage, plus
    one suffix per (feature, non-identity alpha, passage) at most (fewer when a feature is silent in
    a passage), and as many again per random-direction control draw. plain: one full forward per
    (feature, alpha, passage) plus one clean per passage (no controls).
    """
    identity = MODES[config.intervention].identity
    n_values = len(config.alpha_sweep)
    active = n_values - (1 if identity in config.alpha_sweep else 0)
    n, f, b, layers = config.max_passages, config.features_per_layer, config.batch_size, len(config.layers)
    per_row = 1 + config.control_draws  # the feature's own row and one per control draw
    variant_rows = layers * f * active * n * per_row
    return {
        "clean_prefix_passes": layers * n,
        "clean_suffix_passes": layers * n,
        "intervened_suffix_passes_max": variant_rows,
        "control_draws": config.control_draws,
        "batched_calls_max": layers * math.ceil(n / b) * (2 + f * active * per_row),
        "plain_full_passes": layers * (f * n_values * n + n),
        "tokens_per_pass": config.max_len,
        # stage `screen`: one forward and backward pass of the corpus, then its verified features run exactly
        "screen_verified_per_layer": config.screen_top_k + config.screen_random,
        # the screen verifies the scale intervention whatever `intervention` is (docs/screen.md): alpha = 1 is skipped
        "screen_suffix_passes_max": layers * (config.screen_top_k + config.screen_random) * n
        * sum(1 for a in config.alpha_sweep if a != MODES["scale"].identity),
        "screen_estimator": config.screen_estimator,
    }


def layers_line(config: Config) -> str:
    """Which layers the study runs, and how many the preset's model has (null `layers`: all of them)."""
    listed = ", ".join(str(layer) for layer in config.layers)
    depth = config.preset_info.n_layers if config.model == config.preset_info.model else None
    if depth is None:
        return f"{listed} ({len(config.layers)})"
    if tuple(config.layers) == tuple(range(depth)):
        return f"0-{depth - 1} (every layer of {config.model})"
    return f"{listed} ({len(config.layers)} of {config.model}'s {depth})"


def build_plan(config: Config) -> dict[str, Any]:
    layers = plan_layers(config)
    return {
        "preset": config.preset,
        "model": config.model,
        "model_from_pretrained_kwargs": model_from_pretrained_kwargs(config),
        "sae_release": config.sae_release,
        "sae_id_template": config.sae_id_template,
        "hub_revisions": config.hub_revisions or {},
        "hook": config.hook,
        "corpus": config.corpus,
        "passages": config.max_passages,
        "max_len": config.max_len,
        "feature_source": config.feature_source,
        "features_per_layer": config.features_per_layer,
        "intervention": config.intervention,
        "alpha": config.alpha,
        "alphas": list(config.alpha_sweep),
        "seed": config.seed,
        "device": config.device,
        "dtype": config.dtype,
        "batch_size": config.batch_size,
        "layers": [
            {"layer": p.layer, "hook": p.hook, "sae_release": p.sae_release, "sae_id": p.sae_id,
             "sae_hook": p.sae_hook, "neuronpedia": p.neuronpedia}
            for p in layers
        ],
        "layers_line": layers_line(config),
        "forward_passes": forward_passes(config),
    }


def format_plan(plan: dict[str, Any]) -> str:
    fp = plan["forward_passes"]
    lines = [
        f"preset        {plan['preset']}",
        f"model         {plan['model']}" + (f"  {plan['model_from_pretrained_kwargs']}" if plan["model_from_pretrained_kwargs"] else ""),
        f"SAEs          {plan['sae_release']} at {plan['hook']}"
        + (f" (ids: {plan['sae_id_template']})" if plan["sae_id_template"] else ""),
        f"corpus        {plan['corpus']}: {plan['passages']} passages x {plan['max_len']} tokens (seed {plan['seed']})",
        f"features      {plan['features_per_layer']} per layer from {plan['feature_source']}",
        f"intervention  {plan['intervention']}, alphas {', '.join(f'{a:g}' for a in plan['alphas'])} (headline {plan['alpha']:g})",
        f"device        {plan['device']}, {plan['dtype']}, batch_size {plan['batch_size']}",
    ]
    if plan["hub_revisions"]:
        lines.append("revisions     " + ", ".join(f"{repo}@{commit[:12]}" for repo, commit in plan["hub_revisions"].items()))
    lines.append(f"layers        {plan['layers_line']}")
    id_width = max(28, *(len(row["sae_id"]) for row in plan["layers"]))
    lines += ["", f"{'layer':>5}  {'hook':<26} {'SAE id':<{id_width}} {'SAE reads':<26} neuronpedia"]
    for row in plan["layers"]:
        lines.append(f"{row['layer']:>5}  {row['hook']:<26} {row['sae_id']:<{id_width}} "
                     f"{row['sae_hook'] or '(known after loading)':<26} {row['neuronpedia'] or '-'}")
    lines += [
        "",
        f"forward passes ({fp['tokens_per_pass']} tokens each): {fp['clean_prefix_passes']:,} clean prefix + "
        f"{fp['clean_suffix_passes']:,} clean suffix + at most {fp['intervened_suffix_passes_max']:,} intervened "
        f"suffix passes (with {fp['control_draws']} random-direction control draws each), in at most "
        f"{fp['batched_calls_max']:,} batched calls",
        f"(the plain way, one full forward per feature x alpha x passage: {fp['plain_full_passes']:,} full passes)",
        f"screen: one forward and backward pass of the {plan['passages']} passages for every SAE feature, then at most "
        f"{fp['screen_verified_per_layer']} features per layer run exactly: at most {fp['screen_suffix_passes_max']:,} "
        "intervened suffix passes"
        + (" and a double backward per feature and passage where it fires (screen_estimator: second_order)"
           if fp["screen_estimator"] == "second_order" else ""),
    ]
    return "\n".join(lines)
