"""How good the trained toy is, measured on held-out text: data/toy/quality.json.

Called by `pipeline.toy.build.build_toy` after training (inside the `model` stage); the numbers
are deterministic like the weights, so the file is too.

- Language model: bits per byte on every non-overlapping 127-byte window of the held-out slice
  (BOS prepended, each byte predicted from the bytes before it in its window), against a
  unigram byte model fitted on the training bytes (add-one smoothed) scored on the same bytes.
- Each SAE: SAE-Lens's own `run_evals` with the SAE spliced in at blocks.L.hook_resid_post:
  L0, variance explained, and the CE loss recovered relative to zero-ablating the hook
  (`ce_loss_score` = (CE_zero_ablation - CE_with_SAE) / (CE_zero_ablation - CE_clean)), plus
  the KL version of the same score. `run_evals` reads token batches from an ActivationsStore;
  `HeldOutTokens` gives it the held-out windows through the same three members instead, and
  BOS is passed as the special token to leave out, as the study's metrics do.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from pipeline.toy.train import BOS

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

EVAL_BATCH_PROMPTS = 16
N_RECONSTRUCTION_BATCHES = 2  # 32 windows x 3 full forward passes per SAE
N_SPARSITY_BATCHES = 4  # 64 windows, stopping at the SAE's layer


class HeldOutTokens:
    """The part of SAE-Lens's ActivationsStore that `run_evals` uses, over fixed token windows:
    batches in order, starting again from the first after `reset_input_dataset`."""

    def __init__(self, windows: Int[Tensor, "n n_ctx"], batch_size: int):
        self.windows = windows
        self.store_batch_size_prompts = batch_size
        self.context_size = windows.shape[1]
        self._next = 0

    def get_batch_tokens(self, batch_size: int | None = None) -> Tensor:
        size = batch_size or self.store_batch_size_prompts
        if self._next + size > len(self.windows):
            raise ValueError(f"only {len(self.windows)} held-out windows; asked for {self._next + size}")
        batch = self.windows[self._next:self._next + size]
        self._next += size
        return batch

    def reset_input_dataset(self) -> None:
        self._next = 0


@torch.no_grad()
def lm_bits_per_byte(model: HookedTransformer, windows: Int[Tensor, "n n_ctx"], batch_size: int = 32) -> float:
    """Mean next-byte loss in bits over every byte of the windows (BOS itself is never a target)."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        loss = model(batch, return_type="loss", loss_per_token=True)  # [batch, n_ctx - 1], nats
        total += loss.double().sum().item()
        count += loss.numel()
    return total / count / math.log(2)


def unigram_bits_per_byte(train: Tensor, windows: Int[Tensor, "n n_ctx"]) -> float:
    """Bits per byte of an add-one smoothed byte-frequency model of `train` on the windows' bytes."""
    counts = torch.bincount(train.long(), minlength=256).double() + 1.0
    log2_p = torch.log2(counts / counts.sum())
    targets = windows[:, 1:].reshape(-1)
    return -log2_p[targets].mean().item()


def sae_quality(model: HookedTransformer, sae: SAE, windows: Int[Tensor, "n n_ctx"]) -> dict[str, Any]:
    """SAE-Lens's evals of one SAE on held-out windows, flattened to the numbers we report."""
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    eval_cfg = EvalConfig(
        batch_size_prompts=EVAL_BATCH_PROMPTS,
        n_eval_reconstruction_batches=N_RECONSTRUCTION_BATCHES,
        compute_kl=True,
        compute_ce_loss=True,
        n_eval_sparsity_variance_batches=N_SPARSITY_BATCHES,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
    )
    store = HeldOutTokens(windows, EVAL_BATCH_PROMPTS)
    metrics, per_feature = run_evals(sae, store, model, ActivationScaler(), eval_cfg,  # type: ignore[arg-type]
                                     exclude_special_tokens=[BOS])
    density = torch.tensor(per_feature["feature_density"])
    perf, behaviour = metrics["model_performance_preservation"], metrics["model_behavior_preservation"]
    return {
        "l0": metrics["sparsity"]["l0"],
        "explained_variance": metrics["reconstruction_quality"]["explained_variance"],
        "ce_loss_score": perf["ce_loss_score"],
        "ce_loss_without_sae": perf["ce_loss_without_sae"],
        "ce_loss_with_sae": perf["ce_loss_with_sae"],
        "ce_loss_with_ablation": perf["ce_loss_with_ablation"],
        "kl_div_score": behaviour["kl_div_score"],
        "kl_div_with_sae": behaviour["kl_div_with_sae"],
        "features_never_firing": int((density == 0).sum().item()),
        "n_eval_tokens": int(min(len(windows), N_SPARSITY_BATCHES * EVAL_BATCH_PROMPTS) * (windows.shape[1] - 1)),
    }


def rounded(obj: Any, digits: int = 6) -> Any:
    """Floats to `digits` significant figures: the JSON stays readable and stable."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj
