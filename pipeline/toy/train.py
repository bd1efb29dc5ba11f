"""Train the toy preset's byte-level language model and one ReLU SAE per layer, on the CPU.

Called by `pipeline.toy.build.build_toy` inside the `model` stage (`python -m pipeline model` or
`dvc repro model` with `preset: toy`); nothing here writes files. Everything is deterministic from
the seed: the weights come from `torch.manual_seed`, every batch from its own seeded
`torch.Generator`, and `deterministic()` switches PyTorch to its deterministic kernels, so two
builds give byte-identical weights.

- Data: the `python-docs` corpus as UTF-8 bytes (the ByteTokenizer's ids). The last
  `HOLDOUT_FRACTION` of the bytes is held out for evaluation (pipeline.toy.quality) and never
  trained on; training reads random 127-byte windows of the rest, each with BOS prepended, the
  same shape as the study's passages.
- Language model: AdamW with linear warm-up and cosine decay on TransformerLens's own next-token
  loss. The loop is ours because SAE-Lens trains SAEs, not language models, and TransformerLens's
  `train` helper iterates epochs over a map-style dataset with no learning-rate decay.
- SAEs: SAE-Lens's `SAETrainer` on a `StandardTrainingSAE` (ReLU, L1 penalty weighted by decoder
  norms). Its `ActivationsStore` wants a Hugging Face dataset and a tokenizer, so we feed the
  trainer its documented `DataProvider` instead: an iterator of activation batches drawn from
  one cached pass of the trained model over the training split (every layer at once, BOS
  positions left out, as the study never scores or edits them). Inputs are normalised to
  mean norm sqrt(d_in) during training (`expected_average_only_in`), which lets one L1
  coefficient suit every layer; the trainer folds the factor back into the weights, so the saved
  SAE reads raw activations with `normalize_activations: none`.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from pipeline.load.tokenizer import ByteTokenizer

if TYPE_CHECKING:
    from sae_lens import StandardSAE
    from sae_lens.saes.sae import SAEMetadata
    from transformer_lens import HookedTransformer

# The last 5% of the corpus bytes is held out for evaluation: for python-docs (topics sorted by
# name) about 23 kB, from the middle of `typesseq-mutable` through `unary`, `while`, `with`, `yield`.
HOLDOUT_FRACTION = 0.05
BOS = ByteTokenizer.bos_token_id


@dataclass(frozen=True)
class LMSettings:
    """How the toy language model is trained (steps come from params.yaml `toy_lm_steps`)."""

    steps: int
    batch_size: int = 8  # sequences of n_ctx tokens; ~0.11 s a step on 2 CPU cores (4: 2.55 bits/byte)
    lr: float = 3e-3  # a 64-wide model takes a large rate; 6e-3 ended worse (2.12 vs 2.01 bits/byte)
    warmup_frac: float = 0.05
    final_lr_frac: float = 0.1  # cosine decay ends at lr * final_lr_frac
    weight_decay: float = 0.01
    grad_clip: float = 1.0


@dataclass(frozen=True)
class SAESettings:
    """How each toy SAE is trained (steps come from params.yaml `toy_sae_steps`)."""

    steps: int
    d_sae: int
    batch_size: int = 256  # activation vectors per step; 512 gains nothing measurable here
    lr: float = 4e-3
    # On inputs normalised to mean norm sqrt(d_in) (see the module doc), on layers 0, 6 and 11:
    # 1.0 gave L0 ~17 and 92-94% variance explained, 3.0 gave L0 ~7.5 and 83%, 2.0 gives L0 ~10
    # and 87-94%: sparse enough for features to read as one thing, well above the 70% floor.
    l1_coefficient: float = 2.0
    l1_warmup_frac: float = 0.1
    decay_frac: float = 0.2  # the last 20% of steps decay the learning rate linearly to 0
    n_windows: int = 768  # training windows cached once for all layers (~97k activation vectors)
    norm_estimate_batches: int = 32


def corpus_bytes(text: str) -> Int[Tensor, " n_bytes"]:
    """The corpus as ByteTokenizer ids (its UTF-8 bytes), uint8 to keep it small."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def split_holdout(data: Tensor, holdout_fraction: float = HOLDOUT_FRACTION) -> tuple[Tensor, Tensor]:
    """(train, held out): the held-out part is the last `holdout_fraction` of the bytes."""
    cut = len(data) - int(len(data) * holdout_fraction)
    return data[:cut], data[cut:]


def with_bos(body: Int[Tensor, "batch width"]) -> Int[Tensor, "batch width_plus_1"]:
    bos = torch.full((body.shape[0], 1), BOS, dtype=torch.long)
    return torch.cat([bos, body.long()], dim=1)


def random_windows(data: Tensor, n: int, n_ctx: int, generator: torch.Generator) -> Int[Tensor, "n n_ctx"]:
    """n windows of n_ctx - 1 consecutive bytes at random offsets, BOS prepended."""
    width = n_ctx - 1
    starts = torch.randint(0, len(data) - width + 1, (n,), generator=generator)
    return with_bos(data[starts[:, None] + torch.arange(width)])


def consecutive_windows(data: Tensor, n_ctx: int) -> Int[Tensor, "n n_ctx"]:
    """Every non-overlapping window of n_ctx - 1 bytes (the tail that does not fill one dropped)."""
    width = n_ctx - 1
    n = len(data) // width
    return with_bos(data[: n * width].reshape(n, width))


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic CPU kernels for the block. With 2 threads, plain training gave a different
    model on every run: the gradient of the embedding lookup (`index_put_` with accumulate) adds
    rows in thread order. With these it gives the same bytes every run, and the same as with 1
    thread, for ~3% more time."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def say(message: str) -> None:
    """Progress on stderr: the model stage runs for minutes and should not look stuck."""
    print(f"toy: {message}", file=sys.stderr, flush=True)


def train_lm(model: HookedTransformer, train: Tensor, settings: LMSettings, seed: int,
             log: Callable[[str], None] = say) -> list[float]:
    """Train `model` in place on random windows of `train`; returns the batch loss in bits per byte
    every 100 steps and at the last."""
    n_ctx = model.cfg.n_ctx
    generator = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases and LayerNorm gains
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.99),
    )
    warmup = max(1, int(settings.steps * settings.warmup_frac))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, settings.steps - warmup)
        return settings.final_lr_frac + (1 - settings.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses: list[float] = []
    for step in range(settings.steps):
        tokens = random_windows(train, settings.batch_size, n_ctx, generator)
        loss = model(tokens, return_type="loss")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % 100 == 0 or step == settings.steps - 1:
            bits = loss.item() / math.log(2)
            losses.append(round(bits, 4))
            log(f"LM step {step + 1}/{settings.steps}: batch loss {bits:.3f} bits/byte")
    model.eval()
    return losses


@torch.no_grad()
def cache_resid_post(model: HookedTransformer, train: Tensor, n_windows: int, seed: int,
                     batch_size: int = 32) -> dict[int, Float[Tensor, "n_vectors d_model"]]:
    """blocks.L.hook_resid_post for every layer on n_windows random training windows, in one set of
    forward passes; BOS positions are dropped (the study never scores or edits them)."""
    generator = torch.Generator().manual_seed(seed)
    windows = random_windows(train, n_windows, model.cfg.n_ctx, generator)
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    parts: dict[int, list[Tensor]] = {layer: [] for layer in range(model.cfg.n_layers)}
    for start in range(0, n_windows, batch_size):
        _, cache = model.run_with_cache(windows[start:start + batch_size], names_filter=names)
        for layer, name in enumerate(names):
            parts[layer].append(cache[name][:, 1:].reshape(-1, model.cfg.d_model))
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}


def activation_batches(acts: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """SAE-Lens's DataProvider: an endless stream of batches sampled (with replacement) from acts."""
    while True:
        yield acts[torch.randint(0, len(acts), (batch_size,), generator=generator)]


def train_sae(acts: Float[Tensor, "n_vectors d_in"], settings: SAESettings, metadata: SAEMetadata,
              seed: int) -> StandardSAE:
    """One StandardTrainingSAE fitted by SAE-Lens's SAETrainer, returned as an inference StandardSAE."""
    from sae_lens import SAE, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)  # SAE-Lens initialises the weights from the global generator
    cfg = StandardTrainingSAEConfig(
        d_in=acts.shape[1],
        d_sae=settings.d_sae,
        dtype="float32",
        device="cpu",
        apply_b_dec_to_input=True,
        normalize_activations="expected_average_only_in",
        l1_coefficient=settings.l1_coefficient,
        l1_warm_up_steps=int(settings.steps * settings.l1_warmup_frac),
        metadata=metadata,
    )
    training_sae = StandardTrainingSAE(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=settings.steps * settings.batch_size,
        train_batch_size_samples=settings.batch_size,
        lr=settings.lr,
        lr_end=settings.lr,  # the linear decay below starts from the full rate
        lr_decay_steps=int(settings.steps * settings.decay_frac),
        device="cpu",
        # A dead feature is one silent for a tenth of the run; the density window of the
        # metadata's final L0 is the same tenth.
        dead_feature_window=max(1, settings.steps // 10),
        feature_sampling_window=max(1, settings.steps // 10),
        n_batches_for_norm_estimate=settings.norm_estimate_batches,
    )
    data = activation_batches(acts, settings.batch_size, torch.Generator().manual_seed(seed))
    trainer = SAETrainer(trainer_cfg, training_sae, data)
    # SAETrainer draws a tqdm bar on stderr; twelve of them would bury the stage's own lines.
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.fit()

    # The trainer has folded the normalisation into the weights; keep only the inference part.
    sae = SAE.from_dict(training_sae.cfg.get_inference_sae_cfg_dict())
    sae.load_state_dict(training_sae.state_dict())
    sae.eval()
    return sae
