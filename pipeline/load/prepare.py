"""The `model` stage's work: get the model and SAEs ready, check they fit together, and say exactly what was
resolved.

For a hub model and SAE-Lens release: download into the Hugging Face cache, or fail in about a second when
there is no network and no cache (hub.py); load everything once to check it; write the processed model and
the index of SAE tensors (processed/, from which later stages load in a fraction of a second); return the
record data/model.json holds (repo ids, commits and blob hashes of every file) and each SAE's config as
SAE-Lens resolved it. A local model and SAE directory (the toy, or a user's own) go through the same path.

Each hub repo is read at one commit: the one `hub_revisions` pins, else the newest; the record names it for every
file, and later stages load exactly that commit (pipeline.load.revisions). SAEs are loaded one at a time.

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
    ReleaseSAEs,
    available_saes,
    model_n_layers,
    plan_layers,
    pretrained_directory,
    sae_for_layer,
)
from pipeline.load import hub
from pipeline.load.library import (
    MODEL_WEIGHTS,
    TOKENIZER_SPEC,
    model_from_source,
    official_repo,
    sae_from_source,
)
from pipeline.load.processed.store import NPZ, SAE_WEIGHTS, ProcessedWriter
from pipeline.load.revisions import check_pins, recorded_revisions
from pipeline.load.tokenizer import HFTokenizer


def prepare(config: Config, study_layers: tuple[int, ...], check_loaded) -> tuple[dict[str, Any], dict[str, Any]]:
    """(data/model.json's record, layer -> the SAE's config as SAE-Lens resolved it). `config` is the model
    stage's params; `study_layers` the `layers` param, only checked against the model; `check_loaded(n_ctx,
    d_sae by layer, plans)` runs the params checks that need the loaded model (pipeline.preflight)."""
    # Checks run on the CPU: the record must not depend on the device.
    device = torch.device("cpu")
    # Every layer of the model, not only `layers`: changing `layers` later needs no download and no rebuild.
    n_layers = model_n_layers(config)
    if n_layers is not None:
        saes_available = available_saes(config)
        covered = tuple(layer for layer in range(n_layers) if _has_sae(config, saes_available, layer, n_layers))
    else:  # a release whose SAEs skip blocks: the study's own layers (checked after loading)
        covered = tuple(study_layers)
    plans = plan_layers(config, layers=covered)
    pins = check_pins(config.hub_revisions, _hub_repos(config))
    availability = "local"
    sae_files: dict[int, list[hub.HubFile]] = {}
    model_repo = None if config.model_is_local else official_repo(config.model)
    if not config.saes_are_local:
        repo = pretrained_directory()[config.sae_release].repo_id
        sae_files = _hub_sae_files(config, plans, pins.get(repo))
        every = [f for files in sae_files.values() for f in files]
        probe = every or [hub.HubFile(repo, ".gitattributes", pins.get(repo))]
        availability = hub.ensure_available(probe, f"SAE release {config.sae_release}")
    if model_repo is not None:
        # Probed too when the SAEs' repo answered: a gated model repo (Gemma-2) says so before anything loads.
        availability = hub.ensure_available(hub.model_files(model_repo, pins.get(model_repo)), f"model {config.model}")

    summaries: dict[int, dict[str, Any]] = {}
    with ProcessedWriter(config.preset) as processed:
        # One SAE at a time: each is loaded, checked, summarised and its tensors kept or written, then dropped.
        for p in plans:
            repo_pin = None if config.saes_are_local else pins.get(pretrained_directory()[config.sae_release].repo_id)
            sae = sae_from_source(config.sae_release, p, device, "float32", revision=repo_pin)
            summaries[p.layer] = _sae_summary(config, p, sae, sae_files.get(p.layer, []))
            processed.add_sae(p.layer, sae, _sae_weights_file(config, p, sae_files))
            del sae
        model_kwargs = None if config.saes_are_local else _agreeing_model_kwargs(summaries)
        model_pin = None if model_repo is None else pins.get(model_repo)
        model = model_from_source(config.model, device, "float32", model_kwargs, revision=model_pin)
        check_layers_in_range([*study_layers, *(p.layer for p in plans)], model.cfg.n_layers)
        for p in plans:
            if summaries[p.layer]["d_in"] != model.cfg.d_model:
                raise UserError(f"SAE {p.sae_id} reads d_in={summaries[p.layer]['d_in']} but the model has "
                                f"d_model={model.cfg.d_model}")
        check_loaded(model.cfg.n_ctx, {p.layer: summaries[p.layer]["entry"]["d_sae"] for p in plans}, plans)
        processed.add_model(model)
    record = {
        "preset": config.preset,
        "model": _model_entry(config, model, model_kwargs, model_pin),
        "tokenizer": _tokenizer_spec(config, model_pin),
        "sae_release": config.sae_release,
        "hook": config.hook,
        "availability": availability,
        "layers": [summaries[p.layer]["entry"] for p in plans],
    }
    _check_one_commit_per_repo(record)
    return record, {str(p.layer): summaries[p.layer]["cfg"] for p in plans}


def _hub_repos(config: Config) -> list[str]:
    """The hub repos the model stage reads (what `hub_revisions` may pin)."""
    repos = [] if config.model_is_local else [official_repo(config.model)]
    if not config.saes_are_local and config.sae_release in pretrained_directory():
        repos.append(pretrained_directory()[config.sae_release].repo_id)
    return repos


def _has_sae(config: Config, saes: ReleaseSAEs, layer: int, n_layers: int) -> bool:
    if config.sae_id_template is not None and config.sae_id_template.format(layer=layer) not in saes.hook_of:
        return False  # the template names no SAE at this layer: not one of the release's layers
    return sae_for_layer(config, saes, layer, n_layers) is not None


def _hub_sae_files(config: Config, plans: list[LayerPlan], revision: str | None) -> dict[int, list[hub.HubFile]]:
    """The files SAE-Lens's loader reads per layer (none known for a loader hub.SAE_FILES_BY_LOADER does not list)."""
    info = pretrained_directory()[config.sae_release]
    names = hub.SAE_FILES_BY_LOADER.get(info.conversion_func, ())
    return {p.layer: [hub.HubFile(info.repo_id, f"{info.saes_map[p.sae_id]}/{name}", revision) for name in names]
            for p in plans}


def _sae_weights_file(config: Config, plan: LayerPlan, sae_files: dict[int, list[hub.HubFile]]) -> Path | None:
    """The weights file the layer's SAE was read from (SAE-Lens's safetensors or Gemma Scope's params.npz; None for
    a converted release whose files are not known here)."""
    if config.saes_are_local:
        return Path(config.sae_release) / plan.sae_id / SAE_WEIGHTS
    for f in sae_files.get(plan.layer, []):
        if f.filename.endswith((SAE_WEIGHTS, NPZ)):
            return f.cached_path()
    return None


def _sae_summary(config: Config, plan: LayerPlan, sae, files: list[hub.HubFile]) -> dict[str, Any]:
    """What the record and the checks need of one loaded SAE, so the SAE itself can be dropped."""
    entry = plan.to_dict() | {
        "d_sae": int(sae.cfg.d_sae),
        "architecture": sae.cfg.architecture(),
        "sae_hook_name": sae.cfg.metadata.hook_name,
    }
    if config.saes_are_local:
        entry["weights_sha256"] = sha256_file(Path(config.sae_release) / plan.sae_id / SAE_WEIGHTS)
    else:
        entry["hub"] = [hub.snapshot_record(f) for f in files]
    return {"entry": entry, "d_in": int(sae.cfg.d_in), "cfg": sae.cfg.to_dict(),
            "model_kwargs": dict(sae.cfg.metadata.model_from_pretrained_kwargs or {})}


def _agreeing_model_kwargs(summaries: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The model_from_pretrained_kwargs the SAEs record; they must agree."""
    found = [s["model_kwargs"] for s in summaries.values()]
    if any(f != found[0] for f in found):
        raise UserError(f"the SAEs record different model_from_pretrained_kwargs: {found}")
    return found[0] if found else {}


def _check_one_commit_per_repo(record: dict[str, Any]) -> None:
    """Every file of a repo came from one commit (the cache's `main` cannot move under a running stage, but a
    half-updated cache could serve two)."""
    files = [*record["model"].get("hub", []), *(f for e in record["layers"] for f in e.get("hub", []))]
    recorded_revisions([f for f in files if f.get("revision") != "unknown"])


def _model_entry(config: Config, model, kwargs: dict[str, Any] | None, revision: str | None) -> dict[str, Any]:
    if config.model_is_local:
        entry: dict[str, Any] = {
            "name": config.model,
            "source": "local",
            "weights_sha256": sha256_file(Path(config.model) / MODEL_WEIGHTS),
        }
    else:
        repo = official_repo(config.model)
        files = [*hub.model_files(repo, revision), *hub.tokenizer_files(repo, revision)]
        entry = {
            "name": config.model,
            "source": "hub",
            "hub": [hub.snapshot_record(f) for f in files],
            "from_pretrained_kwargs": kwargs or {},
        }
    cfg = model.cfg
    return entry | {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_ctx": cfg.n_ctx, "d_vocab": cfg.d_vocab}


def _tokenizer_spec(config: Config, revision: str | None) -> dict[str, Any]:
    """The tokenizer later stages rebuild: the toy's spec file, or the model repo's Hugging Face tokenizer at the
    commit the model stage resolved."""
    if config.model_is_local:
        return read_json(Path(config.model) / TOKENIZER_SPEC)
    repo = official_repo(config.model)
    commit = hub.snapshot_record(hub.HubFile(repo, "config.json", revision))["revision"]
    tokenizer = HFTokenizer(repo, revision=None if commit == "unknown" else commit)
    return tokenizer.spec()
