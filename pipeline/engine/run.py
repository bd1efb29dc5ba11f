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
6. Logits in position chunks of at most `chunk_elems` floats, so memory stays bounded.

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
    live_dev = torch.from_numpy(np.stack([lv.mask for lv in live])).to(device)  # [F, N, S]

    ce_clean = np.empty((n, s_len))
    ce_int = np.empty((n_feat, n_val, n, s_len))
    kl = np.zeros((n_feat, n_val, n, s_len))
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    delta_sum = torch.zeros((n_feat * n_val, d_vocab), dtype=acc_dtype, device=device)
    values_dev = torch.tensor(values, dtype=directions.dtype, device=device)
    chunk_tokens = max(1, chunk_elems // d_vocab)

    # ---- 2. per passage block: the clean suffix, then every variant row that changes something
    def block(b0: int, bs: int) -> int:
        b1 = min(b0 + bs, n)
        bp = b1 - b0
        tok = tokens[b0:b1].to(device)
        targets = tok[:, 2:].reshape(-1)  # next token of scored positions t = 1..T-2
        final_c = final_residual(model, resid_all[b0:b1], resume_at)[:, 1:-1].reshape(bp * s_len, -1)
        stats.suffix_calls += 1
        lp_clean = torch.empty((bp * s_len, d_vocab), dtype=torch.float32, device=device)
        for c in range(0, bp * s_len, chunk_tokens):
            lp_clean[c:c + chunk_tokens] = torch.log_softmax(unembed(model, final_c[c:c + chunk_tokens]), -1)
        p_clean = lp_clean.exp()
        ce_c = -lp_clean.gather(1, targets[:, None]).squeeze(1).view(bp, s_len)

        # Variant rows: (feature, value index, passage in block, first position to score).
        acts_blk = acts_all[b0:b1]  # [bp, T, F]
        rows_f, rows_a, rows_j, rows_t0 = [], [], [], []
        for f in range(n_feat):
            for a, value in enumerate(values):
                if shortcuts and intervention.identity is not None and value == intervention.identity:
                    continue
                changed = intervention.changes(acts_blk[:, :, f], value)  # [bp, T]
                any_change = changed.any(dim=1)
                first = torch.where(any_change, changed.float().argmax(dim=1), torch.full_like(any_change, t_len, dtype=torch.long))
                for j in range(bp):
                    if shortcuts and not bool(any_change[j]):
                        continue
                    rows_f.append(f)
                    rows_a.append(a)
                    rows_j.append(j)
                    rows_t0.append(int(first[j]) if shortcuts else 1)

        ce_i_blk = ce_c[None, None].expand(n_feat, n_val, bp, s_len).clone()
        kl_blk = torch.zeros((n_feat, n_val, bp, s_len), dtype=torch.float32, device=device)
        delta_blk = torch.zeros_like(delta_sum)
        for r0 in range(0, len(rows_f), bs):
            rf = torch.tensor(rows_f[r0:r0 + bs], device=device)
            ra = torch.tensor(rows_a[r0:r0 + bs], device=device)
            rj = torch.tensor(rows_j[r0:r0 + bs], device=device)
            rt0 = torch.tensor(rows_t0[r0:r0 + bs], device=device)
            x = resid_all[b0 + rj]  # [R, T, d]
            acts_rows = acts_blk[rj, :, rf]  # [R, T]
            delta = intervention.delta(acts_rows.to(directions.dtype), directions[rf][:, None, :], values_dev[ra][:, None])
            final = final_residual(model, x + delta.to(x.dtype), resume_at)
            stats.suffix_calls += 1

            # Positions to score: t in [max(1, t0), T-2] for each row.
            pos = torch.arange(t_len, device=device)
            want = (pos[None, :] >= rt0[:, None]) & (pos[None, :] >= 1) & (pos[None, :] <= t_len - 2)
            r_idx, t_idx = want.nonzero(as_tuple=True)
            stats.positions_unembedded += int(r_idx.numel())
            for c in range(0, r_idx.numel(), chunk_tokens):
                rc, tc = r_idx[c:c + chunk_tokens], t_idx[c:c + chunk_tokens]
                fc, ac, jc, sc = rf[rc], ra[rc], rj[rc], tc - 1
                clean_rows = jc * s_len + sc
                lp_i = torch.log_softmax(unembed(model, final[rc, tc]), -1)
                diff = lp_i - lp_clean[clean_rows]  # log p_int - log p_clean
                ce_i_blk[fc, ac, jc, sc] = -lp_i.gather(1, targets[clean_rows][:, None]).squeeze(1)
                kl_blk[fc, ac, jc, sc] = -(p_clean[clean_rows] * diff).sum(-1)
                is_live = live_dev[fc, b0 + jc, sc]
                if bool(is_live.any()):
                    centred = diff[is_live]
                    centred = centred - centred.mean(-1, keepdim=True)
                    delta_blk.index_add_(0, (fc * n_val + ac)[is_live], centred.to(acc_dtype))
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
