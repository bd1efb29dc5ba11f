"""The bench's inputs: the workload shapes and the random GPT-2-Small-shaped model and SAE they run on.

Everything that sizes the bench lives here (`GPT2_SMALL_SHAPE`, `D_SAE`, `build_sae`, `workloads`), and
the other bench modules read it through this module, so a test can shrink the whole bench by patching it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GPT2_SMALL_SHAPE = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024, d_vocab=50257,
                        act_fn="gelu_new", normalization_type="LN")
D_SAE = 24576


@dataclass(frozen=True)
class Workload:
    name: str
    layer: int
    n_features: int
    alphas: tuple[float, ...]
    n_passages: int
    max_len: int
    batch_size: int
    density: float | None  # None: the random SAE as is (dense)

    def describe(self) -> str:
        return (f"{self.name}: layer {self.layer}, {self.n_features} features x {len(self.alphas)} alphas "
                f"{list(self.alphas)}, {self.n_passages} passages x {self.max_len} tokens, batch {self.batch_size}"
                + (f", features firing on ~{self.density:.1%} of tokens" if self.density else ", dense features"))


def workloads(quick: bool, full: bool) -> list[Workload]:
    alphas = (0.0, 0.5, 1.0, 2.0, 4.0)
    if full:  # the default study's whole shape: 12 layers x 5 features x 5 alphas x 200 x 256
        return [Workload(f"full-L{layer}", layer, 5, alphas, 200, 256, 16, 0.003) for layer in range(12)]
    n, t = (4, 64) if quick else (8, 128)
    f = 2 if quick else 3
    return [Workload("dense", 6, f, alphas, n, t, 8, None), Workload("sparse", 6, f, alphas, n, t, 8, 0.003)]


def build_model(device: torch.device, dtype: torch.dtype, seed: int = 0):
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(**GPT2_SMALL_SHAPE, seed=seed, device=str(device), dtype=dtype)
    model = HookedSAETransformer(cfg)
    model.eval().requires_grad_(False)
    return model


def build_sae(device: torch.device, dtype: str, hook: str, seed: int = 0):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=GPT2_SMALL_SHAPE["d_model"], d_sae=D_SAE, dtype=dtype, device=str(device),
                                        metadata=SAEMetadata(hook_name=hook, model_name="gpt2-shaped")))
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.normal_(0, 0.05)
    sae.eval().requires_grad_(False)
    return sae


@torch.inference_mode()
def make_sparse(model, sae, tokens: torch.Tensor, hook: str, features: list[int], density: float) -> None:
    """Shift the features' encoder biases so each fires on about `density` of the positions."""
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    x = sae.process_sae_in(cache[hook][:, 1:].reshape(-1, sae.cfg.d_in))
    pre = (x @ sae.W_enc[:, features] + sae.b_enc[features]).float()
    q = torch.quantile(pre[:100_000], 1.0 - density, dim=0)
    # A margin keeps the position at the quantile clear of 0: a pre-activation within rounding of
    # the ReLU's kink would fire in one float path and not in another.
    margin = 1e-3 * pre.std(dim=0)
    sae.b_enc[features] -= (q + margin).to(sae.b_enc.dtype)


@dataclass
class Inputs:
    """One workload's model, SAE, tokens and features, as every measurement of it uses them."""

    model: object
    sae: object
    tokens: torch.Tensor  # on the device
    features: list[int]
    hook: str
    resume_at: int


def prepare(w: Workload, device: torch.device) -> Inputs:
    """The random model and SAE (made sparse if the workload says so), seeded tokens with BOS, the features."""
    hook = f"blocks.{w.layer}.hook_resid_post"
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, GPT2_SMALL_SHAPE["d_vocab"], (w.n_passages, w.max_len), generator=g)
    tokens[:, 0] = GPT2_SMALL_SHAPE["d_vocab"] - 1  # <|endoftext|> = 50256 is GPT-2's BOS
    tokens = tokens.to(device)
    features = [(100 + 37 * i) % D_SAE for i in range(w.n_features)]
    model = build_model(device, torch.float32)
    sae = build_sae(device, "float32", hook)
    if w.density is not None:
        make_sparse(model, sae, tokens, hook, features, w.density)
    return Inputs(model, sae, tokens, features, hook, w.layer + 1)


CONTROL_SEED = 1234  # params.yaml's default seed: the bench's controls are the directions the study would draw


def control_directions(w: Workload, inputs: Inputs, draws: int) -> torch.Tensor | None:
    """The random-direction controls the study would run with `control_draws` = draws (None for 0)."""
    from pipeline.engine.controls import random_unit_directions

    return random_unit_directions(CONTROL_SEED, w.layer, inputs.features, draws, GPT2_SMALL_SHAPE["d_model"])
