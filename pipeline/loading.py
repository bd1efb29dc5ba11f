"""Load the model and its SAEs: from the Hugging Face hub (gpt2-small) or from local directories.

Hub: `HookedTransformer.from_pretrained(name, **model_from_pretrained_kwargs)` with the kwargs the
SAE release records (for gpt2-small-res-jb: center_writing_weights=True), so the residual stream
matches what the SAEs were trained on; `SAE.from_pretrained(release, sae_id)` for each layer.

Local (the toy preset, or a user's own model): a directory holding `config.json` (the keyword
arguments of `HookedTransformerConfig`), `model.safetensors` (the HookedTransformer state dict,
loaded as is) and `tokenizer_spec.json`; SAEs as SAE-Lens `save_model` folders read with
`SAE.load_from_disk`. The toy preset goes through exactly this path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline import artifacts, hub
from pipeline.config import DEVICE_RE, is_local_path
from pipeline.errors import UserError
from pipeline.hooks import LayerPlan, same_tensor
from pipeline.quiet import quiet_library_warnings
from pipeline.runinfo import timed

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    from pipeline.artifacts import ModelRecord

MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
TOKENIZER_SPEC = "tokenizer_spec.json"


def resolve_device(name: str, where: str = "params.yaml: device") -> torch.device:
    """`auto` -> CUDA when present, else Apple MPS, else CPU; an explicit device must exist.

    `where` names the setting in error messages (a params key, or a command-line option)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not DEVICE_RE.match(name):
        raise UserError(f"{where} is '{name}'; allowed: auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{where} is '{name}' but CUDA is not available here; use auto or cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"{where} is '{name}' but only {torch.cuda.device_count()} CUDA device(s) exist")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{where} is 'mps' but Apple MPS is not available here; use auto or cpu")
    return torch.device(name)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---------------------------------------------------------------------------------------------
# Models


def save_local_model(model: HookedTransformer, directory: Path, config_kwargs: dict[str, Any],
                     tokenizer_spec: dict[str, Any]) -> None:
    """Write a HookedTransformer in the local format `load_model` reads back."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / MODEL_CONFIG).write_text(json.dumps(config_kwargs, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / MODEL_WEIGHTS))
    (directory / TOKENIZER_SPEC).write_text(json.dumps(tokenizer_spec, indent=2) + "\n")


def load_local_model(directory: str | Path, device: torch.device, dtype: torch.dtype) -> HookedTransformer:
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    directory = Path(directory)
    for name in (MODEL_CONFIG, MODEL_WEIGHTS):
        if not (directory / name).exists():
            raise UserError(
                f"model directory {directory} has no {name}; for the toy preset run "
                "`dvc repro model` (or `python -m pipeline model`) first"
            )
    kwargs = json.loads((directory / MODEL_CONFIG).read_text(encoding="utf-8"))
    kwargs.update(device=str(device), dtype=dtype)
    try:
        cfg = HookedTransformerConfig(**kwargs)
    except TypeError as exc:
        raise UserError(f"{directory / MODEL_CONFIG} is not a HookedTransformerConfig: {exc}") from None
    model = HookedTransformer(cfg, move_to_device=True)
    state = load_file(str(directory / MODEL_WEIGHTS), device=str(device))
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                          strict=True)
    return model


def load_model(name: str, device: torch.device, dtype: str,
               from_pretrained_kwargs: dict[str, Any] | None = None) -> HookedTransformer:
    """The model the study runs (hub name or local directory), in eval mode with gradients off."""
    with timed("import"):
        import transformer_lens  # noqa: F401 - a library import, timed apart from the loading
        import transformers  # noqa: F401
    with timed("load"):
        return _load_model(name, device, dtype, from_pretrained_kwargs)


def _load_model(name: str, device: torch.device, dtype: str,
                from_pretrained_kwargs: dict[str, Any] | None) -> HookedTransformer:
    quiet_library_warnings()
    if is_local_path(name):
        model = load_local_model(name, device, torch_dtype(dtype))
    else:
        from transformer_lens import HookedTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a "Loading weights" bar per stage says nothing
        try:
            model = HookedTransformer.from_pretrained(
                name, device=str(device), dtype=torch_dtype(dtype), **(from_pretrained_kwargs or {})
            )
        except (OSError, ValueError) as exc:
            raise UserError(
                f"could not load model '{name}' ({type(exc).__name__}: {str(exc)[:160]}); "
                "run `dvc repro model` with network access, or use -S preset=toy offline"
            ) from None
    _check_resumable(model, name)
    model.eval()
    model.requires_grad_(False)
    return model


def _check_resumable(model, name: str) -> None:
    """What the engine relies on: it resumes mid-model from the residual (no shortformer positions), and
    leaves positions before an intervention's first change clean, true only when no position attends
    to a later one (causal attention)."""
    if model.cfg.positional_embedding_type == "shortformer":
        raise UserError(f"model '{name}' uses shortformer positions; resuming mid-model is not supported")
    check_causal(model, name)


def check_causal(model, name: str) -> None:
    """One line refusing a model whose attention is not causal."""
    if model.cfg.attention_dir != "causal":
        raise UserError(f"model '{name}' has attention_dir '{model.cfg.attention_dir}'; only causal attention "
                        "is supported (the engine reuses the clean logits before the first intervened position)")


# ---------------------------------------------------------------------------------------------
# SAEs


def load_sae(release: str, plan: LayerPlan, device: torch.device, dtype: str) -> SAE:
    """One SAE: SAE.from_pretrained(release, id) from the hub, or SAE.load_from_disk(release/id)."""
    with timed("import"):
        import sae_lens  # noqa: F401 - a library import, timed apart from the loading
    with timed("load"):
        return _load_sae(release, plan, device, dtype)


def _load_sae(release: str, plan: LayerPlan, device: torch.device, dtype: str) -> SAE:
    quiet_library_warnings()
    from sae_lens import SAE

    if is_local_path(release):
        path = Path(release) / plan.sae_id
        if not (path / "cfg.json").exists():
            raise UserError(f"SAE folder {path} has no cfg.json; rerun the model stage")
        sae = SAE.load_from_disk(path, device=str(device), dtype=dtype)
    else:
        try:
            sae = SAE.from_pretrained(release, plan.sae_id, device=str(device), dtype=dtype)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"could not load SAE {release}/{plan.sae_id} ({type(exc).__name__}: "
                f"{str(exc)[:160]}); run `dvc repro model` with network access first"
            ) from None
    check_sae(sae, plan)
    sae.eval()
    sae.requires_grad_(False)
    return sae


def check_sae(sae: SAE, plan: LayerPlan) -> None:
    """The engine applies `x + (alpha-1) a_i W_dec[i]`, which is SAE-Lens's splice only for SAEs
    whose decoder is linear in the activations; refuse anything else with a clear reason."""
    meta_hook = sae.cfg.metadata.hook_name
    if meta_hook is not None and not same_tensor(meta_hook, plan.hook):
        raise UserError(f"SAE {plan.sae_id} reads {meta_hook}, not {plan.hook}")
    check_sae_decoder(sae, plan.sae_id)


# SAE-Lens architectures whose decode is sum_i a_i d_i + b_dec with d_i a fixed direction per feature
# (pipeline.engine.forward.FeatureEncoder gives d_i), and why the others are not.
LINEAR_DECODERS = ("standard", "jumprelu", "gated", "topk", "abstopk", "matching_pursuit")
_REFUSED = {
    "temporal": "a temporal SAE: its codes depend on earlier positions and its splice keeps no error term",
    "transcoder": "a transcoder: it writes to another hook than it reads",
}


def check_sae_decoder(sae: SAE, name: str) -> None:
    """Refuse, in one line, an SAE whose splice is not x + (value's shift) * a_i * d_i at its own hook."""
    arch = sae.cfg.architecture()
    if arch not in LINEAR_DECODERS:
        why = _REFUSED.get("transcoder" if "transcoder" in arch else arch, "not known to decode linearly")
        raise UserError(f"SAE {name} has architecture '{arch}' ({why}); supported: {', '.join(LINEAR_DECODERS)}")
    if sae.cfg.normalize_activations not in ("none", None):
        raise UserError(
            f"SAE {name} normalises its input ({sae.cfg.normalize_activations}); "
            "only SAEs with normalize_activations 'none' are supported"
        )
    if sae.cfg.reshape_activations != "none":
        raise UserError(f"SAE {name} reshapes its input ({sae.cfg.reshape_activations}); not supported")


def sae_model_kwargs(saes: list[SAE]) -> dict[str, Any]:
    """The model_from_pretrained_kwargs the SAEs record; they must agree."""
    found = [dict(s.cfg.metadata.model_from_pretrained_kwargs or {}) for s in saes]
    if any(f != found[0] for f in found):
        raise UserError(f"the SAEs record different model_from_pretrained_kwargs: {found}")
    return found[0] if found else {}


# ---------------------------------------------------------------------------------------------
# What later stages load: exactly what the model stage recorded


def load_study_model(record: ModelRecord, device: torch.device, dtype: str) -> HookedTransformer:
    """The model data/model.json records; a hub model from the Hugging Face cache only. Built from
    the model stage's processed weights (pipeline.processed: no Hugging Face conversion, the same
    bits) when they are there."""
    hub.offline_for(record.model.source)
    if artifacts.processed_dir(record.preset).is_dir():
        from pipeline.processed.store import load_processed_hooked

        model = load_processed_hooked(record, device, torch_dtype(dtype))
        _check_resumable(model, record.model.name)
        return model
    return load_model(record.model.name, device, dtype, record.model.from_pretrained_kwargs)


def load_study_sae(record: ModelRecord, layer: int, device: torch.device, dtype: str) -> SAE:
    """Layer `layer`'s SAE as data/model.json records it; from the Hugging Face cache only."""
    hub.offline_for(record.model.source)
    return load_sae(record.sae_release, record.layer(layer).plan(), device, dtype)


def load_study_model_fast(record: ModelRecord, device: torch.device, dtype: str):
    """The same weights as `load_study_model`, as a torch-only ProcessedTransformer where it mirrors
    the model (what the engine needs: forward passes, no hooks), importing no TransformerLens."""
    from pipeline.processed.store import load_processed_model

    hub.offline_for(record.model.source)
    model = load_processed_model(record, device, torch_dtype(dtype))
    _check_resumable(model, record.model.name)
    return model


def load_study_sae_fast(record: ModelRecord, layer: int, device: torch.device, dtype: str):
    """The same tensors as `load_study_sae`, as a torch-only ProcessedSAE for the standard and
    JumpReLU encoders; other architectures through SAE-Lens (`load_study_sae`)."""
    from pipeline.processed.store import load_processed_sae

    sae = load_processed_sae(record, record.layer(layer).plan(), device, dtype)
    return load_study_sae(record, layer, device, dtype) if sae is None else sae
