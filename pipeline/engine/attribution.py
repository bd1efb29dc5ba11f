"""The attribution screen: a first-order estimate of the `scale` intervention's loss effect for every
feature of every studied layer, from one forward and one backward pass per passage batch.

With the engine's definitions (pipeline.engine.metrics, pipeline.engine.interventions): tokens X [N, T],
X[:, 0] = BOS, scored positions t = 1..T-2 (S = T - 2 per passage, position t predicting X[t+1]), and
`scale` moving the residual x_t at the hook by (alpha - 1) * a_i(x_t) * s_t * d_i at every t >= 1, where
d_i is feature i's direction in the SAE's decode (pipeline.engine.forward.FeatureEncoder's rule) and s_t
the SAE's per-position scale (pipeline.engine.normalization: 1 except for SAEs that normalise their input, where
the splice adds a_i * s_t * d_i: the direction the intervention actually adds). With F the summed CE over the
scored positions and g_t = dF/dx_t,

    slope_i = d delta_ce / d alpha at alpha = 1 = (1 / (N * S)) * sum_{n, t >= 1} a_i(x_t) * s_t * (d_i . g_t)

and the estimate at alpha is (alpha - 1) * slope_i. Position T - 1 is left out of the sum: its logits are
not scored and attention is causal, so g_{T-1} = 0 exactly.

How it is computed (`screen`): per passage batch the model runs block by block from the embedding,
keeping the residual entering each studied block `resume_at` in the autograd graph; F is backpropagated
once and `torch.autograd.grad` returns g at every studied hook together. The unembedding and CE run in
position chunks against a detached copy of the final residual, each chunk's gradient written into one
buffer that the transformer's backward then takes, so GPT-2's 50,257-wide logits never sit in memory for
a whole batch. Per layer the residual is then encoded in position chunks (a 24,576-wide SAE over 200 x 256
tokens is never held whole), and only the firing (position, feature) pairs are contracted with the
gradient: the cost is positions x L0 x d_model, not positions x d_sae x d_model, and never one pass per
feature (`dense_slope_sums` is the plain dense contraction the tests compare it with).

Per feature the screen also counts what a researcher needs to read the slope: `density` (share of scored
positions firing, a != 0), `max_act` (largest |a|), `n_firing`, `mean_act_firing`, and `slope_per_firing`
= slope_sum / n_firing: the change of the corpus's *summed* CE per firing position per unit alpha. The
all-position slope is density x slope_per_firing, so ranking by the slope mostly ranks by how often a
feature fires; slope_per_firing is the density-free reading. Its exact counterpart is the engine's
delta_ce * N * S / n_firing (not delta_ce_live, which averages the CE change *at* live positions rather
than the change caused *by* pushes there).

`second_order_sums` gives, for a handful of features, the curvature v^T H v of F along the feature's whole
push v (double backward, batched over (feature, passage) rows). The estimate
(alpha - 1) * slope + (alpha - 1)^2 / 2 * curvature / (N * S) is the second-order Taylor term. It costs
about as much per feature as the engine's exact sweep, so it cannot screen a dictionary; it is offered to
measure how much of first order's error is curvature (pipeline.engine.screen_check).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from pipeline.core.errors import UserError
from pipeline.engine.forward import device_of, final_residual, residual_at, retry_on_oom, unembed
from pipeline.engine.normalization import position_scale
from pipeline.load.library import check_sae_decoder


@dataclass(frozen=True)
class ScreenLayer:
    """One studied layer: its SAE and the block the forward resumes at after its hook (LayerPlan.resume_at)."""

    layer: int
    sae: Any
    resume_at: int


@dataclass
class ScreenStats:
    batch_size: int
    oom_halvings: int = 0
    batches: int = 0
    firing_pairs: int = 0  # (scored position, feature) pairs contracted, all layers


@dataclass
class LayerScreen:
    """The screen of one layer: per-feature sums over the scored positions of the corpus ([d_sae] arrays)."""

    layer: int
    n_scored: int  # N * S
    slope_sum: np.ndarray  # float64: sum over firing scored positions of a_i * s_t * (d_i . g_t)
    n_firing: np.ndarray  # int64: scored positions with a_i != 0
    act_sum: np.ndarray  # float64: sum of a_i over them (signed)
    max_act: np.ndarray  # float64: largest |a_i| (0 where it never fires)
    passage_slope_sum: np.ndarray | None = None  # float64 [N, d_sae] when asked for (resampling by document)
    ce_clean: float = math.nan  # mean clean CE over the scored positions (a check against the engine's)

    @property
    def d_sae(self) -> int:
        return len(self.slope_sum)

    @property
    def slope(self) -> np.ndarray:
        """d delta_ce / d alpha at alpha = 1."""
        return self.slope_sum / self.n_scored

    @property
    def density(self) -> np.ndarray:
        return self.n_firing / self.n_scored

    @property
    def slope_per_firing(self) -> np.ndarray:
        """The change of the summed CE per firing position per unit alpha (NaN where it never fires)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n_firing > 0, self.slope_sum / np.maximum(self.n_firing, 1), np.nan)

    @property
    def mean_act_firing(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n_firing > 0, self.act_sum / np.maximum(self.n_firing, 1), np.nan)

    def estimate(self, alpha: float) -> np.ndarray:
        """First-order estimate of delta_ce at alpha for every feature."""
        return (alpha - 1.0) * self.slope

    def rank(self) -> np.ndarray:
        """1 for the largest |slope| (the largest estimated effect at any alpha != 1), ties by feature index."""
        order = np.lexsort((np.arange(self.d_sae), -np.abs(self.slope)))
        rank = np.empty(self.d_sae, dtype=np.int64)
        rank[order] = np.arange(1, self.d_sae + 1)
        return rank

    def rank_per_firing(self) -> np.ndarray:
        """1 for the largest |slope_per_firing| among the features that fire (ties by feature index), 0 for a
        feature that never fires (it has no per-firing reading)."""
        firing = np.flatnonzero(self.n_firing > 0)
        order = firing[np.lexsort((firing, -np.abs(self.slope_per_firing[firing])))]
        rank = np.zeros(self.d_sae, dtype=np.int64)
        rank[order] = np.arange(1, len(order) + 1)
        return rank

    def table(self, alpha: float, verified: dict[int, str] | None = None):
        """One row per SAE feature: the columns of metrics/screen/layer_L.csv (pipeline.core.columns.SCREEN_COLUMNS),
        the estimate at `alpha`; `verified` maps the features run exactly to their group (top, random)."""
        import pandas as pd

        groups = np.full(self.d_sae, "", dtype=object)
        for feature, group in (verified or {}).items():
            groups[feature] = group
        return pd.DataFrame({
            "layer": self.layer,
            "feature": np.arange(self.d_sae),
            "density": self.density,
            "n_firing": self.n_firing,
            "max_act": self.max_act,
            "mean_act_firing": self.mean_act_firing,
            "slope_delta_ce": self.slope,
            "slope_per_firing": self.slope_per_firing,
            "alpha": alpha,
            "est_delta_ce": self.estimate(alpha),
            "rank": self.rank(),
            "rank_per_firing": self.rank_per_firing(),
            "verified": groups,
        })


def feature_directions(sae) -> Float[Tensor, "d_sae d_in"]:
    """Every feature's direction d_i in the SAE's decode, by FeatureEncoder's rule: W_dec[i], divided by
    ||W_dec[i]|| for a (Abs)TopK SAE with rescale_acts_by_decoder_norm."""
    directions = sae.W_dec.detach()
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        directions = directions * (1 / directions.norm(dim=-1, keepdim=True))
    return directions


def _check_layer(spec: ScreenLayer) -> None:
    sae = spec.sae
    name = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None) or f"of layer {spec.layer}"
    check_sae_decoder(sae, name)


def push_scale(sae, x: Float[Tensor, "rows d_in"]) -> Float[Tensor, " rows"] | None:
    """s_t of each residual row (pipeline.engine.normalization, from the row in the SAE's dtype, as SAE-Lens reads
    it), or None where the SAE does not normalise (s_t = 1)."""
    if (getattr(sae.cfg, "normalize_activations", None) or "none") == "none":
        return None
    return position_scale(sae.cfg, x.to(sae.W_dec.dtype))


def _contraction_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


class _Accumulator:
    """One layer's running sums on the device; `add` takes one passage batch's hook residual and gradient."""

    def __init__(self, spec: ScreenLayer, n_passages: int, s_len: int, device: torch.device, by_passage: bool,
                 chunk_elems: int):
        self.spec, self.s_len, self.chunk_elems = spec, s_len, chunk_elems
        self.d_sae = int(spec.sae.W_dec.shape[0])
        self.acc = torch.float32 if device.type == "mps" else torch.float64
        self.directions = feature_directions(spec.sae)
        self.slope_sum = torch.zeros(self.d_sae, dtype=self.acc, device=device)
        self.act_sum = torch.zeros(self.d_sae, dtype=self.acc, device=device)
        self.n_firing = torch.zeros(self.d_sae, dtype=torch.long, device=device)
        self.max_act = torch.zeros(self.d_sae, dtype=torch.float32, device=device)
        self.passage = torch.zeros((n_passages, self.d_sae), dtype=self.acc, device=device) if by_passage else None

    @torch.no_grad()
    def add(self, resid: Float[Tensor, "bp pos d"], grad: Float[Tensor, "bp pos d"], p0: int) -> int:
        """Add passages p0.. of one batch; returns the number of firing pairs contracted."""
        d = resid.shape[-1]
        x_rows = resid[:, 1:-1].reshape(-1, d)
        ctype = _contraction_dtype(grad.dtype, self.directions.dtype)
        g_rows = grad[:, 1:-1].reshape(-1, d).to(ctype)
        directions = self.directions.to(ctype)
        rows_per_chunk = max(1, self.chunk_elems // self.d_sae)
        pairs_per_chunk = max(1, self.chunk_elems // d)
        pairs = 0
        for r0 in range(0, x_rows.shape[0], rows_per_chunk):
            x = x_rows[r0:r0 + rows_per_chunk]
            acts = self.spec.sae.encode(x)  # [rows, d_sae]
            self.max_act = torch.maximum(self.max_act, acts.abs().amax(0).float())
            row, feat = acts.nonzero(as_tuple=True)
            vals = acts[row, feat].to(ctype)
            scale = push_scale(self.spec.sae, x)
            if scale is not None:
                vals = vals * scale.to(ctype)[row]
            pairs += len(row)
            for q0 in range(0, len(row), pairs_per_chunk):  # bounded [pairs, d] gathers
                r, f = row[q0:q0 + pairs_per_chunk], feat[q0:q0 + pairs_per_chunk]
                contrib = vals[q0:q0 + pairs_per_chunk] * (directions[f] * g_rows[r0 + r]).sum(-1)
                self.slope_sum.index_add_(0, f, contrib.to(self.acc))
                if self.passage is not None:
                    passage = p0 + (r0 + r) // self.s_len
                    self.passage.view(-1).index_add_(0, passage * self.d_sae + f, contrib.to(self.acc))
            self.act_sum.index_add_(0, feat, acts[row, feat].to(self.acc))
            self.n_firing += torch.bincount(feat, minlength=self.d_sae)
        return pairs

    def result(self, n_scored: int, ce_clean: float) -> LayerScreen:
        return LayerScreen(
            layer=self.spec.layer, n_scored=n_scored, slope_sum=self.slope_sum.double().cpu().numpy(),
            n_firing=self.n_firing.cpu().numpy().astype(np.int64), act_sum=self.act_sum.double().cpu().numpy(),
            max_act=self.max_act.double().cpu().numpy(), ce_clean=ce_clean,
            passage_slope_sum=None if self.passage is None else self.passage.double().cpu().numpy())


def scored_ce_gradients(model, tokens: Int[Tensor, "bp pos"], resume_ats: list[int], chunk_elems: int = 1 << 26
                        ) -> tuple[dict[int, Tensor], dict[int, Tensor], float]:
    """One forward and one backward pass: the residual entering each block in `resume_ats` and the gradient of
    the summed CE over the scored positions with respect to it (both detached), and that summed CE.

    The residual before the first studied block is computed without a graph; from there the model runs
    segment by segment (`start_at_layer` / `stop_at_layer`) so each studied residual is a node of one graph."""
    stops = sorted(set(resume_ats))
    with torch.no_grad():
        x = residual_at(model, tokens, stops[0])
    x = x.detach().requires_grad_(True)
    hooks = {stops[0]: x}
    for prev, nxt in zip(stops, stops[1:], strict=False):
        x = model(x, start_at_layer=prev, stop_at_layer=nxt)
        hooks[nxt] = x
    final = final_residual(model, x, stops[-1])
    # the loss through the unembedding in position chunks, against a detached copy: its gradient goes into one
    # buffer, so the [rows, d_vocab] logits of only one chunk exist at a time
    bp, t_len, d_model = final.shape
    scored = final.detach()[:, 1:-1].reshape(-1, d_model)
    targets = tokens[:, 2:].reshape(-1).to(scored.device)
    grad_scored = torch.empty_like(scored)
    chunk = max(1, chunk_elems // model.cfg.d_vocab)
    total = 0.0
    for r0 in range(0, scored.shape[0], chunk):
        piece = scored[r0:r0 + chunk].clone().requires_grad_(True)
        logits = unembed(model, piece)
        loss = torch.nn.functional.cross_entropy(logits, targets[r0:r0 + chunk], reduction="sum")
        (grad_scored[r0:r0 + chunk],) = torch.autograd.grad(loss, piece)
        total += float(loss.detach())
    grad_final = torch.zeros_like(final)
    grad_final[:, 1:-1] = grad_scored.view(bp, t_len - 2, d_model)
    grads = torch.autograd.grad(final, [hooks[k] for k in stops], grad_outputs=grad_final)
    return ({k: hooks[k].detach() for k in stops}, dict(zip(stops, grads, strict=True)), total)


@dataclass
class ScreenResult:
    layers: dict[int, LayerScreen]
    stats: ScreenStats = field(default_factory=lambda: ScreenStats(0))


@torch.inference_mode(False)
@torch.enable_grad()
def screen(model, layers: list[ScreenLayer], tokens: Int[Tensor, "n_passages pos"], *, batch_size: int = 8,
           chunk_elems: int = 1 << 26, by_passage: bool = False,
           progress: Callable[[int], None] | None = None) -> ScreenResult:
    """The screen of every feature of every layer in `layers` over `tokens` (see the module docstring).

    `model` is a HookedTransformer or ProcessedTransformer whose weights are not inference tensors (loaded
    outside `torch.inference_mode`); `batch_size` passages share one forward and backward pass (halved on
    out-of-memory); `chunk_elems` bounds the elements of the logits, activations and gathers held at once;
    `by_passage` also keeps per-passage slope sums [N, d_sae] (for resampling by document); `progress` is
    called with the number of passages done."""
    if not layers:
        raise ValueError("no layers to screen")
    if len({spec.layer for spec in layers}) != len(layers):
        raise ValueError("each layer may be screened once")
    for spec in layers:
        _check_layer(spec)
    tokens = tokens.long().cpu()
    n, t_len = tokens.shape
    if t_len < 3:
        raise UserError(f"passages of {t_len} tokens have no scored positions; max_len must be >= 3")
    device = device_of(model)
    accs = {spec.layer: _Accumulator(spec, n, t_len - 2, device, by_passage, chunk_elems) for spec in layers}
    stats = ScreenStats(batch_size=batch_size)
    done = {"passages": 0, "ce": 0.0}

    def run(bs: int) -> None:
        while done["passages"] < n:
            p0 = done["passages"]
            p1 = min(p0 + bs, n)
            resids, grads, ce = scored_ce_gradients(model, tokens[p0:p1].to(device),
                                                    [spec.resume_at for spec in layers], chunk_elems)
            # contract only once the batch's pass has succeeded, so an out-of-memory retry never adds twice
            for spec in layers:
                stats.firing_pairs += accs[spec.layer].add(resids[spec.resume_at], grads[spec.resume_at], p0)
            done["passages"], done["ce"] = p1, done["ce"] + ce
            stats.batches += 1
            if progress is not None:
                progress(p1 - p0)

    retry_on_oom(run, stats, "the attribution screen")
    n_scored = n * (t_len - 2)
    return ScreenResult(layers={k: acc.result(n_scored, done["ce"] / n_scored) for k, acc in accs.items()},
                        stats=stats)


@torch.inference_mode(False)
@torch.enable_grad()
def forward_backward(model, tokens: Int[Tensor, "n_passages pos"], *, batch_size: int = 8,
                     chunk_elems: int = 1 << 26) -> float:
    """The screen's floor: the same forward and backward passes (from block 0, the summed scored CE
    backpropagated to the embedding), with no SAE and no contraction. Returns the mean scored CE."""
    tokens = tokens.long().cpu()
    device = device_of(model)
    total = 0.0
    for p0 in range(0, len(tokens), batch_size):
        _, _, ce = scored_ce_gradients(model, tokens[p0:p0 + batch_size].to(device), [0], chunk_elems)
        total += ce
    return total / (tokens.shape[0] * (tokens.shape[1] - 2))


@torch.no_grad()
def dense_slope_sums(sae, resid: Float[Tensor, "n pos d"], grad: Float[Tensor, "n pos d"]) -> Tensor:
    """The plain way, for tests: every feature's slope sum from the dense activations [rows, d_sae] and the dense
    projections of the gradient on every direction, summed over the scored positions."""
    d = resid.shape[-1]
    x = resid[:, 1:-1].reshape(-1, d)
    g = grad[:, 1:-1].reshape(-1, d).double()
    acts = sae.encode(x).double()
    scale = push_scale(sae, x)
    if scale is not None:
        acts = acts * scale.double()[:, None]
    return (acts * (g @ feature_directions(sae).double().T)).sum(0)


# ---- second order: curvature along a feature's push, for a few features -------------------------


def _summed_scored_ce(model, resume_at: int, x: Tensor, targets: Tensor) -> Tensor:
    """x [rows, T, d] at the hook -> per-row summed CE over the scored positions [rows]."""
    logits = unembed(model, final_residual(model, x, resume_at)[:, 1:-1])
    return (torch.logsumexp(logits, -1) - logits.gather(-1, targets[..., None])[..., 0]).sum(-1)


@torch.inference_mode(False)
def second_order_sums(model, sae, resume_at: int, tokens: Int[Tensor, "n_passages pos"], features: list[int], *,
                      batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(first, curvature) per feature, float64 [len(features)]: the directional derivatives sum_p v_p . grad F_p
    and sum_p v_p^T H_p v_p of each passage's summed scored CE F_p along the feature's push v_p = a_i(x_t) s_t d_i
    (t >= 1) at the hook, over the passages where it fires. `first` equals the screen's slope_sum (a check).

    Reverse over reverse (the gradient with its graph, then the gradient of v . grad F), (feature, passage)
    rows batched `batch_size` at a time: about five forward passes' work per row. (Forward over forward,
    torch.func.jvp twice, gave the same numbers ten times slower on CPU here.)"""
    device = device_of(model)
    tokens = tokens.long().cpu()
    with torch.no_grad():
        directions = feature_directions(sae)[features]
        resid = torch.cat([residual_at(model, tokens[p:p + batch_size].to(device), resume_at)
                           for p in range(0, len(tokens), batch_size)])
        acts = torch.cat([sae.encode(resid[p:p + batch_size])[..., features]
                          for p in range(0, len(tokens), batch_size)])  # [N, T, F]
        scale = push_scale(sae, resid.reshape(-1, resid.shape[-1]))
        if scale is not None:
            acts = acts * scale.view(resid.shape[:2])[..., None].to(acts.dtype)
        acts[:, 0] = 0  # never BOS
        acts[:, -1] = 0  # unscored and causally inert
        firing = acts.ne(0).any(1)  # [N, F]
    rows = [(fi, p) for fi in range(len(features)) for p in torch.nonzero(firing[:, fi]).flatten().tolist()]
    first, curvature = np.zeros(len(features)), np.zeros(len(features))
    targets_all = tokens[:, 2:].to(device)
    for r0 in range(0, len(rows), batch_size):
        fi, p = (torch.tensor(col, device=device) for col in zip(*rows[r0:r0 + batch_size], strict=True))
        x = resid[p].clone().requires_grad_(True)
        v = (acts[p, :, fi][..., None] * directions[fi][:, None, :]).to(x.dtype)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(_summed_scored_ce(model, resume_at, x, targets_all[p]).sum(), x,
                                          create_graph=True)
            d1 = (grad * v).sum((1, 2))  # rows are independent passages: per-row directional derivatives
            (hv,) = torch.autograd.grad(d1.sum(), x)
        d2 = (hv * v).sum((1, 2))
        np.add.at(first, fi.cpu().numpy(), d1.detach().double().cpu().numpy())
        np.add.at(curvature, fi.cpu().numpy(), d2.double().cpu().numpy())
    return first, curvature
