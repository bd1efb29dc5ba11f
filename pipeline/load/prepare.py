"""The `model` stage's work: get the model and SAEs ready, check they fit together, and say exactly what was
resolved.

For a hub model and SAE-Lens release: download into the Hugging Face cache, or fail in about a second when
there is no network and no cache (hub.py); load everything once to check it; write the processed model and
the index of SAE tensors (processed/, from which later stages load in a fraction of a second); return the
record data/model.json holds (repo ids, commits and blob hashes of every file) and each SAE's config as
SAE-Lens resolved it. A local model and SAE directory (the toy, or a user's own) go through the same path.

Every layer of the model that has an SAE is prepared, whatever `layers` says, so narrowing `layers` later
re-runs nothing here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import UserError
from pipeline.core.io import read_json, sha256_file
from pipeline.core.params.config import Config
from pipeline.core.params.limits import check_layers_in_range
from pipeline.core.plan.layers import (
    LayerPlan,
    available_saes,
    equivalent_hooks,
    model_n_layers,
    plan_layers,
    pretrained_directory,
)
from pipeline.load import hub
from pipeline.load.library import (
    MODEL_WEIGHTS,
    TOKENIZER_SPEC,
    model_from_source,
    sae_from_source,
    sae_model_kwargs,
)
from pipeline.load.processed.store import SAE_WEIGHTS, write_processed


def prepare(config: Config, study_layers: tuple[int, ...], check_loaded) -> tuple[dict[str, Any], dict[str, Any]]:
    """(data/model.json's record, layer -> the SAE's config as SAE-Lens resolved it). `config` is the model
    stage's params; `study_layers` the `layers` param, only checked against the model; `check_loaded(n_ctx,
    d_sae by layer, plans)` runs the params checks that need the loaded model (pipeline.preflight)."""
    # Checks run on the CPU: the record must not depend on the device.
    device = torch.device("cpu")
    # Every layer of the model, not only `layers`: changing `layers` later needs no download and no rebuild.
    n_layers = model_n_layers(config)
    if n_layers is not None:
        covered = tuple(layer for layer in range(n_layers) if _has_sae(config, layer, n_layers))
    else:  # a release whose SAEs skip blocks: the study's own layers (checked after loading)
        covered = tuple(study_layers)
    plans = plan_layers(config, layers=covered)
    availability = "local"
    sae_files: dict[int, list[hub.HubFile]] = {}
    if not config.saes_are_local:
        sae_files = _hub_sae_files(config, plans)
        every = [f for files in sae_files.values() for f in files]
        probe = every or [hub.HubFile(pretrained_directory()[config.sae_release].repo_id, ".gitattributes")]
        availability = hub.ensure_available(probe, f"SAE release {config.sae_release}")
    saes = {p.layer: sae_from_source(config.sae_release, p, device, "float32") for p in plans}

    model_kwargs = None if config.saes_are_local else sae_model_kwargs(list(saes.values()))
    if not config.model_is_local and availability == "cache":
        repo = _official_repo(config.model)
        hub.ensure_available([hub.HubFile(repo, name) for name in hub.MODEL_FILES], f"model {config.model}")
    model = model_from_source(config.model, device, "float32", model_kwargs)
    check_layers_in_range([*study_layers, *(p.layer for p in plans)], model.cfg.n_layers)

    check_loaded(model.cfg.n_ctx, {p.layer: int(saes[p.layer].cfg.d_sae) for p in plans}, plans)
    write_processed(config.preset, model, saes, {p.layer: _sae_weights_file(config, p, sae_files) for p in plans})
    record = {
        "preset": config.preset,
        "model": _model_entry(config, model, model_kwargs),
        "tokenizer": _tokenizer_spec(config, model),
        "sae_release": config.sae_release,
        "hook": config.hook,
        "availability": availability,
        "layers": [_layer_entry(config, p, saes[p.layer], model, sae_files.get(p.layer, [])) for p in plans],
    }
    return record, {str(p.layer): saes[p.layer].cfg.to_dict() for p in plans}


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
        entry["weights_sha256"] = sha256_file(Path(config.sae_release) / plan.sae_id / SAE_WEIGHTS)
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
