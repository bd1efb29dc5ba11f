"""The per-position scale s_t by which an input-normalising SAE's feature writes to the residual stream.

An SAE with `normalize_activations` reads each position through a normalisation and scales its
decoder output back. Spliced in with its error term (SAE-Lens's `HookedSAETransformer` with
`use_error_term=True`), editing feature i therefore moves the residual by

    delta_t = c_t * s_t * d_i

with c_t the change of feature i's activation at position t (scale: (alpha - 1) a_i; clamp:
v - a_i; add: c), d_i its decoder direction (pipeline.engine.forward.FeatureEncoder: W_dec[i], or
W_dec[i] / ||W_dec[i]|| for a TopK SAE with `rescale_acts_by_decoder_norm`), and s_t what this
module computes: 1 for an SAE that does not normalise.

Derivation, from SAE-Lens 6.54.12 (sae_lens/saes/sae.py `_setup_activation_normalization`,
`process_sae_in`; sae_lens/saes/topk_sae.py `encode`, `decode`; sae_lens/analysis/
hooked_sae_transformer.py `_SAEWrapper.forward`). The splice returns, at the hook,

    out = decode(a') + (x - decode(a))

with a = encode(x) computed with hooks off and a' the same codes with the edit applied at
`hook_sae_acts_post`. Every decode is `norm_out(a @ W_dec + b_dec)`, where `norm_out` undoes the
normalisation that `encode` applied to x (both runs see the same x, so the same statistics):

- `layer_norm`: encode reads (x - mu_t) / (sigma_t + 1e-5), mu_t the mean and sigma_t the standard
  deviation (torch's default, Bessel-corrected) of x_t - mu_t over d_in; decode returns
  y * sigma_t + mu_t. The eps is on the way in only: the way out multiplies by sigma_t itself.
  So out - x = (a' - a) @ W_dec * sigma_t: mu_t and b_dec cancel, s_t = sigma_t.
- `constant_norm_rescale`: encode reads x * k_t with k_t = sqrt(d_in) / ||x_t||; decode returns
  y / k_t. So s_t = 1 / k_t = ||x_t|| / sqrt(d_in).
- `none`: s_t = 1.

Two values SAE-Lens accepts are refused here, because an SAE that still carries them after
loading runs, in SAE-Lens, on inputs it was not trained for: SAE-Lens's runtime applies no
normalisation for them at all. `expected_average_only_in` is folded into the weights by
`SAE.from_pretrained` when the release records a `norm_scaling_factor` (the config then reads
`none`); one still marked with it was loaded without its factor (SAE-Lens warns and skips the
folding). `covariance_whitening` is folded in at the end of training (`fold_activation_whitening`).

The statistics are taken from the residual the SAE reads, in the SAE's dtype, exactly as SAE-Lens
computes them (the same torch calls in the same order), so the engine's scale equals the splice's.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from pipeline.core.errors import UserError
from pipeline.load.library import SCALED_NORMALIZATIONS

SCALED = SCALED_NORMALIZATIONS  # the loader's check (pipeline.load.library) accepts exactly these
_UNFOLDED = {
    "expected_average_only_in": "SAE-Lens folds it into the weights on loading only when the release records a "
    "norm_scaling_factor, and this SAE still carries it, so SAE-Lens would run it on unscaled inputs",
    "covariance_whitening": "SAE-Lens folds the whitening into the weights at the end of training and applies none "
    "at run time, so an SAE still carrying it would run on unwhitened inputs",
}


def position_scale(sae_cfg, resid: Float[Tensor, "*batch pos d_in"]) -> Float[Tensor, "*batch pos"]:
    """s_t for every position of `resid` (the residual the SAE reads, already in the SAE's dtype).

    `sae_cfg` is the SAE's config (SAE-Lens's `sae.cfg`, or anything with `normalize_activations`
    and `d_in`). Refuses, in one line, a normalisation whose splice is not `c_t * s_t * d_i`."""
    mode = getattr(sae_cfg, "normalize_activations", None) or "none"
    if mode == "none":
        return torch.ones(resid.shape[:-1], dtype=resid.dtype, device=resid.device)
    if mode == "layer_norm":
        # SAE-Lens's run_time_activation_ln_in: the std of the centred input, without its eps.
        centred = resid - resid.mean(dim=-1, keepdim=True)
        return centred.std(dim=-1)
    if mode == "constant_norm_rescale":
        return resid.norm(dim=-1) / sae_cfg.d_in**0.5
    if mode in _UNFOLDED:
        raise UserError(f"SAE normalize_activations '{mode}' is refused: {_UNFOLDED[mode]}; supported: "
                        f"{', '.join(SCALED)}")
    raise UserError(f"SAE normalize_activations '{mode}' is unknown; supported: {', '.join(SCALED)}")
