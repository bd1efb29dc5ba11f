"""Stage `model`: get the model and SAEs ready and record exactly what was resolved.

gpt2-small (any hub model + SAE-Lens release): download into the Hugging Face cache, or fail in
about a second when there is no network and no cache (pipeline.hub); load everything once to
check it fits together; write data/model.json with repo ids, commits and weight hashes, and
data/<preset>/processed/ (the model after TransformerLens's weight processing and where each SAE's
tensors are: pipeline.processed), from which later stages load in a fraction of a second.
toy: build the 12-layer byte model and its SAEs into data/toy/ (pipeline.toy), then load them
back through the local-directory path like any user's own model.

The stage covers every layer of the model that has an SAE, whatever `layers` says, so narrowing `layers` later
re-runs nothing here. Both write the SAE configs as SAE-Lens resolved them to data/<preset>/sae_configs.json. Later
stages read data/model.json, never the preset keys: it is their single source of truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline import artifacts, hub
from pipeline.checks import check_layers_in_range
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.io import atomic_dir, read_json, sha256_file, write_json
from pipeline.layer_plan import (
    LayerPlan,
    available_saes,
    equivalent_hooks,
    model_n_layers,
    plan_layers,
    pretrained_directory,
)
from pipeline.loading import MODEL_WEIGHTS, TOKENIZER_SPEC, load_model, load_sae, sae_model_kwargs
from pipeline.processed.store import SAE_WEIGHTS, write_processed
from pipeline.runinfo import device_description, stage_record
from pipeline.stage_params import StageParams
from pipeline.validate import after_loading, preflight

# The params this stage's outputs depend on (its dvc.yaml params). It also reads every other key,
# `layers` included, but only to check them (preflight, after_loading): errors, never outputs.
PARAMS = ("preset", "model", "sae_release", "hook", "seed", "toy_lm_steps", "toy_sae_steps")


def run_model_stage(config: Config | StageParams) -> dict[str, Any]:
    config = StageParams.of(config, "model", PARAMS)
    checked = config.for_checks()
    preflight(checked)  # a typo in any stage's input stops the study here, at second 1
    with stage_record("model") as record:
        # Checks and the toy's training run on the CPU: the record must not depend on the device.
        device = torch.device("cpu")
        record["device"] = device_description(device)
        if config.preset == "toy":
            from pipeline.toy.build import build_toy

            with atomic_dir(artifacts.preset_dir("toy")) as tmp:
                record["toy"] = build_toy(tmp, config)
        # Every layer of the model, not only `layers`: changing `layers` later needs no download
        # and no rebuild of the toy.
        plan_layers(checked)  # the study's own layers must all be covered (clear error if not)
        n_layers = model_n_layers(config)
        if n_layers is not None:
            covered = [layer for layer in range(n_layers) if _has_sae(config, layer, n_layers)]
            config = config.replace(layers=tuple(covered))
        else:  # a release whose SAEs skip blocks: the study's own layers (checked after loading)
            config = config.replace(layers=checked.layers)
        plans = plan_layers(config)
        availability = "local"
        sae_files: dict[int, list[hub.HubFile]] = {}
        if not config.saes_are_local:
            sae_files = _hub_sae_files(config, plans)
            every = [f for files in sae_files.values() for f in files]
            probe = every or [hub.HubFile(pretrained_directory()[config.sae_release].repo_id, ".gitattributes")]
            availability = hub.ensure_available(probe, f"SAE release {config.sae_release}")
        saes = {p.layer: load_sae(config.sae_release, p, device, "float32") for p in plans}

        model_kwargs = None if config.saes_are_local else sae_model_kwargs(list(saes.values()))
        if not config.model_is_local and availability == "cache":
            repo = _official_repo(config.model)
            hub.ensure_available([hub.HubFile(repo, name) for name in hub.MODEL_FILES], f"model {config.model}")
        model = load_model(config.model, device, "float32", model_kwargs)
        check_layers_in_range([*checked.layers, *(p.layer for p in plans)], model.cfg.n_layers)

        after_loading(checked, model.cfg.n_ctx, {p.layer: int(saes[p.layer].cfg.d_sae) for p in plans}, plans)
        write_processed(config.preset, model, saes, {p.layer: _sae_weights_file(config, p, sae_files) for p in plans})
        layers = [_layer_entry(config, p, saes[p.layer], model, sae_files.get(p.layer, [])) for p in plans]
        resolved = {
            "preset": config.preset,
            "model": _model_entry(config, model, model_kwargs),
            "tokenizer": _tokenizer_spec(config, model),
            "sae_release": config.sae_release,
            "hook": config.hook,
            "availability": availability,
            "layers": layers,
        }
        write_json(artifacts.preset_dir(config.preset) / "sae_configs.json",
                   {str(p.layer): saes[p.layer].cfg.to_dict() for p in plans})
        artifacts.write_model_record(resolved)
    return resolved


def _has_sae(config: Config, layer: int, n_layers: int) -> bool:
    ids, _, _ = available_saes(config)
    return any(h in ids for h in equivalent_hooks(config.hook, layer, n_layers))


def _hub_sae_files(config: Config, plans: list[LayerPlan]) -> dict[int, list[hub.HubFile]]:
    """The files SAE-Lens's default loader reads per layer (none known for converted releases)."""
    info = pretrained_directory()[config.sae_release]
    if info.conversion_func is not None:
        return {}
    return {p.layer: [hub.HubFile(info.repo_id, f"{info.saes_map[p.sae_id]}/{name}") for name in hub.SAE_FILES]
            for p in plans}


def _sae_weights_file(config: Config, plan: LayerPlan, sae_files: dict[int, list[hub.HubFile]]) -> Path | None:
    """The SAE-Lens weights file the layer's SAE was read from (None for converted releases)."""
    if config.saes_are_local:
        return Path(config.sae_release) / plan.sae_id / SAE_WEIGHTS
    for f in sae_files.get(plan.layer, []):
        if f.filename.endswith(SAE_WEIGHTS):
            return f.cached_path()
    return None


def _official_repo(name: str) -> str:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    return get_official_model_name(name)


def _layer_entry(config: Config, plan: LayerPlan, sae, model, files: list[hub.HubFile]) -> dict[str, Any]:
    if sae.cfg.d_in != model.cfg.d_model:
        raise UserError(f"SAE {plan.sae_id} reads d_in={sae.cfg.d_in} but the model has d_model={model.cfg.d_model}")
    entry = plan.to_dict() | {
        "d_sae": int(sae.cfg.d_sae),
        "architecture": sae.cfg.architecture(),
        "sae_hook_name": sae.cfg.metadata.hook_name,
    }
    if config.saes_are_local:
        entry["weights_sha256"] = sha256_file(Path(config.sae_release) / plan.sae_id / "sae_weights.safetensors")
    else:
        entry["hub"] = [hub.snapshot_record(f) for f in files]
    return entry


def _model_entry(config: Config, model, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    if config.model_is_local:
        entry: dict[str, Any] = {
            "name": config.model,
            "source": "local",
            "weights_sha256": sha256_file(Path(config.model) / MODEL_WEIGHTS),
        }
    else:
        repo = _official_repo(config.model)
        entry = {
            "name": config.model,
            "source": "hub",
            "hub": [hub.snapshot_record(hub.HubFile(repo, f)) for f in hub.MODEL_FILES],
            "from_pretrained_kwargs": kwargs or {},
        }
    cfg = model.cfg
    return entry | {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_ctx": cfg.n_ctx, "d_vocab": cfg.d_vocab}


def _tokenizer_spec(config: Config, model) -> dict[str, Any]:
    if config.model_is_local:
        return read_json(Path(config.model) / TOKENIZER_SPEC)
    name = model.tokenizer.name_or_path if model.tokenizer is not None else _official_repo(config.model)
    return {"type": "hf", "name": name, "bos_token_id": int(model.tokenizer.bos_token_id)}
