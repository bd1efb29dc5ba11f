"""The twin of `jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs`: OpenAI's v5 TopK SAEs on GPT-2 Small's
resid_post, as SAE-Lens's release `gpt2-small-resid-post-v5-32k` reads them.

The release has `conversion_func: null` in SAE-Lens's pretrained directory, so `SAE.from_pretrained`
uses `sae_lens_huggingface_loader` (sae_lens/loading/pretrained_sae_loaders.py), exactly as for res-jb:
`{path}/cfg.json`, `{path}/sae_weights.safetensors` and, where present, `{path}/sparsity.safetensors`,
with `path` the id's folder, `v5_32k_layer_{L}.pt` for id `blocks.{L}.hook_resid_post` (a folder whose
name ends in `.pt`). The repo was written by SAE-Lens 3.x's `save_model` from a config that says
`architecture: standard`, `activation_fn_str: topk`, `activation_fn_kwargs: {k: 32}`; SAE-Lens 6's
`handle_pre_6_0_config` turns that into a TopK SAE with k = 32. The twin's cfg.json has those keys, as
the real one spells them, so that conversion runs: `normalize_activations: layer_norm`,
`prepend_bos: false`, `context_size: 64`, `hook_name` (not res-jb's `hook_point`), no
`model_from_pretrained_kwargs` (the SAE reads each position standardised, so TransformerLens's
centring of the residual changes nothing it computes).

Weights: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], float32. Seeded random
unit decoder rows, a tied encoder with random gains, and biases spread so that features fire at
different rates on the twin's own residuals (read through the layer norm, as the SAE reads them).
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from pipeline.twin.gpt2 import safetensors_bytes

RELEASE = "gpt2-small-resid-post-v5-32k"
K = 32  # the release's k, at both scales
LN_EPS = 1e-5  # SAE-Lens's run_time_activation_ln_in
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")


def cfg_json(hook_name: str, d_in: int, d_sae: int, k: int = K) -> dict[str, Any]:
    """The cfg.json SAE-Lens 3.x's save_model wrote for these SAEs (its SAEConfig.to_dict)."""
    layer = int(_HOOK.match(hook_name).group(1))
    return {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "torch.float32",
        "device": "cuda",
        "model_name": "gpt2-small",
        "hook_name": hook_name,
        "hook_layer": layer,
        "hook_head_index": None,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": k},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "prepend_bos": False,
        "dataset_path": "Skylion007/openwebtext",
        "dataset_trust_remote_code": True,
        "context_size": 64,
        "normalize_activations": "layer_norm",
    }


def layer_normed(resid: torch.Tensor) -> torch.Tensor:
    """What the SAE's encoder reads: each position standardised as SAE-Lens does it."""
    centred = resid - resid.mean(dim=-1, keepdim=True)
    return centred / (centred.std(dim=-1, keepdim=True) + LN_EPS)


def topk_codes(normed: torch.Tensor, tensors: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    pre = (normed - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def sae_tensors(resid: torch.Tensor, d_sae: int, seed: int) -> dict[str, torch.Tensor]:
    """A TopK SAE for residuals `resid` [n, d_in]: every position has k candidates, and the biases
    (normal, spread 1.5 pre-activation standard deviations) make some features win far more often."""
    g = torch.Generator().manual_seed(seed)
    d_in = resid.shape[1]
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    w_enc = (w_dec.T * (torch.rand(d_sae, generator=g) * 1.5 + 0.5)).contiguous()
    normed = layer_normed(resid)
    b_dec = normed.mean(dim=0)
    spread = ((normed - b_dec) @ w_enc).std()
    b_enc = torch.randn(d_sae, generator=g) * 1.5 * spread
    return {"W_enc": w_enc, "b_enc": b_enc.contiguous(), "W_dec": w_dec.contiguous(), "b_dec": b_dec.contiguous()}


def repo_files(saes_map: dict[str, str], resid_at: dict[str, torch.Tensor], d_sae: int, seed: int
               ) -> dict[str, bytes | str]:
    """Every file of the release repo, by path; `resid_at` maps each SAE id (a hook name) to residuals there."""
    if not K < d_sae:
        raise ValueError(f"d_sae {d_sae} must exceed k = {K}")
    files: dict[str, bytes | str] = {}
    for i, (sae_id, folder) in enumerate(sorted(saes_map.items())):
        resid = resid_at[sae_id]
        tensors = sae_tensors(resid, d_sae, seed + 1000 * i)
        fired = (topk_codes(layer_normed(resid), tensors, K) > 0).float().mean(dim=0)
        files[f"{folder}/cfg.json"] = json.dumps(cfg_json(sae_id, resid.shape[1], d_sae), indent=2) + "\n"
        files[f"{folder}/sae_weights.safetensors"] = safetensors_bytes(tensors)
        files[f"{folder}/sparsity.safetensors"] = safetensors_bytes(
            {"sparsity": fired.clamp_min(1e-10).log10().contiguous()})
    return files
