"""The engine: every (feature, value) variant of one layer over a token set, with exact shortcuts.

The plain way runs one full forward pass per (feature, value) with the SAE spliced in. This
computes the same numbers with less work, each shortcut exact (tests/test_engine_exact.py):

1. Prefix once: the residual at the hook is computed once per passage and cached; every variant
   resumes from it (`start_at_layer`), so blocks before the hook never run again.
2. Clean suffix once per passage block; its log-probabilities serve every variant's KL and CE.
3. Many variants per forward: rows of different (feature, value, passage) share one batch.
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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from pipeline.engine.forward import FeatureEncoder, final_residual, is_oom, residual_at, unembed
from pipeline.engine.interventions import SCALE, Intervention
from pipeline.engine.metrics import LiveSet, live_positions
from pipeline.errors import UserError

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
    acts: np.ndarray  # [N, T, F] float32: clean activations at the hook, every position
    ce_clean: np.ndarray  # [N, S] float64
    ce_int: np.ndarray  # [F, A, N, S] float64
    kl: np.ndarray  # [F, A, N, S] float64
    live: list[LiveSet]  # per feature, masks [N, S]
    delta_sum: np.ndarray  # [F, A, V] float64: sum over live positions of centred logit deltas
    stats: EngineStats = field(default_factory=lambda: EngineStats(0))

    def acts_scored(self, f: int) -> np.ndarray:
        return self.acts[:, 1:-1, f]

    def mean_delta(self, f: int, a: int) -> np.ndarray:
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
) -> LayerResult:
    """Run every (feature, value) variant at the hook before block `resume_at`."""
    device = _device_of(model)
    tokens = tokens.long().cpu()
    n, t_len = tokens.shape
    if t_len < 3:
        raise UserError(f"passages of {t_len} tokens have no scored positions; max_len must be >= 3")
    s_len = t_len - 2
    n_feat, n_val = len(features), len(values)
    d_vocab = model.cfg.d_vocab
    stats = EngineStats(batch_size=batch_size, rows_total=n_feat * n_val * n)
    encoder = FeatureEncoder(sae, features)
    directions = encoder.directions  # [F, d_in]

    # ---- 1. prefix: residual at the hook and feature activations, once per passage
    resid_all = torch.empty((n, t_len, model.cfg.d_model), dtype=model.cfg.dtype, device=device)
    acts_all = torch.empty((n, t_len, n_feat), dtype=torch.float32, device=device)
    done = 0

    def prefix(bs: int) -> None:
        nonlocal done
        while done < n:
            stop = min(done + bs, n)
            resid = residual_at(model, tokens[done:stop].to(device), resume_at)
            resid_all[done:stop] = resid
            acts_all[done:stop] = encoder(resid).float()
            stats.prefix_calls += 1
            done = stop

    _retry_on_oom(prefix, stats, "the prefix pass")
    acts_np = acts_all.cpu().numpy()
    live = [live_positions(acts_np[:, 1:-1, f], live_percentile) for f in range(n_feat)]
    live_np = np.stack([lv.mask for lv in live])  # [F, N, S]

    ce_clean = np.empty((n, s_len))
    ce_int = np.empty((n_feat, n_val, n, s_len))
    kl = np.zeros((n_feat, n_val, n, s_len))
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    delta_sum = torch.zeros((n_feat * n_val, d_vocab), dtype=acc_dtype, device=device)
    values_dev = torch.tensor(values, dtype=directions.dtype, device=device)
    chunk_tokens = max(1, chunk_elems // d_vocab)
    live_dev = torch.from_numpy(live_np).to(device=device, dtype=torch.float32)  # [F, N, S], 1.0 = live

    def log_probs(final_rows: Tensor) -> Tensor:
        """log softmax of the logits, float32, computed in place on the unembedding's output."""
        lp = unembed(model, final_rows)
        return lp.sub_(torch.logsumexp(lp, -1, keepdim=True))

    # ---- 2. per passage block: the clean suffix, then every variant row that changes something
    def block(b0: int, bs: int) -> int:
        b1 = min(b0 + bs, n)
        bp = b1 - b0
        tok = tokens[b0:b1].to(device)
        targets = tok[:, 2:].reshape(-1)  # next token of scored positions t = 1..T-2
        final_c = final_residual(model, resid_all[b0:b1], resume_at)
        stats.suffix_calls += 1
        # The clean log-probs go through exactly the computation (and chunking) an intervened row
        # starting at t = 1 goes through, so an unchanged row reproduces them bit for bit.
        lp_clean = torch.empty((bp, s_len, d_vocab), dtype=torch.float32, device=device)
        for j in range(bp):
            for s0 in range(0, s_len, chunk_tokens):
                s1 = min(s0 + chunk_tokens, s_len)
                lp_clean[j, s0:s1] = log_probs(final_c[j, s0 + 1:s1 + 1])
        p_clean = lp_clean.exp()
        ce_c = -lp_clean.view(bp * s_len, d_vocab).gather(1, targets[:, None]).squeeze(1).view(bp, s_len)

        # Variant rows: (feature, value index, passage in block, first position to score).
        acts_blk = acts_all[b0:b1]  # [bp, T, F]
        rows_f, rows_a, rows_j, rows_t0 = [], [], [], []
        for f in range(n_feat):
            for a, value in enumerate(values):
                if shortcuts and intervention.identity is not None and value == intervention.identity:
                    continue
                changed = intervention.changes(acts_blk[:, :, f], value).cpu().numpy()  # [bp, T], one copy
                any_change = changed.any(axis=1)
                first = changed.argmax(axis=1)  # first changed position (t >= 1: BOS never changes)
                for j in range(bp):
                    if shortcuts and not any_change[j]:
                        continue
                    rows_f.append(f)
                    rows_a.append(a)
                    rows_j.append(j)
                    rows_t0.append(int(first[j]) if shortcuts else 1)

        ce_i_blk = ce_c[None, None].expand(n_feat, n_val, bp, s_len).clone()
        kl_blk = torch.zeros((n_feat, n_val, bp, s_len), dtype=torch.float32, device=device)
        delta_blk = torch.zeros_like(delta_sum)
        lp_clean_blk, p_clean_blk = lp_clean, p_clean
        targets_blk = targets.view(bp, s_len)

        def score_positions(final_rows: Tensor, f: int, a: int, j: int, s0: int, s1: int) -> None:
            """CE, KL and live logit deltas of one variant row at scored positions s0..s1-1."""
            lp = log_probs(final_rows)  # log p_int, [s1 - s0, V]
            ce_i_blk[f, a, j, s0:s1] = -lp.gather(1, targets_blk[j, s0:s1, None]).squeeze(1)
            diff = lp.sub_(lp_clean_blk[j, s0:s1])  # log p_int - log p_clean, in place
            # sum_v p_clean (log p_clean - log p_int), as a batched dot product: no temporary
            kl_blk[f, a, j, s0:s1] = -torch.bmm(p_clean_blk[j, s0:s1, None, :], diff[:, :, None]).view(-1)
            # Sum of the centred deltas over live positions, as a 0/1 mask times the rows: no
            # index list to copy to the device, so no host-device synchronisation per row.
            diff.sub_(diff.mean(-1, keepdim=True))
            delta_blk[f * n_val + a] += (live_dev[f, b0 + j, s0:s1] @ diff).to(acc_dtype)
            stats.positions_unembedded += s1 - s0
        for r0 in range(0, len(rows_f), bs):
            rf = torch.tensor(rows_f[r0:r0 + bs], device=device)
            ra = torch.tensor(rows_a[r0:r0 + bs], device=device)
            rj = torch.tensor(rows_j[r0:r0 + bs], device=device)
            x = resid_all[b0 + rj]  # [R, T, d]
            acts_rows = acts_blk[rj, :, rf]  # [R, T]
            delta = intervention.delta(acts_rows.to(directions.dtype), directions[rf][:, None, :], values_dev[ra][:, None])
            final = final_residual(model, x + delta.to(x.dtype), resume_at)
            stats.suffix_calls += 1

            # Score each row at t in [t0, T-2] against its own passage's clean distributions.
            # Slicing the clean block is a view, so no [positions x vocab] gather is ever copied.
            for r in range(len(rf)):
                f, a, j, t0 = rows_f[r0 + r], rows_a[r0 + r], rows_j[r0 + r], rows_t0[r0 + r]
                for s0 in range(t0 - 1, s_len, chunk_tokens):
                    s1 = min(s0 + chunk_tokens, s_len)
                    score_positions(final[r, s0 + 1:s1 + 1], f, a, j, s0, s1)
        # Commit the block only once all of it succeeded (an OOM retry redoes it whole).
        ce_clean[b0:b1] = ce_c.double().cpu().numpy()
        ce_int[:, :, b0:b1] = ce_i_blk.double().cpu().numpy()
        kl[:, :, b0:b1] = kl_blk.double().cpu().numpy()
        delta_sum.add_(delta_blk)
        stats.rows_run += len(rows_f)
        if progress is not None:
            progress(n_feat * n_val * bp)
        return b1

    start = 0

    def all_blocks(bs: int) -> None:
        nonlocal start
        while start < n:
            start = block(start, bs)

    _retry_on_oom(all_blocks, stats, "the intervention passes")
    return LayerResult(
        features=list(features),
        values=list(values),
        acts=acts_np,
        ce_clean=ce_clean,
        ce_int=ce_int,
        kl=kl,
        live=live,
        delta_sum=delta_sum.double().cpu().numpy().reshape(n_feat, n_val, d_vocab),
        stats=stats,
    )
