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

from pipeline.core.errors import UserError
from pipeline.core.params.config import is_local_path
from pipeline.core.params.device import torch_dtype
from pipeline.core.plan.hooks import same_tensor
from pipeline.core.plan.layers import LayerPlan
from pipeline.core.quiet import quiet_library_warnings
from pipeline.core.runinfo import timed

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
TOKENIZER_SPEC = "tokenizer_spec.json"


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


def local_model(directory: str | Path, device: torch.device, dtype: torch.dtype) -> HookedTransformer:
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


def model_from_source(name: str, device: torch.device, dtype: str,
               from_pretrained_kwargs: dict[str, Any] | None = None) -> HookedTransformer:
    """The model the study runs (hub name or local directory), in eval mode with gradients off."""
    with timed("import"):
        import transformer_lens  # noqa: F401 - a library import, timed apart from the loading
        import transformers  # noqa: F401
    with timed("load"):
        return _model_from_source(name, device, dtype, from_pretrained_kwargs)


def _model_from_source(name: str, device: torch.device, dtype: str,
                from_pretrained_kwargs: dict[str, Any] | None) -> HookedTransformer:
    quiet_library_warnings()
    if is_local_path(name):
        model = local_model(name, device, torch_dtype(dtype))
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
    check_resumable(model, name)
    model.eval()
    model.requires_grad_(False)
    return model


def check_resumable(model, name: str) -> None:
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


def sae_from_source(release: str, plan: LayerPlan, device: torch.device, dtype: str) -> SAE:
    """One SAE: SAE.from_pretrained(release, id) from the hub, or SAE.load_from_disk(release/id)."""
    with timed("import"):
        import sae_lens  # noqa: F401 - a library import, timed apart from the loading
    with timed("load"):
        return _sae_from_source(release, plan, device, dtype)


def _sae_from_source(release: str, plan: LayerPlan, device: torch.device, dtype: str) -> SAE:
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
