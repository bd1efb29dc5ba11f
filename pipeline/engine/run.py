"""The engine: every (feature, value) variant of one layer over a token set, with exact shortcuts.

The plain way runs one full forward pass per (feature, value) with the SAE spliced in. This
computes the same numbers with less work, each shortcut exact (tests/engine/test_engine_exact.py):

1. Prefix once: the residual at the hook is computed once per passage and cached; every variant
   resumes from it (`start_at_layer`), so blocks before the hook never run again.
2. Clean suffix once per passage block; its log-probabilities serve every variant's KL and CE.
3. Many variants per forward: rows of different (value, control draw, passage) of a feature share one
   batch (never two features' rows: see `_per_feature_batches`).
4. Nothing to do where nothing changes: a value equal to the intervention's identity (alpha = 1)
   needs no forward; a passage where the feature never fires (t >= 1) is the clean model's; and
   in a changed passage, positions before the first change are unchanged (causal attention), so
   their logits are not recomputed.
5. One encoder column per feature for column-separable SAEs (pipeline.engine.forward).
6. Each row is scored against its own passage's clean log-probs through views, never a gathered
   [positions x vocab] copy; logits come in position chunks of at most `chunk_elems` floats, so
   memory stays bounded; the unembedding weight is laid out once (pipeline.engine.forward).

Rows and positions skipped by (4) keep ce_int = ce_clean and kl = 0 exactly; a forward pass would
give those values up to float rounding. `shortcuts=False` turns (4) off for tests and benchmarks.

An SAE that normalises its input moves the residual by delta_t = c_t * s_t * d_i (pipeline.engine.normalization);
s_t is computed once per passage in the prefix step, from the residual in the SAE's dtype, and every row's delta
carries it.

Random-direction controls (`controls`, unit vectors u [n_feat, n_draws, d_model]): for each
(feature, value) and draw r, a control row adds ||delta_t|| * u[f, r] where the feature's row adds
delta_t, so the same positions get a push of the same norm along a direction unrelated to the model.
Control rows are rows like any other (same batches, same shortcuts: the feature's delta is zero
exactly where the control's is).

Precision: logits are float32 (the model's); log-softmax, CE and KL are computed from them in
float64, KL as sum_v p_clean * (d + expm1(-d)) with d = log p_clean - log p_int, a sum of terms that
are each >= 0 (clamped at 0 against rounding), so no position's KL is negative.

`run_layer` runs the steps of a `_LayerRun`, which holds the buffers (cached prefix residuals, live
masks, results): `prefix` (1), then per passage block `clean_block` (2), `variant_rows` (4), `run_rows`
(3) with `score_positions` (6), and `commit`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Bool, Float, Float32, Float64, Int
from torch import Tensor

from pipeline.core.errors import UserError
from pipeline.engine.forward import FeatureEncoder, final_residual, is_oom, residual_at, scaled, unembed
from pipeline.engine.interventions import SCALE, Intervention
from pipeline.engine.metrics import LiveSet, live_positions

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    batch_size: int
    oom_halvings: int = 0
    prefix_calls: int = 0
    suffix_calls: int = 0  # batched suffix forwards, clean ones included
    rows_total: int = 0  # variant rows = features x values x passages
    rows_run: int = 0  # rows that needed a forward pass
    positions_unembedded: int = 0  # intervened (row, position) pairs whose logits were computed


@dataclass
class LayerResult:
    """Per-position results for every variant of one layer (scored positions t = 1..T-2)."""

    features: list[int]
    values: list[float]
    acts: Float32[np.ndarray, "n_passages pos n_feat"]  # clean activations at the hook, every position
    ce_clean: Float64[np.ndarray, "n_passages scored"]
    ce_int: Float64[np.ndarray, "n_feat n_values n_passages scored"]
    kl: Float64[np.ndarray, "n_feat n_values n_passages scored"]
    live: list[LiveSet]  # per feature, masks [n_passages, scored]
    delta_sum: Float64[np.ndarray, "n_feat n_values d_vocab"]  # sum over live positions of centred logit deltas
    resid_norm: Float32[np.ndarray, "n_passages pos"]  # ||x_t|| of the clean residual at the hook
    # s_t, the SAE's per-position scale (delta_t = c_t s_t d_i; pipeline.engine.normalization): 1 without normalisation
    scale: Float32[np.ndarray, "n_passages pos"]
    # random-direction controls (n_draws = 0: none)
    ctrl_ce_int: Float64[np.ndarray, "n_feat n_values n_draws n_passages scored"]
    ctrl_kl: Float64[np.ndarray, "n_feat n_values n_draws n_passages scored"]
    stats: EngineStats = field(default_factory=lambda: EngineStats(0))

    def acts_scored(self, f: int) -> Float32[np.ndarray, "n_passages scored"]:
        return self.acts[:, 1:-1, f]

    def mean_delta(self, f: int, a: int) -> Float64[np.ndarray, " d_vocab"]:
        n_live = int(self.live[f].mask.sum())
        return self.delta_sum[f, a] / n_live if n_live else np.full(self.delta_sum.shape[-1], np.nan)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _retry_on_oom(fn: Callable[[int], None], stats: EngineStats, what: str) -> None:
    """Run fn(batch_size); on out-of-memory halve the batch size and run it again."""
    while True:
        try:
            fn(stats.batch_size)
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


# (feature, value index, variant: 0 the feature itself, r >= 1 control draw r - 1, passage in block, first position t0
# to score)
Row = tuple[int, int, int, int, int]


def _per_feature_batches(rows: list[Row], bs: int) -> list[list[Row]]:
    """The rows in batches of at most bs, a batch never holding two features' rows (rows come feature by
    feature). So each feature's forwards see the same batches whichever other features run beside it, and
    a run over a block of features gives bit for bit its part of the run over all of them (CPU BLAS rounds
    a row differently in a batch of another height; pipeline/shards/intervene.py, tests/stages/test_shards_exact.py)."""
    batches: list[list[Row]] = []
    start = 0
    for end in range(1, len(rows) + 1):
        if end == len(rows) or rows[end][0] != rows[start][0] or end - start == bs:
            batches.append(rows[start:end])
            start = end
    return batches


@dataclass
class _Block:
    """Passages b0..b1-1: their clean distributions, and the variant results being built on the device."""

    b0: int
    b1: int
    targets: Int[Tensor, "bp scored"]  # next token of scored positions t = 1..T-2
    logits_clean: Float32[Tensor, "bp scored d_vocab"]
    lse_clean: Float64[Tensor, "bp scored"]  # logsumexp of the clean logits, float64
    ce_clean: Float64[Tensor, "bp scored"]
    ce_int: Float64[Tensor, "n_feat n_values n_variants bp scored"]  # starts as ce_clean: skipped rows keep it
    kl: Float64[Tensor, "n_feat n_values n_variants bp scored"]  # starts at 0: skipped rows keep it
    delta: Float[Tensor, "n_variants d_vocab"]  # row f * n_values + a


class _LayerRun:
    """One run_layer call: its inputs, the buffers it fills, and the steps that fill them."""

    def __init__(self, model, sae, resume_at: int, tokens: Int[Tensor, "n_passages pos"], features: list[int],
                 values: list[float], intervention: Intervention, batch_size: int, live_percentile: float,
                 shortcuts: bool, chunk_elems: int, progress: Callable[[int], None] | None,
                 controls: Tensor | None = None, encoder: FeatureEncoder | None = None):
        self.model, self.resume_at, self.intervention = model, resume_at, intervention
        self.features, self.values = features, values
        self.live_percentile, self.shortcuts, self.progress = live_percentile, shortcuts, progress
        self.device = _device_of(model)
        self.tokens = tokens.long().cpu()
        self.n, t_len = self.tokens.shape
        if t_len < 3:
            raise UserError(f"passages of {t_len} tokens have no scored positions; max_len must be >= 3")
        self.s_len = t_len - 2
        self.n_feat, self.n_val, self.d_vocab = len(features), len(values), model.cfg.d_vocab
        self.encoder = FeatureEncoder(sae, features) if encoder is None else encoder
        self.directions: Float[Tensor, "n_feat d_in"] = self.encoder.directions
        self.n_draws = 0 if controls is None else int(controls.shape[1])
        if controls is not None and tuple(controls.shape) != (self.n_feat, self.n_draws, self.directions.shape[-1]):
            raise ValueError(f"controls must be [n_feat, n_draws, d_in], got {tuple(controls.shape)}")
        # [n_feat, 1 + n_draws, d_in]: slot 0 unused (the feature's own row), then the control directions
        self.controls = None if controls is None else torch.cat(
            [torch.zeros_like(self.directions)[:, None], controls.to(self.directions)], dim=1)
        self.n_variants = 1 + self.n_draws
        self.stats = EngineStats(batch_size=batch_size, rows_total=self.n_feat * self.n_val * self.n_variants * self.n)
        self.chunk_tokens = max(1, chunk_elems // self.d_vocab)
        self.resid_all: Float[Tensor, "n_passages pos d_model"] = torch.empty(
            (self.n, t_len, model.cfg.d_model), dtype=model.cfg.dtype, device=self.device)
        self.acts_all: Float[Tensor, "n_passages pos n_feat"] = torch.empty(
            (self.n, t_len, self.n_feat), dtype=torch.float32, device=self.device)
        self.resid_norm: Float[Tensor, "n_passages pos"] = torch.empty((self.n, t_len), dtype=torch.float32,
                                                                       device=self.device)
        # s_t in the SAE's dtype, as the deltas use it (None: the SAE does not normalise, s_t = 1)
        self.scale_all: Float[Tensor, "n_passages pos"] | None = None if not self.encoder.normalizes else torch.empty(
            (self.n, t_len), dtype=self.directions.dtype, device=self.device)
        self.prefix_done = self.blocks_done = 0  # passages cached / committed: an OOM retry resumes there

    def prefix(self, bs: int) -> None:
        """Step 1: the residual at the hook, cached for every variant to resume from, and the activations."""
        while self.prefix_done < self.n:
            stop = min(self.prefix_done + bs, self.n)
            resid = residual_at(self.model, self.tokens[self.prefix_done:stop].to(self.device), self.resume_at)
            self.resid_all[self.prefix_done:stop] = resid
            self.acts_all[self.prefix_done:stop] = self.encoder(resid).float()
            self.resid_norm[self.prefix_done:stop] = resid.float().norm(dim=-1)
            if self.scale_all is not None:
                self.scale_all[self.prefix_done:stop] = self.encoder.scale(resid)
            self.stats.prefix_calls += 1
            self.prefix_done = stop

    def start_scoring(self) -> None:
        """After the prefix: each feature's live positions, and the result arrays the blocks fill in."""
        self.acts_np = self.acts_all.cpu().numpy()
        self.live = [live_positions(self.acts_np[:, 1:-1, f], self.live_percentile) for f in range(self.n_feat)]
        live_np: Bool[np.ndarray, "n_feat n_passages scored"] = np.stack([lv.mask for lv in self.live])
        shape = (self.n_feat, self.n_val, self.n_variants, self.n, self.s_len)
        self.ce_clean, self.ce_int, self.kl = np.empty((self.n, self.s_len)), np.empty(shape), np.zeros(shape)
        self.acc_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.delta_sum = torch.zeros((self.n_feat * self.n_val, self.d_vocab), dtype=self.acc_dtype,
                                     device=self.device)
        self.values_dev = torch.tensor(self.values, dtype=self.directions.dtype, device=self.device)
        # 1.0 = live: delta sums are a mask times the rows, so no index list goes to the device
        self.live_dev = torch.from_numpy(live_np).to(device=self.device, dtype=torch.float32)

    def logits(self, final_rows: Float[Tensor, "rows d_model"]) -> Float32[Tensor, "rows d_vocab"]:
        return unembed(self.model, final_rows)

    def clean_block(self, b0: int, b1: int) -> _Block:
        """Step 2: the clean suffix of passages b0..b1-1, once; its logits serve every variant. They go
        through the computation (and chunking) of a row scored from t = 1, so an unchanged row is them bit for bit."""
        bp, s_len, d_vocab = b1 - b0, self.s_len, self.d_vocab
        targets = self.tokens[b0:b1].to(self.device)[:, 2:]
        final_c = final_residual(self.model, self.resid_all[b0:b1], self.resume_at)
        self.stats.suffix_calls += 1
        logits_c = torch.empty((bp, s_len, d_vocab), dtype=torch.float32, device=self.device)
        for j in range(bp):
            for s0 in range(0, s_len, self.chunk_tokens):
                s1 = min(s0 + self.chunk_tokens, s_len)
                logits_c[j, s0:s1] = self.logits(final_c[j, s0 + 1:s1 + 1])
        lse_c = torch.empty((bp, s_len), dtype=torch.float64, device=self.device)
        ce_c = torch.empty((bp, s_len), dtype=torch.float64, device=self.device)
        for j in range(bp):
            for s0 in range(0, s_len, self.chunk_tokens):
                s1 = min(s0 + self.chunk_tokens, s_len)
                z = logits_c[j, s0:s1].double()
                lse_c[j, s0:s1] = torch.logsumexp(z, -1)
                ce_c[j, s0:s1] = lse_c[j, s0:s1] - z.gather(1, targets[j, s0:s1, None]).squeeze(1)
        n_var = self.n_variants
        return _Block(
            b0=b0, b1=b1, targets=targets, logits_clean=logits_c, lse_clean=lse_c, ce_clean=ce_c,
            ce_int=ce_c[None, None, None].expand(self.n_feat, self.n_val, n_var, bp, s_len).clone(),
            kl=torch.zeros((self.n_feat, self.n_val, n_var, bp, s_len), dtype=torch.float64, device=self.device),
            delta=torch.zeros_like(self.delta_sum))

    def variant_rows(self, blk: _Block) -> list[Row]:
        """Step 4: the (feature, value, passage) rows of the block that change something.

        With shortcuts, a value equal to the intervention's identity and a passage it changes nowhere get
        no row, and a row is scored from its first changed position t0 on (causal attention leaves the
        earlier ones clean); without, every row gets one, scored from t0 = 1."""
        acts_blk = self.acts_all[blk.b0:blk.b1]  # [bp, T, F]
        identity = self.intervention.identity
        rows: list[Row] = []
        for f in range(self.n_feat):
            for a, value in enumerate(self.values):
                if self.shortcuts and identity is not None and value == identity:
                    continue
                changed = self.intervention.changes(acts_blk[:, :, f], value).cpu().numpy()  # [bp, T], one copy
                any_change = changed.any(axis=1)
                first = changed.argmax(axis=1)  # first changed position (t >= 1: BOS never changes)
                for j in range(blk.b1 - blk.b0):
                    if self.shortcuts and not any_change[j]:
                        continue
                    for v in range(self.n_variants):
                        rows.append((f, a, v, j, int(first[j]) if self.shortcuts else 1))
        return rows

    def run_rows(self, blk: _Block, rows: list[Row], bs: int) -> None:
        """Step 3: the rows' suffix forwards, bs rows of one feature's (value, variant, passage) per batch.

        Each row resumes from its passage's cached residual plus the intervention's delta (a control row:
        the delta's norm along its random direction), and is scored at t in [t0, T-2], in position chunks,
        against its own passage's clean distributions."""
        acts_blk = self.acts_all[blk.b0:blk.b1]
        for batch in _per_feature_batches(rows, bs):
            rf, ra, rv, rj = (torch.tensor(col, device=self.device) for col in list(zip(*batch, strict=True))[:4])
            x = self.resid_all[blk.b0 + rj]  # [R, T, d]
            delta = self.intervention.delta(acts_blk[rj, :, rf].to(self.directions.dtype),
                                            self.directions[rf][:, None, :], self.values_dev[ra][:, None])
            delta = scaled(delta, None if self.scale_all is None else self.scale_all[blk.b0 + rj])
            if self.controls is not None:
                ctrl = delta.norm(dim=-1, keepdim=True) * self.controls[rf, rv][:, None, :]
                delta = torch.where((rv > 0)[:, None, None], ctrl, delta)
            final = final_residual(self.model, x + delta.to(x.dtype), self.resume_at)
            self.stats.suffix_calls += 1
            for r, (f, a, v, j, t0) in enumerate(batch):
                for s0 in range(t0 - 1, self.s_len, self.chunk_tokens):
                    s1 = min(s0 + self.chunk_tokens, self.s_len)
                    self.score_positions(blk, final[r, s0 + 1:s1 + 1], f, a, v, j, s0, s1)

    def score_positions(self, blk: _Block, final_rows: Float[Tensor, "chunk d_model"], f: int, a: int, v: int,
                        j: int, s0: int, s1: int) -> None:
        """Step 6: CE, KL (float64) and, for the feature's own row, live logit deltas at scored positions s0..s1-1.

        The clean block is sliced, a view: no [positions x vocab] gather is ever copied."""
        z_i = self.logits(final_rows)  # float32 [s1 - s0, V]
        z_c = blk.logits_clean[j, s0:s1]
        lse_i = torch.logsumexp(z_i.double(), -1)
        blk.ce_int[f, a, v, j, s0:s1] = lse_i - z_i.gather(1, blk.targets[j, s0:s1, None]).squeeze(1).double()
        lp_c = z_c.double().sub_(blk.lse_clean[j, s0:s1, None])
        d = z_i.double().sub_(lse_i[:, None]).neg_().add_(lp_c)  # log p_clean - log p_int
        # p_clean * (d - 1 + exp(-d)) >= 0 term by term; its sum is KL(p_clean || p_int) since both sum to 1
        blk.kl[f, a, v, j, s0:s1] = (d + torch.expm1(-d)).clamp_min_(0).mul_(lp_c.exp_()).sum(-1)
        self.stats.positions_unembedded += s1 - s0
        if v:
            return
        # Sum of the centred logit deltas over live positions, as a 0/1 mask times the rows: no index list
        # to copy to the device, so no host-device synchronisation per row.
        diff = z_i.sub_(z_c)
        diff.sub_(diff.mean(-1, keepdim=True))
        blk.delta[f * self.n_val + a] += (self.live_dev[f, blk.b0 + j, s0:s1] @ diff).to(self.acc_dtype)

    def commit(self, blk: _Block, n_rows: int) -> None:
        """Copy a finished block into the results; only now, so an OOM retry redoes the block whole."""
        self.ce_clean[blk.b0:blk.b1] = blk.ce_clean.cpu().numpy()
        self.ce_int[:, :, :, blk.b0:blk.b1] = blk.ce_int.cpu().numpy()
        self.kl[:, :, :, blk.b0:blk.b1] = blk.kl.cpu().numpy()
        self.delta_sum.add_(blk.delta)
        self.stats.rows_run += n_rows
        if self.progress is not None:
            self.progress(self.n_feat * self.n_val * self.n_variants * (blk.b1 - blk.b0))

    def blocks(self, bs: int) -> None:
        """Every passage block not yet committed, bs passages (and bs variant rows per forward) at a time."""
        while self.blocks_done < self.n:
            blk = self.clean_block(self.blocks_done, min(self.blocks_done + bs, self.n))
            rows = self.variant_rows(blk)
            self.run_rows(blk, rows, bs)
            self.commit(blk, len(rows))
            self.blocks_done = blk.b1

    def _scale_np(self) -> Float32[np.ndarray, "n_passages pos"]:
        if self.scale_all is None:
            return np.ones((self.n, self.s_len + 2), dtype=np.float32)
        return self.scale_all.float().cpu().numpy()

    def result(self) -> LayerResult:
        """The committed results, delta sums as float64 [F, A, V] on the host."""
        delta_sum = self.delta_sum.double().cpu().numpy().reshape(self.n_feat, self.n_val, self.d_vocab)
        return LayerResult(features=list(self.features), values=list(self.values), acts=self.acts_np,
                           ce_clean=self.ce_clean, ce_int=self.ce_int[:, :, 0], kl=self.kl[:, :, 0], live=self.live,
                           delta_sum=delta_sum, resid_norm=self.resid_norm.cpu().numpy(), scale=self._scale_np(),
                           ctrl_ce_int=self.ce_int[:, :, 1:], ctrl_kl=self.kl[:, :, 1:], stats=self.stats)


@torch.inference_mode()
def run_layer(
    model,
    sae,
    resume_at: int,
    tokens: Int[Tensor, "n_passages pos"],
    features: list[int],
    values: list[float],
    *,
    intervention: Intervention = SCALE,
    batch_size: int = 16,
    live_percentile: float = 90.0,
    shortcuts: bool = True,
    chunk_elems: int = 1 << 26,
    progress: Callable[[int], None] | None = None,
    controls: Float[Tensor, "n_feat n_draws d_in"] | None = None,
    encoder: FeatureEncoder | None = None,
) -> LayerResult:
    """Run every (feature, value) variant at the hook before block `resume_at`, and with `controls` (unit
    vectors, see pipeline.engine.controls) every random-direction control of each. `encoder` gives the
    features' activations and directions (default: FeatureEncoder(sae, features)); a block of a layer's
    features passes its columns of the layer's encoder, so activations round as in the whole layer's run."""
    run = _LayerRun(model, sae, resume_at, tokens, features, values, intervention, batch_size, live_percentile,
                    shortcuts, chunk_elems, progress, controls, encoder)
    _retry_on_oom(run.prefix, run.stats, "the prefix pass")
    run.start_scoring()
    _retry_on_oom(run.blocks, run.stats, "the intervention passes")
    return run.result()
