"""Load the model and its SAEs: from the Hugging Face hub (gpt2-small) or from local directories.

Hub: `HookedTransformer.from_pretrained(name, **model_from_pretrained_kwargs)` with the kwargs the
SAE release records (for gpt2-small-res-jb: center_writing_weights=True), so the residual stream
matches what the SAEs were trained on; `SAE.from_pretrained(release, sae_id)` for each layer. Gemma-2 goes
through `pipeline.load.gemma2_config.from_pretrained_reading_config` (the same steps, its config read from the
repo's config.json: TransformerLens 3.9 hard-codes Gemma-2-2B's shapes). Given a `revision` (a commit), the
model's files, its tokenizer and the SAE's files are read at that commit (pipeline.load.revisions).

Local (the toy preset, or a user's own model): a directory holding `config.json` (the keyword
arguments of `HookedTransformerConfig`), `model.safetensors` (the HookedTransformer state dict,
loaded as is) and `tokenizer_spec.json`; SAEs as SAE-Lens `save_model` folders read with
`SAE.load_from_disk`. The toy preset goes through exactly this path.
"""

from __future__ import annotations

import json
import os
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
               from_pretrained_kwargs: dict[str, Any] | None = None, revision: str | None = None) -> HookedTransformer:
    """The model the study runs (hub name or local directory), in eval mode with gradients off; a hub model's files
    at commit `revision` (None: the cache's or hub's `main`)."""
    with timed("import"):
        import transformer_lens  # noqa: F401 - a library import, timed apart from the loading
        import transformers  # noqa: F401
    with timed("load"):
        return _model_from_source(name, device, dtype, from_pretrained_kwargs, revision)


def official_repo(name: str) -> str:
    """The hub repo TransformerLens reads for a model name (gpt2-small -> gpt2, gemma-2-2b -> google/gemma-2-2b)."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

    return get_official_model_name(name)


def reads_config_json(official: str) -> bool:
    """TransformerLens 3.9 builds Gemma-2's config from a table in its source, not from config.json
    (`convert_hf_model_config`'s `"gemma-2-" in name` branch): those models load through
    pipeline.load.gemma2_config, which reads it."""
    return "gemma-2-" in official.lower()


def hub_tokenizer(official: str, revision: str | None):
    """The model's Hugging Face tokenizer at `revision`, as TransformerLens makes its own (add_bos_token=True), so
    TransformerLens does not fetch one at `main` beside it."""
    from transformers import AutoTokenizer

    token = os.environ.get("HF_TOKEN") or None
    return AutoTokenizer.from_pretrained(official, add_bos_token=True, revision=revision, token=token)


def _model_from_source(name: str, device: torch.device, dtype: str,
                from_pretrained_kwargs: dict[str, Any] | None, revision: str | None) -> HookedTransformer:
    quiet_library_warnings()
    if is_local_path(name):
        model = local_model(name, device, torch_dtype(dtype))
    else:
        from transformer_lens import HookedTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a "Loading weights" bar per stage says nothing
        official = official_repo(name)
        kwargs = dict(from_pretrained_kwargs or {}) | ({"revision": revision} if revision else {})
        try:
            # The pipeline pads nothing through TransformerLens (generation passes its own left-padding mask), so
            # the model never builds a mask from pad tokens, whatever side the tokenizer pads (Gemma's: left).
            tokenizer = hub_tokenizer(official, revision)
            if reads_config_json(official):
                from huggingface_hub import hf_hub_download

                from pipeline.load.gemma2_config import from_pretrained_reading_config

                hf_config = json.loads(Path(hf_hub_download(official, "config.json", revision=revision)).read_text())
                model = from_pretrained_reading_config(name, hf_config, device=str(device), dtype=torch_dtype(dtype),
                                                       tokenizer=tokenizer, default_padding_side="right", **kwargs)
            else:
                model = HookedTransformer.from_pretrained(name, device=str(device), dtype=torch_dtype(dtype),
                                                          tokenizer=tokenizer, default_padding_side="right", **kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"could not load model '{name}'{f' at commit {revision[:12]}' if revision else ''} "
                f"({type(exc).__name__}: {str(exc)[:160]}); run `dvc repro model` with network access, or use "
                "-S preset=toy offline"
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


def sae_from_source(release: str, plan: LayerPlan, device: torch.device, dtype: str, revision: str | None = None) -> SAE:
    """One SAE: SAE.from_pretrained(release, id) from the hub (its repo's files at commit `revision`, None: `main`),
    or SAE.load_from_disk(release/id)."""
    with timed("import"):
        import sae_lens  # noqa: F401 - a library import, timed apart from the loading
    with timed("load"):
        return _sae_from_source(release, plan, device, dtype, revision)


def _sae_from_source(release: str, plan: LayerPlan, device: torch.device, dtype: str, revision: str | None) -> SAE:
    quiet_library_warnings()
    from sae_lens import SAE

    if is_local_path(release):
        path = Path(release) / plan.sae_id
        if not (path / "cfg.json").exists():
            raise UserError(f"SAE folder {path} has no cfg.json; rerun the model stage")
        sae = SAE.load_from_disk(path, device=str(device), dtype=dtype)
    else:
        from pipeline.core.plan.layers import pretrained_directory
        from pipeline.load.revisions import sae_lens_at

        pins = {pretrained_directory()[release].repo_id: revision} if revision else {}
        try:
            with sae_lens_at(pins):
                sae = SAE.from_pretrained(release, plan.sae_id, device=str(device), dtype=dtype)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"could not load SAE {release}/{plan.sae_id}{f' at commit {revision[:12]}' if revision else ''} "
                f"({type(exc).__name__}: {str(exc)[:160]}); run `dvc repro model` with network access first"
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
# Input normalisations whose splice moves the residual by c_t * s_t * d_i with a per-position scale s_t that
# pipeline.engine.normalization computes (the derivation is there and in docs/sae_families.md).
SCALED_NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale")
_REFUSED = {
    "temporal": "a temporal SAE: its codes depend on earlier positions and its splice keeps no error term",
    "transcoder": "a transcoder: it writes to another hook than it reads",
}


def check_sae_decoder(sae: SAE, name: str) -> None:
    """Refuse, in one line, an SAE whose splice is not x + (value's shift) * s_t * d_i at its own hook."""
    arch = sae.cfg.architecture()
    if arch not in LINEAR_DECODERS:
        why = _REFUSED.get("transcoder" if "transcoder" in arch else arch, "not known to decode linearly")
        raise UserError(f"SAE {name} has architecture '{arch}' ({why}); supported: {', '.join(LINEAR_DECODERS)}")
    normalization = sae.cfg.normalize_activations or "none"
    if normalization not in SCALED_NORMALIZATIONS:
        raise UserError(
            f"SAE {name} normalises its input ({normalization}) in a way its splice does not scale per position "
            f"(docs/sae_families.md); supported normalize_activations: {', '.join(SCALED_NORMALIZATIONS)}"
        )
    if sae.cfg.reshape_activations != "none":
        raise UserError(f"SAE {name} reshapes its input ({sae.cfg.reshape_activations}); not supported")


def sae_model_kwargs(saes: list[SAE]) -> dict[str, Any]:
    """The model_from_pretrained_kwargs the SAEs record; they must agree."""
    found = [dict(s.cfg.metadata.model_from_pretrained_kwargs or {}) for s in saes]
    if any(f != found[0] for f in found):
        raise UserError(f"the SAEs record different model_from_pretrained_kwargs: {found}")
    return found[0] if found else {}
