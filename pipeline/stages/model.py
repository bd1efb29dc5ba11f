"""Stage `model`: get the model and SAEs ready and record exactly what was resolved.

Every input is checked first (pipeline.preflight), so a typo in any stage's params stops the study at second
1. The toy preset's model and SAEs are then built into data/toy/ (pipeline.toy). pipeline.load.prepare does the
rest, for a hub model as for a local one: fetch, load once, check, write the processed model
(data/<preset>/processed/) and return the record. This stage writes that record to data/model.json, the single
source of truth of every later stage, and the SAE configs as SAE-Lens resolved them to
data/<preset>/sae_configs.json.
"""

from __future__ import annotations

from typing import Any

from pipeline.core import artifacts
from pipeline.core.io import atomic_dir, write_json
from pipeline.core.params.config import Config
from pipeline.core.params.stage_params import StageParams
from pipeline.core.plan.layers import plan_layers
from pipeline.core.plan.record import write_model_record
from pipeline.core.runinfo import device_description, stage_record
from pipeline.load.prepare import prepare
from pipeline.preflight import after_loading, preflight

# The params this stage's outputs depend on (its dvc.yaml params). It also reads every other key,
# `layers` included, but only to check them (preflight, after_loading): errors, never outputs.
PARAMS = ("preset", "model", "sae_release", "sae_id_template", "hub_revisions", "hook", "seed", "toy_lm_steps",
          "toy_sae_steps")


def run_model_stage(config: Config | StageParams) -> dict[str, Any]:
    config = StageParams.of(config, "model", PARAMS)
    checked = config.for_checks()
    preflight(checked)  # a typo in any stage's input stops the study here, at second 1
    with stage_record("model") as record:
        record["device"] = device_description("cpu")  # checks and the toy's training run on the CPU
        if config.preset == "toy":
            from pipeline.toy.build import build_toy

            with atomic_dir(artifacts.preset_dir("toy")) as tmp:
                record["toy"] = build_toy(tmp, config)
        plan_layers(checked)  # the study's own layers must all be covered (clear error if not)
        resolved, sae_configs = prepare(config, checked.layers,
                                        lambda n_ctx, d_sae, plans: after_loading(checked, n_ctx, d_sae, plans))
        write_json(artifacts.preset_dir(config.preset) / "sae_configs.json", sae_configs)
        write_model_record(resolved)
    return resolved
