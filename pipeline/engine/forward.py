"""The pieces of a forward pass the engine recombines: prefix to the hook, suffix from it,
unembedding in chunks, and the SAE's feature activations.

`model(tokens, stop_at_layer=k)` returns the residual entering block k, i.e.
`blocks.(k-1).hook_resid_post` = `blocks.k.hook_resid_pre`; `model(resid, start_at_layer=k, ...)`
runs blocks k.. on it. Running the suffix only up to the final layer norm (and unembedding
ourselves, position chunk by position chunk) is what bounds memory: GPT-2's 50,257-wide logits are
never held for a whole batch of variants at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from pipeline.core.errors import UserError
from pipeline.engine.interventions import Intervention
from pipeline.engine.normalization import position_scale
from pipeline.load.library import check_sae_decoder

log = logging.getLogger(__name__)


def residual_at(model, tokens: Int[Tensor, "batch pos"], resume_at: int) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering block `resume_at` (the hook's value), from tokens."""
    return model(tokens, stop_at_layer=resume_at)


def final_residual(model, resid: Float[Tensor, "batch pos d_model"], resume_at: int
                   ) -> Float[Tensor, "batch pos d_model"]:
    """Run blocks resume_at.. and the final layer norm: what the unembedding reads."""
    n_layers = model.cfg.n_layers
    if resume_at < n_layers:
        resid = model(resid, start_at_layer=resume_at, stop_at_layer=n_layers)
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    return resid


_UNEMBED_WEIGHT: dict[tuple[int, int, int], Tensor] = {}


def _unembed_weight(model) -> Tensor:
    """W_U transposed and contiguous, as TransformerLens's Unembed builds it on *every* call (a
    154 MB copy for GPT-2); cached here while W_U is unchanged (keyed by storage and version)."""
    w = model.unembed.W_U
    key = (id(model), w.data_ptr(), w._version)
    if key not in _UNEMBED_WEIGHT:
        _UNEMBED_WEIGHT.clear()
        _UNEMBED_WEIGHT[key] = w.T.contiguous()
    return _UNEMBED_WEIGHT[key]


def unembed(model, final: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_vocab"]:
    """Logits from final-layer-norm outputs, in float32 whatever the model's dtype.

    Bit-for-bit TransformerLens's `model.unembed` (the same F.linear on the same weight layout),
    without its per-call weight copy."""
    from pipeline.load.processed.model import apply_softcap  # TransformerLens's, without importing it

    logits = torch.nn.functional.linear(final, _unembed_weight(model), model.unembed.b_U)
    return apply_softcap(logits, model.cfg.output_logits_soft_cap).float()


def unembed_into(model, final: Float[Tensor, "rows d_model"], out: Float[Tensor, "rows d_vocab"]
                 ) -> Float[Tensor, "rows d_vocab"]:
    """`unembed` of 2-D rows written into `out`, a float32 buffer the caller reuses, so no [rows x vocab] tensor is
    allocated per call. The same addmm as F.linear on 2-D input, so the same bits (tested); models in another
    dtype or with a logit soft-cap, and calls that autograd records (out= has no gradient), go through
    `unembed` and a copy."""
    from pipeline.load.processed.model import softcap_enabled

    if (model.cfg.dtype != torch.float32 or softcap_enabled(model.cfg.output_logits_soft_cap)
            or (torch.is_grad_enabled() and (final.requires_grad or model.unembed.W_U.requires_grad))):
        return out.copy_(unembed(model, final))
    return torch.addmm(model.unembed.b_U, final, _unembed_weight(model).t(), out=out)


def unembeds_differences(model) -> bool:
    """Whether logits(h_int) - logits(h_clean) is exactly the float32 product (h_int - h_clean) W_U, up to that
    product's own rounding: a float32 model whose logits are affine in the final residual (no soft-cap)."""
    from pipeline.load.processed.model import softcap_enabled

    return model.cfg.dtype == torch.float32 and not softcap_enabled(model.cfg.output_logits_soft_cap)


def unembed_difference_into(model, final_diff: Float[Tensor, "rows d_model"], out: Float[Tensor, "rows d_vocab"]
                            ) -> Float[Tensor, "rows d_vocab"]:
    """The change of the logits, (h_int - h_clean) W_U, written into `out` (the bias cancels). Rounded relative to
    the change itself, where the difference of two unembeddings is rounded relative to the logits; rows of
    zeros give exact zeros. Only for models with `unembeds_differences`."""
    return torch.mm(final_diff, _unembed_weight(model).t(), out=out)


class FeatureEncoder:
    """Activations a_i(x) of selected SAE features, and their directions d_i: a_i(x) * d_i is exactly
    feature i's part of the SAE's reconstruction, `sae.decode(acts)` being sum_i a_i d_i + b_dec.

    d_i is W_dec[i], except for a (Abs)TopK SAE with `rescale_acts_by_decoder_norm`, whose decode
    multiplies a_i by 1 / ||W_dec[i]|| first: there d_i = W_dec[i] / ||W_dec[i]||. SAEs whose
    reconstruction is not of that form are refused (pipeline.load.library.check_sae_decoder).

    StandardSAE (ReLU) and JumpReLUSAE compute feature i from column i of W_enc alone, so only
    those columns are multiplied: for 5 of 24,576 features that is ~5,000x less encoder work.
    Any other architecture (TopK, ...) falls back to the full `sae.encode`.

    An SAE that normalises its input writes a_i * s_t * d_i at position t (pipeline.engine.normalization):
    `scale(resid)` gives s_t, or None where s_t = 1 (no normalisation), so those SAEs skip the multiply.
    """

    def __init__(self, sae, features: list[int]):
        from pipeline.load.processed.sae import sae_kind  # SAE-Lens's classes, or the processed SAE's

        check_sae_decoder(sae, sae.cfg.metadata.hook_name or "given")
        self.sae = sae
        self.index = torch.tensor(features, dtype=torch.long, device=sae.W_enc.device)
        kind = sae_kind(sae)
        self.column_separable = kind in ("standard", "jumprelu")
        self.jump = kind == "jumprelu"
        if self.column_separable:
            self.w_enc = sae.W_enc[:, self.index].contiguous()  # [d_in, F]
            self.b_enc = sae.b_enc[self.index]
            self.threshold = sae.threshold[self.index] if self.jump else None
        self.directions = sae.W_dec[self.index]  # [F, d_in]
        if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):  # TopK's act_times_W_dec
            self.directions = self.directions * (1 / self.directions.norm(dim=-1, keepdim=True))
        self.normalizes = (getattr(sae.cfg, "normalize_activations", None) or "none") != "none"

    def scale(self, resid: Float[Tensor, "*batch pos d_model"]) -> Float[Tensor, "*batch pos"] | None:
        """s_t at every position, from the residual in the SAE's dtype (as SAE-Lens reads it); None: s_t = 1."""
        if not self.normalizes:
            return None
        return position_scale(self.sae.cfg, resid.to(self.directions.dtype))

    def __call__(self, resid: Float[Tensor, "*batch pos d_model"]) -> Float[Tensor, "*batch pos n_feat"]:
        if not self.column_separable:
            return self.sae.encode(resid)[..., self.index]
        sae_in = self.sae.process_sae_in(resid)  # dtype cast, minus b_dec when configured
        pre = sae_in @ self.w_enc + self.b_enc
        acts = self.sae.activation_fn(pre)
        if self.jump:
            acts = acts * (pre > self.threshold).to(acts.dtype)
        return acts


def scaled(delta: Float[Tensor, "*batch pos d_model"], scale: Float[Tensor, "*batch pos"] | None
           ) -> Float[Tensor, "*batch pos d_model"]:
    """delta_t = c_t * s_t * d_i from c_t * d_i and s_t (None: s_t = 1, the delta as it is)."""
    return delta if scale is None else delta * scale.unsqueeze(-1).to(delta.dtype)


def intervened_residual(resid: Float[Tensor, "batch pos d_model"], acts: Float[Tensor, "batch pos"],
                        direction: Float[Tensor, " d_model"], intervention: Intervention, value: float,
                        scale: Float[Tensor, "batch pos"] | None = None) -> Float[Tensor, "batch pos d_model"]:
    """resid + delta (times the SAE's per-position scale s_t, FeatureEncoder.scale), computed in the SAE's dtype
    and added in the model's."""
    delta = scaled(intervention.delta(acts.to(direction.dtype), direction, value), scale)
    return resid + delta.to(resid.dtype)


def intervened_logits(model, encoder: FeatureEncoder, resume_at: int, tokens: Int[Tensor, "batch pos"],
                      feature_pos: int, value: float, intervention: Intervention
                      ) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of one variant by the engine's route: prefix, delta, resumed suffix, unembed."""
    resid = residual_at(model, tokens, resume_at)
    acts = encoder(resid)[..., feature_pos]
    x = intervened_residual(resid, acts, encoder.directions[feature_pos], intervention, value, encoder.scale(resid))
    return unembed(model, final_residual(model, x, resume_at))


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def device_of(model) -> torch.device:
    """The device a model's weights are on."""
    return next(model.parameters()).device


def retry_on_oom(step: Callable[[int], None], stats, what: str) -> None:
    """Run step(stats.batch_size); on out-of-memory halve stats.batch_size (counting stats.oom_halvings) and run it
    again, down to batch size 1, then one line. `stats` is any record with those two fields (EngineStats,
    ScreenStats); `step` resumes where the last attempt stopped."""
    while True:
        try:
            step(stats.batch_size)
            return
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not is_oom(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if stats.batch_size == 1:
                raise UserError(f"out of memory during {what} even at batch_size 1; use a smaller "
                                "max_len or a device with more memory") from None
            stats.batch_size //= 2
            stats.oom_halvings += 1
            log.warning("out of memory during %s; batch_size halved to %d", what, stats.batch_size)
