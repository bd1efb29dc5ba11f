"""The twin of an SAE-Lens release repo in SAE-Lens's own layout (e.g. `jbloom/GPT2-Small-SAEs-Reformatted`).

For a release with `conversion_func: null`, `SAE.from_pretrained(release, sae_id)` uses
`sae_lens_huggingface_loader`: it downloads `{path}/cfg.json` and `{path}/sae_weights.safetensors`
from the release's repo, and `{path}/sparsity.safetensors` where the repo has one, with `path` the
id's folder in SAE-Lens's pretrained directory. The twin writes one folder per SAE id of the
release, each with:

- cfg.json with the keys of the res-jb repo's configs: the pre-6.0 training config of
  mats_sae_training (`hook_point`, `hook_point_layer`, `d_in`, `d_sae`, `context_size`, ...), so
  SAE-Lens's legacy-config handling (`handle_pre_6_0_config`) runs as it does for the real files;
- sae_weights.safetensors with `W_enc` [d_in, d_sae], `b_enc` [d_sae], `W_dec` [d_sae, d_in],
  `b_dec` [d_in];
- sparsity.safetensors with `sparsity` [d_sae], log10 feature densities.

The weights are seeded random: a ReLU SAE with unit-norm decoder rows and a tied encoder, biased on
residuals of the twin's own model so that each feature fires on a small share of positions.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from pipeline.twin.gpt2 import safetensors_bytes

_HOOK_LAYER = re.compile(r"^blocks\.(\d+)\.")


def cfg_json(hook_name: str, d_in: int, d_sae: int, model_name: str, context_size: int = 128) -> dict[str, Any]:
    """A legacy (pre-SAE-Lens-1.0) training config like the res-jb repo's."""
    m = _HOOK_LAYER.match(hook_name)
    return {
        "model_name": model_name,
        "hook_point": hook_name,
        "hook_point_layer": int(m.group(1)) if m else 0,
        "hook_point_head_index": None,
        "dataset_path": "Skylion007/openwebtext",
        "is_dataset_tokenized": False,
        "context_size": context_size,
        "use_cached_activations": False,
        "cached_activations_path": None,
        "d_in": d_in,
        "n_batches_in_buffer": 128,
        "total_training_tokens": 300_000_000,
        "store_batch_size": 32,
        "device": "cuda",
        "seed": 42,
        "dtype": "torch.float32",
        "b_dec_init_method": "geometric_median",
        "expansion_factor": d_sae // d_in if d_sae % d_in == 0 else None,
        "from_pretrained_path": None,
        "l1_coefficient": 8e-05,
        "lr": 0.0004,
        "lr_scheduler_name": None,
        "lr_warm_up_steps": 5000,
        "train_batch_size": 4096,
        "use_ghost_grads": False,
        "feature_sampling_window": 1000,
        "feature_sampling_method": None,
        "resample_batches": 1028,
        "feature_reinit_scale": 0.2,
        "dead_feature_window": 5000,
        "dead_feature_estimation_method": "no_re_init",
        "dead_feature_threshold": 1e-08,
        "log_to_wandb": True,
        "wandb_project": "mats_sae_training_gpt2_small_resid_pre_5",
        "wandb_entity": None,
        "wandb_log_frequency": 100,
        "n_checkpoints": 10,
        "checkpoint_path": "checkpoints/twin",
        "d_sae": d_sae,
        "tokens_per_buffer": 67_108_864,
        "run_name": f"{d_sae}-L1-8e-05-LR-0.0004-Tokens-3.000e+08",
    }


def sae_tensors(resid: torch.Tensor, d_sae: int, seed: int) -> dict[str, torch.Tensor]:
    """A ReLU SAE calibrated on residuals `resid` [n, d_in] sampled at its hook.

    Decoder rows are random unit vectors, the encoder is the decoder's transpose with a random
    gain, `b_dec` is the residuals' mean (as res-jb's geometric-median init), and each feature's
    `b_enc` puts its firing rate on the sample at a target drawn log-uniformly in [0.1%, 5%] (the
    study's density band), so every feature fires somewhere and none fires everywhere."""
    g = torch.Generator().manual_seed(seed)
    d_in = resid.shape[1]
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    w_enc = (w_dec.T * (torch.rand(d_sae, generator=g) * 1.5 + 0.5)).contiguous()
    b_dec = resid.mean(dim=0)
    pre = (resid - b_dec) @ w_enc  # [n, d_sae]
    target = 10.0 ** (torch.rand(d_sae, generator=g) * (-1.3 + 3.0) - 3.0)
    n_above = (target * pre.shape[0]).round().long()  # positions that should fire
    # The threshold is the (n_above + 1)-th largest pre-activation: only the top few are needed.
    top = pre.topk(int(n_above.max()) + 1, dim=0).values
    b_enc = -top.gather(0, n_above.unsqueeze(0)).squeeze(0)
    return {"W_enc": w_enc, "b_enc": b_enc.contiguous(), "W_dec": w_dec.contiguous(), "b_dec": b_dec.contiguous()}


def log10_density(resid: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """What `sparsity.safetensors` holds: log10 of each feature's firing rate (floored at 1e-10)."""
    acts = torch.relu((resid - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"])
    return (acts > 0).float().mean(dim=0).clamp_min(1e-10).log10().contiguous()


def repo_files(saes_map: dict[str, str], resid_at: dict[str, torch.Tensor], d_sae: int, model_name: str,
               seed: int) -> dict[str, bytes | str]:
    """Every file of the release repo: {path}/cfg.json, sae_weights.safetensors, sparsity.safetensors.

    `resid_at` maps each SAE id (its hook name) to residuals sampled there."""
    files: dict[str, bytes | str] = {}
    for i, (sae_id, folder) in enumerate(sorted(saes_map.items())):
        resid = resid_at[sae_id]
        tensors = sae_tensors(resid, d_sae, seed + 1000 * i)
        files[f"{folder}/cfg.json"] = json.dumps(cfg_json(sae_id, resid.shape[1], d_sae, model_name), indent=2) + "\n"
        files[f"{folder}/sae_weights.safetensors"] = safetensors_bytes(tensors)
        files[f"{folder}/sparsity.safetensors"] = safetensors_bytes({"sparsity": log10_density(resid, tensors)})
    return files
