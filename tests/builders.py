"""Tiny random-weight models, SAEs and token sets for the tests (no download, milliseconds)."""

from __future__ import annotations

import warnings

import torch

from pipeline.core.quiet import quiet_library_warnings

quiet_library_warnings()


def build_model_cfg(**overrides):
    from transformer_lens import HookedTransformerConfig

    kwargs = dict(
        n_layers=3, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=24, d_vocab=40,
        act_fn="gelu_new", normalization_type="LN", seed=0,
    )
    kwargs.update(overrides)
    return HookedTransformerConfig(**kwargs)


def build_model(cls=None, **overrides):
    """A random HookedTransformer (or `cls`, e.g. HookedSAETransformer) in float32, eval mode."""
    from transformer_lens import HookedTransformer

    cls = cls or HookedTransformer
    cfg = build_model_cfg(**overrides)
    torch.manual_seed(cfg.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(cfg)
    # Random init leaves LayerNorm at identity and biases at zero; perturb them so every
    # parameter matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    return model


def build_sae(d_in: int = 16, d_sae: int = 64, hook_name: str = "blocks.1.hook_resid_post",
              seed: int = 0, enc_bias: float = 0.0, architecture: str = "standard", normalize_activations: str = "none"):
    """A random SAE; a negative `enc_bias` makes features fire sparsely; `normalize_activations` as SAE-Lens's
    (layer_norm: OpenAI's TopK SAEs)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=hook_name, model_name="tiny", hook_head_index=None, prepend_bos=True)
    torch.manual_seed(seed)
    if architecture == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta, normalize_activations=normalize_activations))
    elif architecture == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta,
                                            normalize_activations=normalize_activations))
    elif architecture == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=8, metadata=meta, normalize_activations=normalize_activations))
    else:
        raise ValueError(architecture)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in) / d_in**0.5)
        sae.b_dec.copy_(0.1 * torch.randn(d_in))
        if hasattr(sae, "b_enc"):
            sae.b_enc.copy_(enc_bias + 0.1 * torch.randn(d_sae))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(0.2 * torch.rand(d_sae))
    sae.eval()
    return sae


def build_tokens(n: int = 6, t: int = 12, d_vocab: int = 40, bos: int = 0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, d_vocab, (n, t), generator=g)
    tokens[:, 0] = bos
    return tokens
