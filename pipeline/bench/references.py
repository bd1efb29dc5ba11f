"""What the engine is measured against: SAE-Lens's own splice and the definition computed in float64.

Shared by the bench and the tests (tests/engine/test_engine_exact.py, tests/engine/test_bench.py), so the yardstick is written
once and neither borrows the engine's code:

- `sae_lens_splice` / `plain_way`: what a careful user writes from SAE-Lens's docs, HookedSAETransformer with the SAE
  spliced in (`use_error_term=True`) and a hook scaling `hook_sae_acts_post` of one feature at positions >= 1.
- `definition_hook` / `float64_reference`: full forward passes with the intervention's delta added by a hook at the
  SAE's hook point (scale, clamp or add; any SAE-Lens architecture, its own `encode`; for an SAE that normalises
  its input, the per-position scale s_t read off SAE-Lens's own decode by `decode_scale`), logits in float64;
  `definition_metrics`: every scalar metric from those arrays, straight from docs/method.md.
- `metrics_table`, `max_rel_diff`, `precision_cost`, `max_abs_diff`: how two sets of metrics are compared.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.core.modes import MODES
from pipeline.engine.metrics import live_positions, variant_metrics

COMPARED = ("ce_int", "delta_ce", "kl", "delta_ce_live", "kl_live", "mean_act_live")
# Parameters with one slice per feature, and the dimension it is on, in the SAEs whose features are encoded
# independently of each other (a TopK SAE's are not: its encode needs every feature).
_PER_FEATURE_DIM = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "threshold": 0}
_SEPARABLE = ("standard", "jumprelu")


# ---------------------------------------------------------------------------------------------
# SAE-Lens's own way


def sae_lens_splice(model, sae, tokens: torch.Tensor, feature: int, alpha: float) -> torch.Tensor:
    """Logits of `model` (a HookedSAETransformer) with `sae` spliced in, feature scaled by alpha (BOS left alone)."""

    def scale(acts, hook):  # noqa: ARG001
        acts = acts.clone()
        acts[:, 1:, feature] *= alpha
        return acts

    acts_hook = f"{sae.cfg.metadata.hook_name}.hook_sae_acts_post"
    with model.saes([sae], use_error_term=True):
        return model.run_with_hooks(tokens, fwd_hooks=[(acts_hook, scale)])


@torch.inference_mode()
def plain_way(model, sae, tokens: torch.Tensor, hook: str, features: list[int], alphas: tuple[float, ...],
              batch_size: int) -> dict[str, np.ndarray]:
    """One full forward per (feature, alpha) with the SAE spliced in; clean pass once per batch."""
    n, t = tokens.shape
    ce_clean = np.empty((n, t - 2))
    ce_int = np.empty((len(features), len(alphas), n, t - 2))
    kl = np.empty_like(ce_int)
    acts = np.empty((n, t, len(features)), dtype=np.float32)
    for b0 in range(0, n, batch_size):
        tok = tokens[b0:b0 + batch_size]
        clean, cache = model.run_with_cache(tok, names_filter=[hook])
        acts[b0:b0 + len(tok)] = sae.encode(cache[hook])[..., features].float().cpu().numpy()
        lp_c = torch.log_softmax(clean[:, 1:-1].float(), -1)
        nxt = tok[:, 2:, None]
        ce_clean[b0:b0 + len(tok)] = (-lp_c.gather(-1, nxt)[..., 0]).double().cpu().numpy()
        for fi, feature in enumerate(features):
            for ai, alpha in enumerate(alphas):
                lp_i = torch.log_softmax(sae_lens_splice(model, sae, tok, feature, alpha)[:, 1:-1].float(), -1)
                ce_int[fi, ai, b0:b0 + len(tok)] = (-lp_i.gather(-1, nxt)[..., 0]).double().cpu().numpy()
                kl[fi, ai, b0:b0 + len(tok)] = (lp_c.exp() * (lp_c - lp_i)).sum(-1).double().cpu().numpy()
    return {"ce_clean": ce_clean, "ce_int": ce_int, "kl": kl, "acts": acts}


# ---------------------------------------------------------------------------------------------
# the definition


def activation_shift(intervention: str, acts: torch.Tensor, value: float) -> torch.Tensor:
    """How far along the feature's decoder direction each position moves: the mode's definition
    (pipeline.core.modes), not the engine's delta functions."""
    if intervention not in MODES:
        raise ValueError(f"unknown intervention {intervention!r}")
    return MODES[intervention].shift(acts, value)


Scale = Callable[[torch.Tensor], torch.Tensor]  # resid [batch pos d_model] -> s_t [batch pos]


def _delta(encode: Callable[[torch.Tensor], torch.Tensor], direction: torch.Tensor, intervention: str, value: float,
           scale: Scale | None, resid: torch.Tensor) -> torch.Tensor:
    """delta_t = c_t * s_t * d_i (s_t = 1 without `scale`)."""
    shift = activation_shift(intervention, encode(resid), value)
    if scale is not None:
        shift = shift * scale(resid)
    return shift[..., None] * direction


def definition_hook(encode: Callable[[torch.Tensor], torch.Tensor], direction: torch.Tensor, intervention: str,
                    value: float, scale: Scale | None = None):
    """A TransformerLens hook adding the intervention's delta to the residual at every position but BOS.

    `encode(resid)` is the feature's activation [batch pos]; `direction` its decoder row [d_model]; `scale(resid)`
    the SAE's per-position scale s_t where it normalises its input (`decode_scale`; None: 1).
    """

    def hook(resid, hook):  # noqa: ARG001
        out = resid + _delta(encode, direction, intervention, value, scale, resid)
        out[:, 0] = resid[:, 0]
        return out

    return hook


def control_hook(encode: Callable[[torch.Tensor], torch.Tensor], direction: torch.Tensor, control: torch.Tensor,
                 intervention: str, value: float, scale: Scale | None = None):
    """docs/statistics.md's random-direction control: where the feature's hook would add delta_t, add ||delta_t|| * u
    (u = `control`, a unit vector [d_model]) instead, at every position but BOS."""

    def hook(resid, hook):  # noqa: ARG001
        delta = _delta(encode, direction, intervention, value, scale, resid)
        out = resid + delta.norm(dim=-1, keepdim=True) * control
        out[:, 0] = resid[:, 0]
        return out

    return hook


def model_in(model, dtype: torch.dtype):
    """`model` itself if it runs in `dtype`, else a copy of it (same class, config and weights) that does."""
    if model.cfg.dtype == dtype:
        return model
    cfg = copy.copy(model.cfg)
    cfg.dtype = dtype
    out = type(model)(cfg)
    out.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()})
    return out.eval().requires_grad_(False)


def feature_encoder(sae, features: Sequence[int], dtype: torch.dtype
                    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """(encode, directions) in `dtype`: encode(x)[..., i] is feature features[i]'s activation by SAE-Lens's own
    `encode`, directions[i] its decoder row (divided by its norm where SAE-Lens's decode divides a_i by it).

    Where features are encoded independently (standard, JumpReLU) the SAE is cut down to the chosen features (the
    same class and config with d_sae = len(features)), so no more than those columns are computed; otherwise (TopK)
    the whole SAE encodes.
    """
    if sae.cfg.architecture() in _SEPARABLE and set(_PER_FEATURE_DIM) >= set(sae.state_dict()) - {"b_dec"}:
        idx = torch.as_tensor(list(features), device=sae.W_enc.device)
        part = type(sae)(dataclasses.replace(sae.cfg, d_sae=len(idx), dtype=str(dtype).removeprefix("torch.")))
        part.load_state_dict({k: (v.index_select(_PER_FEATURE_DIM[k], idx) if k in _PER_FEATURE_DIM else v).to(dtype)
                              for k, v in sae.state_dict().items()})
        part.eval().requires_grad_(False)
        return part.encode, part.W_dec
    whole = sae if sae.dtype == dtype else copy.deepcopy(sae).to(dtype)
    directions = whole.W_dec[list(features)]
    if getattr(whole.cfg, "rescale_acts_by_decoder_norm", False):  # its decode divides a_i by ||W_dec[i]||
        directions = directions / whole.W_dec.norm(dim=-1)[list(features), None]
    return (lambda x: whole.encode(x)[..., list(features)]), directions


def decode_scale(sae, dtype: torch.dtype) -> Scale | None:
    """s_t read off SAE-Lens's own decode, for an SAE that normalises its input (None for one that does not).

    SAE-Lens's decode of codes a at position t is norm_out_t(a @ W_dec + b_dec), its normalisation statistics being
    those the preceding encode of x_t stored; so decode(e) - decode(0) for a code e that is 1 on feature 0 alone is
    s_t times feature 0's direction d_0 (W_dec[0], divided by its norm where decode divides a_0 by it), and s_t is
    that difference along d_0 over ||d_0||^2. Written from SAE-Lens's decode, not from pipeline.engine.normalization.
    """
    if (sae.cfg.normalize_activations or "none") == "none":
        return None
    whole = sae if sae.dtype == dtype else copy.deepcopy(sae).to(dtype)
    d0 = whole.W_dec[0]
    if getattr(whole.cfg, "rescale_acts_by_decoder_norm", False):
        d0 = d0 / d0.norm()

    def scale(resid: torch.Tensor) -> torch.Tensor:
        x = resid.to(dtype)
        codes = torch.zeros((*x.shape[:-1], whole.cfg.d_sae), dtype=dtype, device=x.device)
        whole.encode(x)  # stores the statistics of x that the next decode undoes
        zero = whole.decode(codes)
        codes[..., 0] = 1.0
        whole.encode(x)
        one = whole.decode(codes)
        return (one - zero) @ d0 / (d0 @ d0)

    return scale


def definition_live(acts: np.ndarray, live_percentile: float) -> tuple[float, np.ndarray]:
    """docs/method.md's live set: the positions where the feature's |activation| is above max(0, its percentile)."""
    thr = max(0.0, float(np.percentile(np.abs(acts), live_percentile)))
    return thr, np.abs(acts) > thr


@torch.inference_mode()
def float64_reference(model, sae, tokens: torch.Tensor, hook: str, features: list[int], values: Sequence[float],
                      batch_size: int, *, intervention: str = "scale", dtype: torch.dtype = torch.float64,
                      live_percentile: float | None = None, controls: torch.Tensor | None = None
                      ) -> dict[str, np.ndarray]:
    """The definition: full forward passes with the delta added by a hook at `hook`, logits and metrics in float64.

    The forward passes run in `dtype`, float64 unless asked (on copies of the model and SAE; a model already in
    `dtype` runs as is). Returns ce_clean [n, t-2], ce_int and kl [features, values, n, t-2] and the features'
    activations `acts` [n, t, features] (float32, as the engine reports them). With `live_percentile`, also
    `mean_logit_delta` [features, values, d_vocab]: the intervention's change of the centred logits, averaged
    over the feature's live positions (NaN where it has none). With `controls` (unit vectors [features, draws,
    d_model]), each variant runs with `control_hook` instead, once per draw, and ce_int / kl are
    [features, values, draws, n, t-2].
    """
    ref_model = model_in(model, dtype)
    encode, directions = feature_encoder(sae, features, dtype)
    scale = decode_scale(sae, dtype)
    n, t = tokens.shape
    ce_clean = np.empty((n, t - 2))
    ce_int = np.empty((len(features), len(values), n, t - 2))
    kl = np.empty_like(ce_int)
    acts = np.empty((n, t, len(features)), dtype=np.float32)
    batches = [tokens[b0:b0 + batch_size] for b0 in range(0, n, batch_size)]
    if controls is not None:
        ce_ctrl = np.empty((len(features), len(values), controls.shape[1], n, t - 2))
        kl_ctrl = np.empty_like(ce_ctrl)
    live = None
    if live_percentile is not None:  # the live set needs every passage's activations before the first variant
        for b0, tok in zip(range(0, n, batch_size), batches, strict=True):
            _, cache = ref_model.run_with_cache(tok, names_filter=[hook])
            acts[b0:b0 + len(tok)] = encode(cache[hook]).float().cpu().numpy()
        live = [definition_live(acts[:, 1:-1, fi].astype(np.float64), live_percentile)[1] for fi in range(len(features))]
        delta_sum = np.zeros((len(features), len(values), ref_model.cfg.d_vocab_out))
    for b0, tok in zip(range(0, n, batch_size), batches, strict=True):
        clean, cache = ref_model.run_with_cache(tok, names_filter=[hook])
        clean = clean.double()
        acts[b0:b0 + len(tok)] = encode(cache[hook]).float().cpu().numpy()
        lp_c = torch.log_softmax(clean[:, 1:-1], -1)
        nxt = tok[:, 2:, None]
        ce_clean[b0:b0 + len(tok)] = (-lp_c.gather(-1, nxt)[..., 0]).cpu().numpy()
        for fi in range(len(features)):
            for ai, value in enumerate(values):
                if controls is not None:
                    for r in range(controls.shape[1]):
                        ctrl = control_hook(lambda x, fi=fi: encode(x)[..., fi], directions[fi],
                                            controls[fi, r].to(directions), intervention, value, scale)
                        lp_i = torch.log_softmax(ref_model.run_with_hooks(tok, fwd_hooks=[(hook, ctrl)]).double()[:, 1:-1], -1)
                        ce_ctrl[fi, ai, r, b0:b0 + len(tok)] = (-lp_i.gather(-1, nxt)[..., 0]).cpu().numpy()
                        kl_ctrl[fi, ai, r, b0:b0 + len(tok)] = (lp_c.exp() * (lp_c - lp_i)).sum(-1).cpu().numpy()
                    continue
                add = definition_hook(lambda r, fi=fi: encode(r)[..., fi], directions[fi], intervention, value, scale)
                intv = ref_model.run_with_hooks(tok, fwd_hooks=[(hook, add)]).double()
                lp_i = torch.log_softmax(intv[:, 1:-1], -1)
                ce_int[fi, ai, b0:b0 + len(tok)] = (-lp_i.gather(-1, nxt)[..., 0]).cpu().numpy()
                kl[fi, ai, b0:b0 + len(tok)] = (lp_c.exp() * (lp_c - lp_i)).sum(-1).cpu().numpy()
                if live is not None:
                    logit_delta = intv[:, 1:-1] - clean[:, 1:-1]
                    logit_delta = logit_delta - logit_delta.mean(-1, keepdim=True)
                    mask = torch.from_numpy(live[fi][b0:b0 + len(tok)]).to(logit_delta.device)
                    delta_sum[fi, ai] += logit_delta[mask].sum(0).cpu().numpy()
    out = {"ce_clean": ce_clean, "ce_int": ce_int, "kl": kl, "acts": acts}
    if controls is not None:
        out.update(ce_int=ce_ctrl, kl=kl_ctrl)
    if live is not None:
        n_live = np.array([m.sum() for m in live], dtype=np.float64)[:, None, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            out["mean_logit_delta"] = np.where(n_live > 0, delta_sum / n_live, math.nan)
    return out


def definition_metrics(ce_clean: np.ndarray, ce_int: np.ndarray, kl: np.ndarray, acts: np.ndarray,
                       live_percentile: float) -> dict[str, float]:
    """Every scalar metric of one variant from docs/method.md, in float64 (arrays [n, t-2]: positions 1 .. T-2)."""
    acts = acts.astype(np.float64)
    thr, live = definition_live(acts, live_percentile)
    d = ce_int - ce_clean
    return {
        "ce_clean": float(ce_clean.mean()),
        "ce_int": float(ce_int.mean()),
        "delta_ce": float(d.mean()),
        "kl": float(kl.mean()),
        "live_threshold": thr,
        "n_live": int(live.sum()),
        "frac_live": float(live.mean()),
        "mean_act_live": float(acts[live].mean()) if live.any() else math.nan,
        "delta_ce_live": float(d[live].mean()) if live.any() else math.nan,
        "kl_live": float(kl[live].mean()) if live.any() else math.nan,
    }


# ---------------------------------------------------------------------------------------------
# comparisons


def metrics_table(ce_clean, ce_int, kl, acts, n_features, n_alphas, live_percentile=90.0) -> np.ndarray:
    """[features, alphas, len(COMPARED)] of every compared metric."""
    out = np.empty((n_features, n_alphas, len(COMPARED)))
    for f in range(n_features):
        live = live_positions(acts[:, 1:-1, f], live_percentile)
        for a in range(n_alphas):
            m = variant_metrics(ce_clean, ce_int[f, a], kl[f, a], acts[:, 1:-1, f], live)
            out[f, a] = [m[k] for k in COMPARED]
    return out


def max_rel_diff(engine: np.ndarray, plain: np.ndarray) -> float:
    worst = 0.0
    for k in range(len(COMPARED)):
        a, b = engine[..., k], plain[..., k]
        ok = ~(np.isnan(a) & np.isnan(b))
        if np.any(np.isnan(a[ok]) | np.isnan(b[ok])):
            return math.inf  # NaN on one side only
        scale = np.max(np.abs(b[ok])) if ok.any() else 0.0
        if scale > 0:
            worst = max(worst, float(np.max(np.abs(a[ok] - b[ok])) / scale))
    return worst


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    both = ~(np.isnan(a) & np.isnan(b))
    return float(np.nanmax(np.abs(a[both] - b[both]))) if both.any() else 0.0


def precision_cost(low: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """How far a low-precision run's metrics are from float32's, metric by metric.

    Relative to each metric's scale in the workload, over the (feature, alpha) entries where both
    are numbers. A metric that is NaN on one side only (a feature that fires in one precision and
    not at all in the other, so it has no live position) is counted, not folded into the maximum.
    """
    per_metric, mismatches = {}, 0
    for k, name in enumerate(COMPARED):
        a, b = low[..., k], ref[..., k]
        one_sided = np.isnan(a) != np.isnan(b)
        mismatches += int(one_sided.sum())
        both = ~(np.isnan(a) | np.isnan(b))
        scale = float(np.max(np.abs(b[both]))) if both.any() else 0.0
        per_metric[name] = float(np.max(np.abs(a[both] - b[both])) / scale) if scale > 0 else 0.0
    return {"max_rel_diff_vs_float32": max(per_metric.values()), "rel_diff_vs_float32": per_metric,
            "nan_mismatches": mismatches}
