"""CE, KL(p_clean || p_int) and centred logit deltas of intervened logits against the clean ones: the engine's
numerical kernel, called by pipeline.engine.run at every scored position of every row.

Notation, per position: z_c, z_i the float32 logits (clean, intervened), taken as exact; p = softmax(z_c),
q = softmax(z_i); d_v = z_i,v - z_c,v; m = logsumexp(z_i) - logsumexp(z_c) = log sum_v p_v e^(d_v). Then
log p_v - log q_v = m - d_v, so

    KL = sum_v p_v (m - d_v) = m - r,   r = sum_v p_v d_v (the clean-weighted mean change of the logits)
    CE_int - CE_clean = m - d_t         (t the next token)

and with e_v = d_v - r (so sum_v p_v e_v = 0):

    KL = log sum_v p_v e^(e_v) = log1p(Phi),   Phi = sum_v p_v phi(e_v),   phi(x) = expm1(x) - x >= 0
    CE_int - CE_clean = KL - e_t.

`scores` evaluates exactly that, in float64, from d and from p, which is computed once per passage block
(`clean_side`), not per row: two dot products with p and one expm1 over the vocabulary. Phi is a sum of terms
that are each >= 0, so KL = log1p(Phi) >= 0 at every position, and an unchanged position (d = 0 exactly) gives
KL = 0 and CE_int = CE_clean exactly.

d comes from pipeline.engine.run: for a float32 model with affine logits it is the float32 product
(h_int - h_clean) W_U of the final residuals' change (`pipeline.engine.forward.unembed_difference_into`),
rounded relative to the change itself; otherwise the difference of the two float32 logits, which is exact in
float64. Either way the bound below is relative to the definition evaluated from z_c and z_c + d.

Error bound, u = 2^-53 the float64 unit roundoff, V the vocabulary size, relative to the definition from z_c
and d:

- p_v = exp(z_c,v - logsumexp(z_c)) has a relative error of a few u.
- The computed r is r + rho, |rho| <= (V + 2) u sum_v p_v |d_v| (a dot product). The identity holds for any
  shift c: KL = log1p(Phi_c + s) - s with Phi_c = sum_v p_v phi(d_v - c), s = sum_v p_v (d_v - c). With
  c = r + rho, s = -rho, and log1p(Phi_c) (what is computed) differs from KL by about rho Phi_c / (1 + Phi_c):
  a relative error of at most |rho|, since KL >= Phi_c / (1 + Phi_c).
- e_v = d_v - r is rounded once (u |e_v|). For |e_v| < 1.25, expm1(e_v) and e_v are within a factor 2 of each
  other, so phi(e_v) = expm1(e_v) - e_v carries only expm1's error, <= u |e_v| (one ulp): absolute, against
  phi(e_v) ~ e_v^2 / 2. Summed with weights p_v (plus (V + 2) u Phi from the dot product), and by
  Cauchy-Schwarz sum_v p_v |e_v| <= sqrt(sum_v p_v e_v^2) ~ sqrt(2 KL):

      |KL_computed - KL| / KL  <~  (V + 6) u + 3 u / sqrt(KL) + |rho|

  For GPT-2's 50,257 tokens: 6e-12 (a worst case; rounding errors of a long sum mostly cancel) + 3e-16 /
  sqrt(KL), the second term 1e-12 at KL = 1e-7 nats (a sparse feature's typical position), 3e-6 at 1e-20.
  Any float32 way of writing KL has a relative error of order 2^-24 / sqrt(KL) or worse: a float32 KL from
  float32 log-probabilities loses everything once the logits move by less than ~1e-6 relative, which is where
  sparse features' tiny per-position KLs live.
- CE_int - CE_clean = KL - e_t is computed to |rho| + u |e_t| + (KL's error): relative to the size of the
  logits' change, not to the CE (~10 nats) as a difference of two log-softmaxes is. CE_int is stored as CE_clean
  plus it, rounded to u CE (~2e-15 nats).

What it does not cover: e_v > 709 (a token's logit rising ~709 nats above the clean-weighted mean change)
overflows expm1 and gives an infinite KL. The engine checks each block and scores the rows of a feature
that overflowed again with `scores_by_logsumexp` (pipeline.engine.run `rescore_overflowed`), the definition written out (log-softmax of each side in float64, KL as
sum_v p_v (D + expm1(-D)) with D = log p_v - log q_v, each term >= 0), which is also what tests compare with.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Float32, Float64, Int
from torch import Tensor


def clean_side(logits: Float32[Tensor, "pos d_vocab"], targets: Int[Tensor, " pos"], scratch: Float[Tensor, "pos d_vocab"]
               ) -> tuple[Float64[Tensor, " pos"], Float64[Tensor, " pos"], Float[Tensor, " pos"]]:
    """(logsumexp, CE, total) of clean logits in float64, leaving exp(logits - max) in `scratch` (a wide buffer of
    the logits' shape), whose row sums are `total`: the clean probabilities are scratch / total.

    logsumexp = max + log(total), as torch.logsumexp computes it, but in buffers the caller reuses."""
    top = logits.amax(-1)
    scratch.copy_(logits).sub_(top[:, None].to(scratch.dtype)).exp_()
    total = scratch.sum(-1)
    lse = top.double() + torch.log(total).double()
    return lse, lse - logits.gather(1, targets[:, None]).squeeze(1).double(), total


ROW_ALIGN = 16  # elements: a row of float32 logits starts on a 64-byte boundary


def row_stride(cols: int, device: torch.device) -> int:
    """Where `aligned_rows` starts each row: `cols` rounded up to ROW_ALIGN elements. On Apple's MPS the rows stay
    packed: its matrix products have written wrong values into strided outputs before (pytorch/pytorch#104832)."""
    return cols if device.type == "mps" else -(-cols // ROW_ALIGN) * ROW_ALIGN


def aligned_rows(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An empty [rows x cols] tensor whose rows start every `row_stride` elements: a view of a wider buffer. A
    matrix product writing GPT-2's 50,257 logits a row runs 30% faster into rows of 50,272 (measured on this repo's
    CPU: MKL's stores to an odd leading dimension), and the values are the same."""
    return torch.empty((rows, row_stride(cols, device)), dtype=dtype, device=device)[:, :cols]


class Workspace:
    """Buffers allocated once per run, so no [positions x vocab] tensor is allocated per row (a fresh 25-100 MB
    tensor per call costs more in page faults than the arithmetic on it): float32 logits (or their changes) of up
    to `positions` positions, in aligned rows (`aligned_rows`), and two wide [piece x vocab] buffers for the
    kernel."""

    def __init__(self, positions: int, piece: int, d_vocab: int, wide: torch.dtype, device: torch.device):
        self.logits = aligned_rows(positions, d_vocab, torch.float32, device)
        self.diff = torch.empty((piece, d_vocab), dtype=wide, device=device)
        self.phi = torch.empty((piece, d_vocab), dtype=wide, device=device)


def _rowwise_dot(a: Float[Tensor, "pos d_vocab"], b: Float[Tensor, "pos d_vocab"]) -> Float[Tensor, " pos"]:
    """sum_v a[s, v] b[s, v] for each s, as a batched matrix product: no temporary the size of a."""
    return torch.bmm(a[:, None, :], b[:, :, None]).view(-1)


def scores(diff: Float[Tensor, "pos d_vocab"], probs: Float[Tensor, "pos d_vocab"], ce_clean: Float64[Tensor, " pos"],
           targets: Int[Tensor, " pos"], phi: Float[Tensor, "pos d_vocab"]
           ) -> tuple[Float64[Tensor, " pos"], Float64[Tensor, " pos"]]:
    """(CE of the intervened logits, KL(p_clean || p_int)) per position, as the module docstring derives, from d
    (`diff`, z_int - z_clean in the wide dtype) and the clean probabilities and CE.

    Overwrites `diff` with e = d less its clean-weighted mean at each position, which is what
    `centred_delta_sum` needs, and `phi` (a buffer of diff's shape) with phi(e)."""
    r = _rowwise_dot(probs, diff)
    diff.sub_(r[:, None])  # e
    torch.expm1(diff, out=phi).sub_(diff)  # phi(e) >= 0
    kl = torch.log1p(_rowwise_dot(probs, phi)).clamp_min_(0).double()
    e_target = diff.gather(1, targets[:, None]).squeeze(1).double()
    return ce_clean + (kl - e_target), kl


def centred_delta_sum(diff: Float[Tensor, "pos d_vocab"], live: Float32[Tensor, " pos"]) -> Float[Tensor, " d_vocab"]:
    """Sum over live positions of the centred logit deltas: z_int - z_clean less its mean over the vocabulary.

    `diff` may be z_int - z_clean shifted by any amount per position (`scores` leaves it less its clean-weighted
    mean): centring removes the shift. `live` is a 0/1 mask, not an index list, so no host-device
    synchronisation. Computed as live @ diff - (live . mean) without writing a centred copy."""
    live = live.to(diff.dtype)
    return live @ diff - live @ diff.mean(-1)


def scores_by_logsumexp(z_int: Float32[Tensor, "pos d_vocab"], z_clean: Float[Tensor, "pos d_vocab"],
                        lse_clean: Float64[Tensor, " pos"], targets: Int[Tensor, " pos"]
                        ) -> tuple[Float64[Tensor, " pos"], Float64[Tensor, " pos"]]:
    """(CE of the intervened logits, KL(p_clean || p_int)) per position, by the definition in float64."""
    lse_i, ce_int = log_softmax_ce(z_int, targets)
    return ce_int, kl_by_logsumexp(z_int, z_clean, lse_i, lse_clean)


def log_softmax_ce(z_int: Float32[Tensor, "pos d_vocab"], targets: Int[Tensor, " pos"]
                   ) -> tuple[Float64[Tensor, " pos"], Float64[Tensor, " pos"]]:
    """(logsumexp, CE) of intervened logits in float64."""
    lse_i = torch.logsumexp(z_int.double(), -1)
    return lse_i, lse_i - z_int.gather(1, targets[:, None]).squeeze(1).double()


def kl_by_logsumexp(z_int: Float32[Tensor, "pos d_vocab"], z_clean: Float[Tensor, "pos d_vocab"],
                    lse_int: Float64[Tensor, " pos"], lse_clean: Float64[Tensor, " pos"]) -> Float64[Tensor, " pos"]:
    """KL(p_clean || p_int) per position from both log-softmaxes in float64 (neither input is written)."""
    lp_c = z_clean.to(torch.float64, copy=True).sub_(lse_clean[:, None])
    d = z_int.double().sub_(lse_int[:, None]).neg_().add_(lp_c)  # log p_clean - log p_int
    # p_clean * (d - 1 + exp(-d)) >= 0 term by term; its sum is KL(p_clean || p_int) since both sum to 1
    return (d + torch.expm1(-d)).clamp_min_(0).mul_(lp_c.exp_()).sum(-1)
