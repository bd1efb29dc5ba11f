"""The toy preset's model and SAEs, written to disk in standard formats.

The model is a 12-layer byte-level HookedTransformer (so `layers: 0..11` is valid for both
presets), saved as HookedTransformerConfig kwargs + a safetensors state dict; each SAE is an
SAE-Lens StandardSAE saved with `save_model` into `saes/blocks.L.hook_resid_post/`. Everything is
deterministic from `seed`. `pipeline.loading` reads them back exactly as it would a user's own
local model and SAEs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.tokenizer import ByteTokenizer

# Tiny widths, 12 layers, a 257-token byte vocabulary (256 bytes + BOS).
TOY_MODEL_KWARGS: dict[str, Any] = {
    "n_layers": 12,
    "d_model": 64,
    "n_heads": 4,
    "d_head": 16,
    "d_mlp": 256,
    "n_ctx": 128,
    "d_vocab": ByteTokenizer.vocab_size,
    "act_fn": "gelu_new",
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "default_prepend_bos": False,
    "model_name": "toy-bytes-12L",
}
TOY_D_SAE = 512


def toy_sae_folder(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def toy_model_kwargs(seed: int) -> dict[str, Any]:
    return {**TOY_MODEL_KWARGS, "seed": seed}


def new_toy_model(seed: int):
    """A randomly initialised toy HookedTransformer (deterministic from seed)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    return HookedTransformer(HookedTransformerConfig(**toy_model_kwargs(seed)))


def new_toy_sae(layer: int, d_in: int, d_sae: int, seed: int, dataset: str = "python-docs"):
    """A StandardSAE for blocks.{layer}.hook_resid_post, randomly initialised from seed."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed * 1000 + layer)
    cfg = StandardSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        dtype="float32",
        device="cpu",
        apply_b_dec_to_input=True,
        metadata=SAEMetadata(
            model_name=TOY_MODEL_KWARGS["model_name"],
            hook_name=f"blocks.{layer}.hook_resid_post",
            hook_head_index=None,
            context_size=TOY_MODEL_KWARGS["n_ctx"],
            prepend_bos=True,
            dataset_path=dataset,
            model_from_pretrained_kwargs={},
        ),
    )
    sae = StandardSAE(cfg)
    with torch.no_grad():
        # Decoder rows of unit norm, a small negative encoder bias so features are sparse-ish.
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.fill_(-0.5)
    return sae


def save_toy(out_dir: Path, model, saes: dict[int, Any], seed: int) -> None:
    """Write model and SAEs in the local formats pipeline.loading reads."""
    from pipeline.loading import save_local_model

    save_local_model(model, out_dir / "model", toy_model_kwargs(seed), ByteTokenizer().spec())
    for layer, sae in saes.items():
        sae.save_model(out_dir / "saes" / toy_sae_folder(layer))


def build_random_toy(out_dir: Path, seed: int) -> None:
    """Random weights: what the tests use where the numbers need no meaning."""
    model = new_toy_model(seed)
    saes = {layer: new_toy_sae(layer, model.cfg.d_model, TOY_D_SAE, seed) for layer in range(model.cfg.n_layers)}
    save_toy(out_dir, model, saes, seed)


def build_toy(out_dir: Path, config) -> dict[str, Any]:
    """The model stage's toy: random weights for now (deterministic from config.seed)."""
    build_random_toy(out_dir, config.seed)
    return {"weights": "random", "seed": config.seed}
