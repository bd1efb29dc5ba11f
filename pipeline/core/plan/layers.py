"""Which SAE sits at which hook: the study's plan, resolved without loading any weights.

For a hub release the answer comes from SAE-Lens's pretrained directory (`pretrained_saes.yaml`,
the file `sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory` reads). We
read that packaged file directly, because importing `sae_lens` costs ~6 s (it imports
TransformerLens and transformers) and `plan` and the offline check must answer in well under a
second; `tests/plan/test_layer_plan.py` checks the two readings agree for every release.

TransformerLens's `blocks.L.hook_resid_post` is the same tensor as `blocks.(L+1).hook_resid_pre`,
so a release that only has resid_pre SAEs (gpt2-small-res-jb) still covers resid_post layers
0..10 through the next block's resid_pre SAE, and layer 11 through `blocks.11.hook_resid_post`.
For a local directory of SAEs (one SAE-Lens `save_model` folder per hook) the hook is read from
each folder's cfg.json.

An SAE id is not always a hook name: Gemma Scope's are `layer_N/width_16k/canonical`. `sae_hook` says which
hook an id reads without loading it (`gemma_2_hook`: SAE-Lens's `get_gemma_2_config_from_hf` rule, from the
id's folder name). Where a release has several SAEs at one hook (Gemma Scope: widths 16k and 65k, and wider
ones at three layers), `sae_id_template` (e.g. `layer_{layer}/width_16k/canonical`) names the one per layer.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import UserError
from pipeline.core.params.config import Config
from pipeline.core.params.limits import check_layers_in_range
from pipeline.core.plan.hooks import hook_name, resume_index

NEURONPEDIA_SITE = "https://www.neuronpedia.org"


@dataclass(frozen=True)
class LayerPlan:
    """Where the intervention for one layer happens and which SAE reads it."""

    layer: int
    hook: str  # the model hook we intervene at, e.g. blocks.3.hook_resid_post
    resume_at: int  # first block to run after the hook (start_at_layer)
    sae_release: str
    sae_id: str  # id in the release, or folder name for a local directory
    neuronpedia: str | None  # e.g. gpt2-small/4-res-jb
    sae_hook: str | None = None  # the hook the SAE reads (same tensor as `hook`); None when not known before loading

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def neuronpedia_url(self, feature: int) -> str | None:
        if self.neuronpedia is None:
            return None
        return f"{NEURONPEDIA_SITE}/{self.neuronpedia}/{feature}"


@dataclass(frozen=True)
class ReleaseInfo:
    """One release of SAE-Lens's pretrained directory (the fields this project uses)."""

    release: str
    repo_id: str
    model: str
    saes_map: dict[str, str]  # sae id -> path in the repo
    neuronpedia_id: dict[str, str | None]  # sae id -> "gpt2-small/7-res-jb"
    config_overrides: dict[str, Any]
    conversion_func: str | None = None  # None: SAE-Lens's own file layout (cfg.json + weights)


def _sae_lens_yaml() -> Path:
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("sae-lens is not installed; run: pip install -r requirements.txt")
    return Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml"


@functools.cache
def pretrained_directory() -> dict[str, ReleaseInfo]:
    """SAE-Lens's pretrained SAE directory, as `get_pretrained_saes_directory` builds it."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(_sae_lens_yaml(), encoding="utf-8") as f:
        data = yaml.load(f, Loader=loader)
    directory = {}
    for release, value in data.items():
        saes = value.get("saes", [])
        directory[release] = ReleaseInfo(
            release=release,
            repo_id=value["repo_id"],
            model=value["model"],
            saes_map={s["id"]: str(s["path"]) for s in saes},
            neuronpedia_id={s["id"]: s.get("neuronpedia") for s in saes},
            config_overrides=dict(value.get("config_overrides") or {}),
            conversion_func=value.get("conversion_func"),
        )
    return directory


_HOOK_ID_RE = re.compile(r"^blocks\.\d+\.(hook_[a-z_]+|attn\.hook_[a-z_]+|mlp\.hook_[a-z_]+)$|^hook_embed$")
_GEMMA_LAYER_RE = re.compile(r"layer_(\d+)")


def gemma_2_hook(repo_id: str, folder: str) -> str | None:
    """The hook of a Gemma Scope SAE from its repo and folder, as SAE-Lens's `get_gemma_2_config_from_hf` sets
    `hook_name` (it reads no file either; tests/plan/test_sae_ids.py checks every gemma_2 id against it)."""
    match = _GEMMA_LAYER_RE.search(folder)
    if match is None:
        return "hook_embed" if "res" in repo_id and "embedding" in folder else None
    layer = int(match.group(1))
    if "res" in repo_id:
        return "hook_embed" if "embedding" in folder else f"blocks.{layer}.hook_resid_post"
    if "mlp" in repo_id:
        return f"blocks.{layer}.hook_mlp_out"
    if "att" in repo_id:
        return f"blocks.{layer}.attn.hook_z"
    return None


def sae_hook(info: ReleaseInfo, sae_id: str) -> str | None:
    """The hook an SAE of the release reads, without loading it: the id itself where it is a hook name (res-jb,
    OpenAI's v5), the gemma_2 loader's rule for Gemma Scope, else None (known after loading)."""
    if _HOOK_ID_RE.match(sae_id):
        return sae_id
    if info.conversion_func == "gemma_2":
        return gemma_2_hook(info.repo_id, info.saes_map[sae_id])
    return None


def equivalent_hooks(hook: str, layer: int, n_layers: int | None) -> list[str]:
    """Hook names carrying the same tensor as `hook` at `layer`, the exact name first."""
    names = [hook_name(hook, layer)]
    if hook == "resid_post" and (n_layers is None or layer + 1 < n_layers):
        names.append(hook_name("resid_pre", layer + 1))
    if hook == "resid_pre" and layer >= 1:
        names.append(hook_name("resid_post", layer - 1))
    return names


def _local_saes(directory: str | Path) -> dict[str, tuple[str, str | None]]:
    """hook name -> (folder name, Neuronpedia id from the cfg's metadata, if any)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(
            f"SAE directory {directory} does not exist; for the toy preset run `dvc repro model` "
            "(or `python -m pipeline model`) first"
        )
    found: dict[str, tuple[str, str | None]] = {}
    for cfg_path in sorted(directory.glob("*/cfg.json")):
        try:
            meta = json.loads(cfg_path.read_text(encoding="utf-8"))["metadata"]
            name = meta["hook_name"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{cfg_path} is not an SAE-Lens cfg.json with metadata.hook_name") from None
        found[name] = (cfg_path.parent.name, meta.get("neuronpedia_id"))
    if not found:
        raise UserError(f"{directory} holds no SAE folders (no */cfg.json)")
    return found


_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def _toy_unbuilt(config: Config) -> bool:
    """A preset the `model` stage builds (the toy), before it ran: its layout is known, its files not yet there."""
    preset = config.preset_info
    return (preset.built_layers is not None and config.sae_release == preset.sae_release
            and not Path(config.sae_release).is_dir())


@dataclass(frozen=True)
class ReleaseSAEs:
    """The SAEs a study can choose from: hook -> SAE ids reading it, and each id's Neuronpedia source."""

    ids_at: dict[str, list[str]]  # hook name -> SAE ids (folder names for a local directory)
    hook_of: dict[str, str | None]  # SAE id -> its hook (None: known after loading)
    neuronpedia: dict[str, str | None]  # SAE id -> Neuronpedia source
    where: str  # "release X", for messages

    @classmethod
    def of(cls, hook_of: dict[str, str | None], neuronpedia: dict[str, str | None], where: str) -> ReleaseSAEs:
        ids_at: dict[str, list[str]] = {}
        for sae_id, hook in hook_of.items():
            if hook is not None:
                ids_at.setdefault(hook, []).append(sae_id)
        return cls(ids_at, hook_of, neuronpedia, where)


def available_saes(config: Config) -> ReleaseSAEs:
    """The release's (or SAE directory's) SAEs, with the hook each reads, resolved without weights."""
    if _toy_unbuilt(config):
        preset = config.preset_info
        ids = [preset.built_sae_id(layer) for layer in range(preset.built_layers)]
        return ReleaseSAEs.of({i: i for i in ids}, {}, f"{config.preset} SAEs (built by the model stage into "
                                                       f"{config.sae_release})")
    if config.saes_are_local:
        # A local SAE saved by SAE-Lens keeps its Neuronpedia id in cfg.json's metadata.
        local = _local_saes(config.sae_release)
        return ReleaseSAEs.of({folder: hook for hook, (folder, _) in local.items()},
                              {folder: np_id for folder, np_id in local.values()}, f"SAE directory {config.sae_release}")
    directory = pretrained_directory()
    if config.sae_release not in directory:
        stem = config.model.split("/")[-1]
        close = [r for r in directory if r.startswith(stem)][:8]
        raise UserError(
            f"params.yaml: sae_release '{config.sae_release}' is not in SAE-Lens's pretrained "
            f"directory; releases for {stem} include: {', '.join(close) or 'none'}"
        )
    info = directory[config.sae_release]
    return ReleaseSAEs.of({sid: sae_hook(info, sid) for sid in info.saes_map}, info.neuronpedia_id,
                          f"release {config.sae_release}")


def model_n_layers(config: Config) -> int | None:
    """The model's depth without loading weights: a local model's config.json; for a hub model,
    the deepest block the release reads when its SAEs cover every block up to it (res-jb, the
    v5 releases and Gemma Scope do); None when that cannot be told (checked by the model stage after loading)."""
    if config.model_is_local and not _toy_unbuilt(config):
        cfg_path = Path(config.model) / "config.json"
        if not cfg_path.exists():
            raise UserError(
                f"model directory {config.model} has no config.json; for the toy preset run "
                "`dvc repro model` (or `python -m pipeline model`) first"
            )
        return int(json.loads(cfg_path.read_text(encoding="utf-8"))["n_layers"])
    saes = available_saes(config)
    blocks = {int(m.group(1)) for m in map(_BLOCK_RE.match, saes.ids_at) if m}
    if not blocks or blocks != set(range(max(blocks) + 1)):
        return None
    return max(blocks) + 1


def _listed(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def sae_for_layer(config: Config, saes: ReleaseSAEs, layer: int, n_layers: int | None) -> str | None:
    """The SAE id that reads `config.hook` at `layer` (or the same tensor), None if the release has none there.

    With `sae_id_template` the id is the template's, checked against the release and, where its hook is known
    without loading, against the layer's hook; without it the hook must have exactly one SAE."""
    candidates = equivalent_hooks(config.hook, layer, n_layers)
    template = config.sae_id_template
    if template is not None:
        sae_id = template.format(layer=layer)
        if sae_id not in saes.hook_of:
            close = difflib.get_close_matches(sae_id, list(saes.hook_of), n=3)
            raise UserError(f"sae_id_template '{template}' gives '{sae_id}' for layer {layer}, which {saes.where} does "
                            f"not have; close ids: {', '.join(close) or _listed(sorted(saes.hook_of))}")
        hook = saes.hook_of[sae_id]
        if hook is not None and hook not in candidates:
            raise UserError(f"SAE {sae_id} ({saes.where}) reads {hook}, not {' or '.join(candidates)} (layer {layer}, "
                            f"hook {config.hook}); fix sae_id_template '{template}'")
        return sae_id
    found = [(h, sae_id) for h in candidates for sae_id in saes.ids_at.get(h, [])]
    if len(found) > 1 and len({h for h, _ in found}) == 1:
        ids = [sae_id for _, sae_id in found]
        raise UserError(f"{saes.where} has {len(ids)} SAEs at {found[0][0]} (layer {layer}): {_listed(ids)}; choose one "
                        f"per layer with sae_id_template, e.g. '{_template_hint(ids[0], layer)}'")
    return found[0][1] if found else None


def _template_hint(sae_id: str, layer: int) -> str:
    return re.sub(rf"(?<![0-9]){layer}(?![0-9])", "{layer}", sae_id, count=1)


def plan_layers(config: Config, n_layers: int | None = None, layers: tuple[int, ...] | None = None
                ) -> list[LayerPlan]:
    """Resolve every layer of `layers` (default: `config.layers`) to its hook, SAE id and Neuronpedia source."""
    layers = config.layers if layers is None else layers
    saes = available_saes(config)
    if n_layers is None:
        n_layers = model_n_layers(config)
    if n_layers is not None:
        check_layers_in_range(layers, n_layers)
    plans = []
    for layer in layers:
        sae_id = sae_for_layer(config, saes, layer, n_layers)
        if sae_id is None:
            candidates = equivalent_hooks(config.hook, layer, n_layers)
            raise UserError(
                f"{saes.where} has no SAE at {' or '.join(candidates)} (layer {layer}); "
                f"it has: {_listed(sorted(saes.hook_of))}"
            )
        plans.append(
            LayerPlan(
                layer=layer,
                hook=hook_name(config.hook, layer),
                resume_at=resume_index(config.hook, layer),
                sae_release=config.sae_release,
                sae_id=sae_id,
                neuronpedia=saes.neuronpedia.get(sae_id),
                sae_hook=saes.hook_of.get(sae_id),
            )
        )
    return plans


def model_from_pretrained_kwargs(config: Config) -> dict[str, Any]:
    """The release's recorded kwargs for HookedTransformer.from_pretrained (empty if local)."""
    if config.saes_are_local:
        return {}
    overrides = pretrained_directory()[config.sae_release].config_overrides
    return dict(overrides.get("model_from_pretrained_kwargs") or {})
