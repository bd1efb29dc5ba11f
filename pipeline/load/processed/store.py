"""Writing the processed model and SAE tensors (model stage) and reading them back (later stages).

`data/<preset>/processed/` (pipeline.core.artifacts.processed_dir) holds:
- `config.json`: the model's full HookedTransformerConfig after weight processing (every field,
  dtype as its name), with the TransformerLens version that wrote it;
- `model.safetensors`: the HookedTransformer's state dict after weight processing (fold_ln,
  center_writing_weights, ... as the SAE release asks), float32;
- `saes.json`: per layer, the SAE's encoder settings and where its tensors are: `source` (the
  SAE-Lens weights file itself, when the model stage checked that SAE-Lens loads exactly its
  tensors: the toy's folders, the res-jb files in the Hugging Face cache), `npz` (Gemma Scope's
  params.npz in the cache, read as SAE-Lens's gemma_2 loader reads it, checked the same way),
  `processed` (`sae_<layer>.safetensors` here, when loading changed them) or `sae_lens` (an
  architecture or input normalisation ProcessedSAE does not compute, e.g. OpenAI's TopK SAEs: load
  it with SAE-Lens, at the recorded commit).

Readers: `hooked_model` (a real HookedTransformer, for stages that need hooks; no
Hugging Face conversion), `fast_model` and `fast_sae` (ProcessedTransformer
and ProcessedSAE where they apply, which import neither TransformerLens nor SAE-Lens; else the
real classes from the same files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.core import artifacts
from pipeline.core.errors import UserError
from pipeline.core.io import atomic_dir, read_json
from pipeline.core.runinfo import timed
from pipeline.load import hub
from pipeline.load.processed import model as pmodel
from pipeline.load.processed import sae as psae

if TYPE_CHECKING:
    from pipeline.core.plan.layers import LayerPlan
    from pipeline.core.plan.record import ModelRecord

CONFIG, WEIGHTS, SAES = "config.json", "model.safetensors", "saes.json"
SAE_WEIGHTS = "sae_weights.safetensors"  # SAE-Lens's file name in a save_model folder or a hub repo
NPZ = "params.npz"  # Gemma Scope's file, which SAE-Lens's gemma_2 loader converts


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _config_json(cfg: Any) -> dict[str, Any]:
    out = {}
    for key, value in dict(cfg.to_dict()).items():
        if isinstance(value, torch.dtype):
            value = _dtype_name(value)
        elif hasattr(value, "item") and not isinstance(value, torch.Tensor):
            value = value.item()  # numpy scalars (attn_scale is np.sqrt(d_head))
        out[key] = value
    out.pop("device", None)
    return out


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def gemma_2_npz_state(path: Path) -> dict[str, torch.Tensor]:
    """A Gemma Scope params.npz as SAE-Lens's gemma_2 loader turns it into a state dict (sae_lens/loading/
    pretrained_sae_loaders.py, `gemma_2_sae_huggingface_loader`: `w_*` renamed `W_*`, float32). The model stage
    keeps an SAE's tensors as `npz` only where this equals what SAE-Lens loaded."""
    import numpy as np

    with np.load(path) as data:
        return {("W_" + key[2:] if key.startswith("w_") else key): torch.tensor(data[key]).to(torch.float32)
                for key in data}


def _read_source(source: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return gemma_2_npz_state(source) if source.name == NPZ else load_file(str(source))


class ProcessedWriter:
    """The model stage's processed files, written one SAE at a time (`add_sae`) and then the model (`add_model`),
    into a directory that appears whole or not at all. One SAE at a time: Gemma Scope's 26 SAEs are 7.9 GB."""

    def __init__(self, preset: str):
        self._dir = atomic_dir(artifacts.processed_dir(preset))
        self.index: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> ProcessedWriter:
        self.tmp = self._dir.__enter__()
        return self

    def __exit__(self, *exc) -> bool | None:
        if exc[0] is None:
            (self.tmp / SAES).write_text(json.dumps(self.index, indent=2, sort_keys=True) + "\n")
        return self._dir.__exit__(*exc)

    def add_model(self, model) -> None:
        from safetensors.torch import save_file

        from pipeline.core.runinfo import library_versions

        cfg = _config_json(model.cfg) | {"transformer_lens_version": library_versions()["transformer-lens"]}
        (self.tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(self.tmp / WEIGHTS))

    def add_sae(self, layer: int, sae, source: Path | None) -> None:
        """Layer `layer`'s SAE-Lens SAE; `source` the file SAE-Lens read its tensors from (SAE-Lens's safetensors
        or Gemma Scope's params.npz), kept as the source when it holds exactly the loaded tensors."""
        from safetensors.torch import save_file

        sae_cfg = sae.cfg.to_dict()
        entry = {key: sae_cfg.get(key) for key in ("architecture", "apply_b_dec_to_input", "normalize_activations",
                                                     "reshape_activations")}
        entry["architecture"] = sae.cfg.architecture()
        # what the stages read of an SAE's metadata: its hook, and the context length it was trained on
        entry["hook_name"] = sae.cfg.metadata.hook_name
        entry["context_size"] = getattr(sae.cfg.metadata, "context_size", None)
        if psae.unsupported_reason(entry) is not None:
            entry["tensors"] = "sae_lens"
        else:
            state = {k: v.detach().cpu() for k, v in sae.state_dict().items()}
            if source is not None and _same_tensors(state, _read_source(source)):
                entry["tensors"] = "npz" if source.name == NPZ else "source"
            else:
                save_file({k: v.contiguous() for k, v in state.items()}, str(self.tmp / f"sae_{layer}.safetensors"))
                entry["tensors"] = "processed"
        self.index[str(layer)] = entry


def write_processed(preset: str, model, saes: dict[int, Any], sources: dict[int, Path | None]) -> None:
    """The model stage's processed files for `model` and `saes` (layer -> SAE-Lens SAE), each SAE's
    weights file in `sources` (None when SAE-Lens converts them from a format not read here)."""
    with ProcessedWriter(preset) as writer:
        for layer, sae in saes.items():
            writer.add_sae(layer, sae, sources.get(layer))
        writer.add_model(model)


# ---- reading ---------------------------------------------------------------------------------

def _need_dir(record: ModelRecord) -> Path:
    directory = artifacts.processed_dir(record.preset)
    for name in (CONFIG, WEIGHTS, SAES):
        if not (directory / name).exists():
            raise UserError(f"{directory / name} not found; rerun the model stage (`dvc repro model`)")
    return directory


def _load_tensors(path: Path, device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    with timed("import"):
        from safetensors.torch import load_file
    state = load_file(str(path), device=str(device))
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _model_parts(record: ModelRecord, device: torch.device, dtype: torch.dtype):
    directory = _need_dir(record)
    cfg = read_json(directory / CONFIG)
    cfg.pop("transformer_lens_version", None)
    cfg.update(dtype=dtype, device=str(device))
    return cfg, _load_tensors(directory / WEIGHTS, device, dtype)


def hooked_model(record: ModelRecord, device: torch.device, dtype: torch.dtype):
    """A real HookedTransformer from the processed files: the same weights as `from_pretrained`
    with the release's kwargs, without converting Hugging Face weights. It gets no tokenizer: the stages tokenize
    with pipeline.load.tokenizer (at the recorded commit), and TransformerLens would otherwise fetch one at `main`
    and build attention masks from pad tokens where it pads on the left (Gemma's)."""
    with timed("import"):
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    with timed("load"):
        cfg, state = _model_parts(record, device, dtype)
        cfg["tokenizer_name"] = None
        model = HookedTransformer(HookedTransformerConfig(**cfg), move_to_device=True)
        model.load_state_dict(state, strict=True)
        model.eval()
        model.requires_grad_(False)
        return model


def fast_model(record: ModelRecord, device: torch.device, dtype: torch.dtype):
    """ProcessedTransformer when it mirrors this model under the installed TransformerLens, else a
    HookedTransformer; either has the same weights and gives the same bits."""
    with timed("load"):
        cfg, state = _model_parts(record, device, dtype)
        if (pmodel.unsupported_reason(cfg) is None
                and pmodel.transformer_lens_version() == pmodel.VERIFIED_TRANSFORMER_LENS):
            return pmodel.ProcessedTransformer(cfg, state)
    return hooked_model(record, device, dtype)


def _source_file(record: ModelRecord, plan: LayerPlan, name: str) -> Path:
    """The SAE's weights file: its folder for a local release, else the cached file at the recorded commit, checked
    against its recorded blob."""
    from pipeline.load.revisions import check_recorded

    entry = record.layer(plan.layer)
    if record.model.source == "local" or not entry.hub_files:
        return Path(record.sae_release) / plan.sae_id / name
    hub.offline_for(record.model.source)
    for f in entry.hub_files:
        if f["file"].endswith("/" + name) or f["file"] == name:
            check_recorded([f])
            path = hub.HubFile(f["repo_id"], f["file"], f.get("revision")).cached_path()
            if path is not None:
                return path
    raise UserError(f"the Hugging Face cache lacks the weights of SAE {plan.sae_id}; rerun the model stage")


def fast_sae(record: ModelRecord, plan: LayerPlan, device: torch.device, dtype: str):
    """ProcessedSAE from the SAE's tensors, or None when SAE-Lens must load it (`tensors: sae_lens`)."""
    directory = _need_dir(record)
    entry = read_json(directory / SAES).get(str(plan.layer))
    if entry is None:
        raise UserError(f"{directory / SAES} has no layer {plan.layer}; rerun the model stage")
    if entry["tensors"] == "sae_lens":
        return None
    with timed("load"):
        if entry["tensors"] == "npz":
            state = gemma_2_npz_state(_source_file(record, plan, NPZ))
        else:
            path = directory / f"sae_{plan.layer}.safetensors" if entry["tensors"] == "processed" else \
                _source_file(record, plan, SAE_WEIGHTS)
            state = _load_tensors(path, device, None)
        target = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        state = {k: v.to(device=device, dtype=target) if v.is_floating_point() else v for k, v in state.items()}
        return psae.ProcessedSAE(entry, state)
