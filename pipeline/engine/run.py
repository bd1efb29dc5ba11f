"""The engine: every (feature, value) variant of one layer over a token set, with exact shortcuts.

The plain way runs one full forward pass per (feature, value) with the SAE spliced in. This
computes the same numbers with less work, each shortcut exact (tests/engine/test_engine_exact.py):

1. Prefix once: the residual at the hook is computed once per passage and cached; every variant
   resumes from it (`start_at_layer`), so blocks before the hook never run again.
2. Clean suffix once per passage block; its CE, and its probabilities where a row is scored, serve
   every variant's KL and CE.
3. Many variants per forward: rows of different (value, control draw, passage) of a feature share one
   batch (never two features' rows: see `_per_feature_batches`).
4. Nothing to do where nothing changes: a value equal to the intervention's identity (alpha = 1)
   needs no forward; a passage where the feature never fires (t >= 1) is the clean model's; and
   in a changed passage, positions before the first change are unchanged (causal attention), so
   their logits are not recomputed.
5. One encoder column per feature for column-separable SAEs (pipeline.engine.forward).
6. Each row is scored against its own passage's clean distribution through views, never a gathered
   [positions x vocab] copy; logits come in position chunks of at most `chunk_elems` floats, into
   buffers allocated once, so memory stays bounded, whose rows start on 64-byte boundaries
   (pipeline.engine.divergence.aligned_rows: a third faster to write for GPT-2's odd vocabulary size, the
   same bits); the unembedding weight is laid out once
   (pipeline.engine.forward). For a float32 model the rows unembed the change of their final
   residual, (h_int - h_clean) W_U, which is what the scoring needs, and the chunks of several
   rows of one feature share one unembedding call (pipeline.engine.segments).

Rows and positions skipped by (4) keep ce_int = ce_clean and kl = 0 exactly; a forward pass would
give those values up to float rounding. `shortcuts=False` turns (4) off for tests and benchmarks.

Whatever block of features a run holds (pipeline/shards/intervene.py runs a layer's features in blocks), a
feature's rows go through the same forwards and unembedding calls, so its numbers are bit for bit those of the
run over all of them (tests/stages/test_shards_exact.py): batches and unembedding groups never mix features,
and nothing a feature's rows are scored against depends on the other features.

An SAE that normalises its input moves the residual by delta_t = c_t * s_t * d_i (pipeline.engine.normalization);
s_t is computed once per passage in the prefix step, from the residual in the SAE's dtype, and every row's delta
carries it.

Random-direction controls (`controls`, unit vectors u [n_feat, n_draws, d_model]): for each
(feature, value) and draw r, a control row adds ||delta_t|| * u[f, r] where the feature's row adds
delta_t, so the same positions get a push of the same norm along a direction unrelated to the model.
Control rows are rows like any other (same batches, same shortcuts: the feature's delta is zero
exactly where the control's is).

Precision: logits are float32 (the model's); CE and KL are computed in float64 by
pipeline.engine.divergence from the clean probabilities (once per passage block) and the change of
the logits, with a relative error of ~1e-11 (its docstring derives the bound); every position's KL
is >= 0. `reference_scoring=True` scores by the float64 log-softmax definition
instead (slower; for tests); a position the kernel cannot score (a logit rising ~709 nats) is scored
by the definition from the same inputs (`divergence.rescore_overflowed`), row by row.

`run_layer` runs the steps of a `_LayerRun`, which holds the buffers (cached prefix residuals, live
masks, results): `prefix` (1), then per passage block `variant_rows` (4), `clean_block` (2), `run_rows` (3)
with `unembed` and `score_positions` (6), and `commit`.
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
from pipeline.engine.divergence import (
    Workspace,
    centred_delta_sum,
    clean_side,
    scores,
    scores_by_logsumexp,
)
from pipeline.engine.forward import (
    FeatureEncoder,
    device_of,
    final_residual,
    residual_at,
    retry_on_oom,
    scaled,
    unembed_difference_into,
    unembed_into,
    unembeds_differences,
)
from pipeline.engine.interventions import SCALE, Intervention
from pipeline.engine.metrics import LiveSet, live_positions
from pipeline.engine.segments import Packer, cuts

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
    final_clean: Float[Tensor, "bp pos d_model"]  # what the unembedding reads, clean
    # the float32 logits in the wide dtype, where rows unembed their logits rather than their changes (by_difference)
    logits_clean: Float[Tensor, "bp scored d_vocab"] | None
    probs_clean: Float[Tensor, "bp scored d_vocab"] | None  # their softmax, wide, where rows are scored by the kernel
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
                 controls: Tensor | None = None, reference_scoring: bool = False,
                 encoder: FeatureEncoder | None = None):
        self.model, self.resume_at, self.intervention = model, resume_at, intervention
        self.reference_scoring = reference_scoring
        self.affine_unembedding = unembeds_differences(model)
        self.features, self.values = features, values
        self.live_percentile, self.shortcuts, self.progress = live_percentile, shortcuts, progress
        self.device = device_of(model)
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
        self.work: Workspace | None = None  # allocated by the first block, inside the out-of-memory retry
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

    @property
    def by_difference(self) -> bool:
        """Rows unembed the change of their final residual from the clean one, (h_int - h_clean) W_U, which is the
        change of the logits the kernel needs, rounded relative to itself; so the positions of many rows can share
        one unembedding (an unchanged position gives exactly 0 whatever the product's shape). Otherwise (reference
        scoring, or logits that are not affine in h) rows unembed their logits one piece at a time, as the clean
        block does, so an unchanged row's logits are the clean ones bit for bit."""
        return self.affine_unembedding and not self.reference_scoring

    def unembed(self, group: list[tuple[object, Tensor]], difference: bool) -> list[tuple[object, Tensor]]:
        """Each piece's metadata and its float32 logits, or with `difference` the change of its logits (its rows
        being changes of the final residual), from one unembedding of the whole group; views of the workspace's
        buffer, valid until the next call."""
        h = torch.cat([rows for _, rows in group])
        out = self.work.logits[:h.shape[0]]
        (unembed_difference_into if difference else unembed_into)(self.model, h, out)
        ends = np.cumsum([rows.shape[0] for _, rows in group]).tolist()
        return [(meta, out[end - rows.shape[0]:end]) for (meta, rows), end in zip(group, ends, strict=True)]

    def clean_block(self, b0: int, b1: int, rows: list[Row]) -> _Block:
        """Step 2: the clean suffix of passages b0..b1-1, once, and what every variant is scored against: the
        clean CE everywhere, and where the block's rows are scored (from each passage's earliest scored position
        on) the clean probabilities for the kernel, or the logits for the float64 definition. Unembedded as the
        rows are (pieces at the same cuts, one at a time unless by_difference), so an unchanged row's logits are
        these bit for bit."""
        bp, s_len, d_vocab = b1 - b0, self.s_len, self.d_vocab
        if self.work is None:
            # an unembedding call holds at most chunk_tokens positions, and never more than one feature's rows of a
            # block have (the first block is the largest): a limit that the other features leave alone, since it
            # decides which pieces share a call, and so the bits
            self.unembed_limit = min(self.chunk_tokens, max(1, self.n_val * self.n_variants) * bp * s_len)
            self.work = Workspace(self.unembed_limit, min(self.chunk_tokens, s_len), d_vocab, self.acc_dtype,
                                  self.device)
        first: dict[int, int] = {}  # passage -> first scored position s (t = s + 1) of any of its rows
        for _, _, _, j, t0 in rows:
            first[j] = min(first.get(j, t0 - 1), t0 - 1)
        targets = self.tokens[b0:b1].to(self.device)[:, 2:]
        final_c = final_residual(self.model, self.resid_all[b0:b1], self.resume_at)
        self.stats.suffix_calls += 1
        wide = dict(dtype=self.acc_dtype, device=self.device)
        logits_c = None if self.by_difference else torch.empty((bp, s_len, d_vocab), **wide)
        probs_c = None if self.reference_scoring else torch.empty((bp, s_len, d_vocab), **wide)
        lse_c = torch.empty((bp, s_len), dtype=torch.float64, device=self.device)
        ce_c = torch.empty((bp, s_len), dtype=torch.float64, device=self.device)
        packer = Packer(self.unembed_limit, together=self.by_difference)
        groups = [group for j in range(bp) for s0, s1 in cuts(0, s_len, self.chunk_tokens)
                  for group in packer.add((j, s0, s1), final_c[j, s0 + 1:s1 + 1])] + packer.flush()
        for group in groups:
            for (j, s0, s1), z in self.unembed(group, difference=False):
                unnormalised = self.work.phi[:s1 - s0]
                lse_c[j, s0:s1], ce_c[j, s0:s1], total = clean_side(z, targets[j, s0:s1], unnormalised)
                if logits_c is not None:
                    logits_c[j, s0:s1] = z
                p0 = max(s0, first.get(j, s_len))
                if probs_c is not None and p0 < s1:
                    torch.div(unnormalised[p0 - s0:], total[p0 - s0:, None], out=probs_c[j, p0:s1])
        n_var = self.n_variants
        return _Block(
            b0=b0, b1=b1, targets=targets, final_clean=final_c, logits_clean=logits_c, probs_clean=probs_c,
            lse_clean=lse_c, ce_clean=ce_c,
            ce_int=ce_c[None, None, None].expand(self.n_feat, self.n_val, n_var, bp, s_len).clone(),
            kl=torch.zeros((self.n_feat, self.n_val, n_var, bp, s_len), dtype=torch.float64, device=self.device),
            delta=torch.zeros_like(self.delta_sum))

    def variant_rows(self, b0: int, b1: int) -> list[Row]:
        """Step 4: the (feature, value, passage) rows of the block that change something.

        With shortcuts, a value equal to the intervention's identity and a passage it changes nowhere get
        no row, and a row is scored from its first changed position t0 on (causal attention leaves the
        earlier ones clean); without, every row gets one, scored from t0 = 1."""
        acts_blk = self.acts_all[b0:b1]  # [bp, T, F]
        identity = self.intervention.identity
        rows: list[Row] = []
        for f in range(self.n_feat):
            for a, value in enumerate(self.values):
                if self.shortcuts and identity is not None and value == identity:
                    continue
                changed = self.intervention.changes(acts_blk[:, :, f], value).cpu().numpy()  # [bp, T], one copy
                any_change = changed.any(axis=1)
                first = changed.argmax(axis=1)  # first changed position (t >= 1: BOS never changes)
                for j in range(b1 - b0):
                    if self.shortcuts and not any_change[j]:
                        continue
                    for v in range(self.n_variants):
                        rows.append((f, a, v, j, int(first[j]) if self.shortcuts else 1))
        return rows

    def run_rows(self, blk: _Block, rows: list[Row], bs: int) -> None:
        """Step 3: the rows' suffix forwards, bs rows of one feature's (value, variant, passage) per batch.

        Each row resumes from its passage's cached residual plus the intervention's delta (a control row:
        the delta's norm along its random direction), and is scored at t in [t0, T-2], in position chunks,
        against its own passage's clean distributions. By difference, the chunks of several rows share one
        unembedding: the feature's rows with each other, its control rows with each other, in row order, and
        never across features, so a feature's rows go through the same products whether or not controls or
        other features ride along."""
        acts_blk = self.acts_all[blk.b0:blk.b1]
        packers = [Packer(self.unembed_limit, together=self.by_difference) for _ in range(2)]  # feature, controls
        feature = None
        for batch in _per_feature_batches(rows, bs):
            if batch[0][0] != feature:  # a new feature: its pieces start new groups
                self.flush(blk, packers)
                feature = batch[0][0]
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
                for s0, s1 in cuts(t0 - 1, self.s_len, self.chunk_tokens):
                    h = final[r, s0 + 1:s1 + 1]
                    if self.by_difference:
                        h = h - blk.final_clean[j, s0 + 1:s1 + 1]
                    for group in packers[v > 0].add((f, a, v, j, s0, s1), h):
                        self.score_group(blk, group)
        self.flush(blk, packers)

    def flush(self, blk: _Block, packers: list[Packer]) -> None:
        """Score the groups still open."""
        for packer in packers:
            for group in packer.flush():
                self.score_group(blk, group)

    def score_group(self, blk: _Block, group: list[tuple[tuple[int, ...], Tensor]]) -> None:
        """One unembedding for a group of pieces, then each piece scored."""
        for (f, a, v, j, s0, s1), values in self.unembed(group, difference=self.by_difference):
            self.score_positions(blk, values, f, a, v, j, s0, s1)

    def score_positions(self, blk: _Block, values: Float32[Tensor, "chunk d_vocab"], f: int, a: int, v: int,
                        j: int, s0: int, s1: int) -> None:
        """Step 6: CE, KL (float64) and, for the feature's own row, live logit deltas at scored positions s0..s1-1,
        from the row's logits there or, by_difference, their changes (`values`, float32).

        The clean block is sliced, a view: no [positions x vocab] gather is ever copied."""
        n, targets = s1 - s0, blk.targets[j, s0:s1]
        diff = self.work.diff[:n].copy_(values)  # the change of the logits, exact in the wide dtype
        if not self.by_difference:
            diff.sub_(blk.logits_clean[j, s0:s1])
        if self.reference_scoring:
            ce_int, kl = scores_by_logsumexp(values, blk.logits_clean[j, s0:s1], blk.lse_clean[j, s0:s1], targets)
        else:
            ce_int, kl = scores(diff, blk.probs_clean[j, s0:s1], blk.ce_clean[j, s0:s1], targets, self.work.phi[:n])
        blk.ce_int[f, a, v, j, s0:s1], blk.kl[f, a, v, j, s0:s1] = ce_int, kl
        self.stats.positions_unembedded += s1 - s0
        if not v:
            live = self.live_dev[f, blk.b0 + j, s0:s1]
            blk.delta[f * self.n_val + a] += centred_delta_sum(diff, live).to(self.acc_dtype)

    def rescore_overflowed(self, blk: _Block, rows: list[Row], bs: int) -> None:
        """The features of the block whose CE or KL the kernel could not score (a logit rising ~709 nats, see
        pipeline.engine.divergence), scored again by the float64 log-softmax, which has no such limit: their rows
        alone, so the other features' numbers do not depend on which features run beside them."""
        finite = (torch.isfinite(blk.kl) & torch.isfinite(blk.ce_int)).flatten(1).all(1)  # [n_feat]
        overflowed = (~finite).nonzero().flatten().tolist()  # the block's one host-device synchronisation
        if not overflowed:
            return
        log.warning("passages %d-%d, features %s: scored again by the float64 log-softmax", blk.b0, blk.b1 - 1,
                    [self.features[f] for f in overflowed])
        again = [row for row in rows if row[0] in overflowed]
        self.reference_scoring = True
        try:
            ref = self.clean_block(blk.b0, blk.b1, again)
            ref.ce_int.copy_(blk.ce_int)  # positions no row scores keep the block's ce_clean, bit for bit
            self.run_rows(ref, again, bs)
        finally:
            self.reference_scoring = False
        for f in overflowed:
            blk.ce_int[f], blk.kl[f] = ref.ce_int[f], ref.kl[f]
            blk.delta[f * self.n_val:(f + 1) * self.n_val] = ref.delta[f * self.n_val:(f + 1) * self.n_val]

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
            b0, b1 = self.blocks_done, min(self.blocks_done + bs, self.n)
            rows = self.variant_rows(b0, b1)
            blk = self.clean_block(b0, b1, rows)
            self.run_rows(blk, rows, bs)
            if not self.reference_scoring:
                self.rescore_overflowed(blk, rows, bs)
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
    reference_scoring: bool = False,
    encoder: FeatureEncoder | None = None,
) -> LayerResult:
    """Run every (feature, value) variant at the hook before block `resume_at`, and with `controls` (unit
    vectors, see pipeline.engine.controls) every random-direction control of each. `reference_scoring`: CE and
    KL by the float64 log-softmax definition instead of pipeline.engine.divergence's kernel (slower). `encoder`
    gives the features' activations and directions (default: FeatureEncoder(sae, features)); a block of a layer's
    features passes its columns of the layer's encoder, so activations round as in the whole layer's run."""
    run = _LayerRun(model, sae, resume_at, tokens, features, values, intervention, batch_size, live_percentile,
                    shortcuts, chunk_elems, progress, controls, reference_scoring, encoder)
    retry_on_oom(run.prefix, run.stats, "the prefix pass")
    run.start_scoring()
    retry_on_oom(run.blocks, run.stats, "the intervention passes")
    return run.result()
