"""SAE families beyond res-jb: the splice of input-normalising SAEs, and the hub twin's OpenAI TopK
SAEs, Gemma-2-2B and Gemma Scope as the real loaders read them.

The first part proves pipeline.engine.normalization against SAE-Lens's own splice on random SAEs
built with SAE-Lens's classes; the second builds a tiny twin once (module scope) and loads it with
SAE-Lens, TransformerLens and transformers, offline.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipeline.engine.normalization import position_scale
from pipeline.errors import UserError

HOOK = "blocks.1.hook_resid_post"
D_MODEL, D_SAE = 32, 96


def tiny_model(dtype: torch.dtype):
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=3, d_model=D_MODEL, n_heads=4, d_head=8, d_mlp=64, d_vocab=61, n_ctx=24,
                                  act_fn="gelu_new", normalization_type="LN", seed=3, dtype=dtype)
    return HookedSAETransformer(cfg).eval()


def random_sae(architecture: str, normalize: str, dtype: torch.dtype, seed: int, **extra):
    """An SAE-Lens SAE with random weights (biases too) whose features fire on a share of positions."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    classes = {"topk": (TopKSAE, TopKSAEConfig), "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
               "standard": (StandardSAE, StandardSAEConfig)}
    sae_cls, cfg_cls = classes[architecture]
    cfg = cfg_cls(d_in=D_MODEL, d_sae=D_SAE, dtype=str(dtype).removeprefix("torch."), normalize_activations=normalize,
                  metadata=SAEMetadata(hook_name=HOOK), **extra)
    sae = sae_cls(cfg).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float64).to(dtype) * 0.5)
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g, dtype=torch.float64).to(dtype) * 0.3)
    return sae.eval()


def splice_residual(model, sae, tokens, feature: int, edit):
    """What SAE-Lens's splice (error term kept) hands to the next block, with feature i edited by
    `edit(acts_i)` at every position but BOS: the plain way of SAE-Lens's docs."""
    captured = {}

    def edit_hook(acts, hook):  # noqa: ARG001 (TransformerLens passes the hook)
        acts = acts.clone()
        acts[:, 1:, feature] = edit(acts[:, 1:, feature])
        return acts

    def capture(resid, hook):  # noqa: ARG001
        captured["resid"] = resid.detach().clone()

    model.add_sae(sae, use_error_term=True)
    try:
        model.run_with_hooks(tokens, stop_at_layer=3, fwd_hooks=[
            (f"{HOOK}.hook_sae_acts_post", edit_hook), ("blocks.2.hook_resid_pre", capture)])
    finally:
        model.reset_saes()
    return captured["resid"]


def direction(sae, feature: int):
    row = sae.W_dec[feature]
    return row / row.norm() if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False) else row


EDITS = {  # name: (value, acts_i -> edited acts_i, acts_i -> c_t)
    "scale": [(v, lambda a, v=v: a * v, lambda a, v=v: (v - 1.0) * a) for v in (0.0, 0.5, 4.0)],
    "clamp": [(v, lambda a, v=v: torch.full_like(a, v), lambda a, v=v: v - a) for v in (0.0, 3.0)],
    "add": [(v, lambda a, v=v: a + v, lambda a, v=v: torch.full_like(a, v)) for v in (-2.0, 1.5)],
}
FAMILIES = [  # (architecture, normalize_activations, extra cfg)
    ("topk", "layer_norm", {"k": 6}),
    ("topk", "layer_norm", {"k": 6, "rescale_acts_by_decoder_norm": True}),
    ("jumprelu", "layer_norm", {}),
    ("standard", "constant_norm_rescale", {}),
    ("topk", "constant_norm_rescale", {"k": 6}),
    ("jumprelu", "none", {}),
    ("topk", "none", {"k": 6}),
]


@pytest.mark.parametrize(("architecture", "normalize", "extra"), FAMILIES,
                         ids=[f"{a}-{n}{'-rescaled' if e.get('rescale_acts_by_decoder_norm') else ''}"
                              for a, n, e in FAMILIES])
def test_x_plus_c_s_d_equals_sae_lens_splice(architecture, normalize, extra):
    """x_t + c_t s_t d_i against SAE-Lens's splice for scale, clamp and add, at several values, for
    features that fire and one that never does, at every position after BOS of random passages.
    In float64, so the differences are rounding of 1e-14 and any real mismatch stands out."""
    worst, worst_unscaled = splice_agreement(architecture, normalize, extra, torch.float64)
    assert worst < 1e-10
    if normalize != "none":  # the scale matters: leaving it out is visibly wrong
        assert worst_unscaled > 1e-3


def test_the_agreement_holds_in_the_studys_float32():
    worst, worst_unscaled = splice_agreement("topk", "layer_norm", {"k": 6}, torch.float32)
    assert worst < 1e-4 < worst_unscaled  # residual entries here are O(1-10): float32 rounding


def splice_agreement(architecture: str, normalize: str, extra: dict, dtype: torch.dtype) -> tuple[float, float]:
    """Worst |x + c s d - splice| over every edit, and the same without s_t."""
    model = tiny_model(dtype)
    sae = random_sae(architecture, normalize, dtype, seed=len(normalize) + len(extra), **extra)
    tokens = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
        x = cache[HOOK]
        acts = sae.encode(x)
        scale = position_scale(sae.cfg, x)
    firing = (acts[:, 1:] != 0).float().mean(dim=(0, 1))
    features = firing.argsort(descending=True)[:2].tolist() + [int(firing.argmin())]
    assert firing[features[0]] > 0.1  # the edit changes many positions
    worst, worst_unscaled, n = 0.0, 0.0, 0
    for edits in EDITS.values():
        for _value, edit, coefficient in edits:
            for feature in features:
                with torch.no_grad():
                    theirs = splice_residual(model, sae, tokens, feature, edit)
                c = torch.zeros_like(acts[..., feature])
                c[:, 1:] = coefficient(acts[:, 1:, feature])
                delta = c.unsqueeze(-1) * direction(sae, feature)
                ours = x + scale.unsqueeze(-1) * delta
                worst = max(worst, (ours - theirs).abs().max().item())
                worst_unscaled = max(worst_unscaled, (x + delta - theirs).abs().max().item())
                n += 1
    print(f"{architecture}/{normalize}/{extra}/{dtype}: worst |x + c s d - splice| over {n} edits = {worst:.2e} "
          f"(without s_t: {worst_unscaled:.2e})")
    return worst, worst_unscaled


def test_layer_norm_scale_is_the_positions_std_and_mean_free():
    """s_t is the Bessel-corrected std of x_t over d_model, and adding any per-position constant to
    the residual (what TransformerLens's centring does) changes neither s_t nor the codes."""
    sae = random_sae("topk", "layer_norm", torch.float64, seed=5, k=6)
    x = torch.randn(4, 7, D_MODEL, dtype=torch.float64)
    s = position_scale(sae.cfg, x)
    expected = ((x - x.mean(-1, keepdim=True)) ** 2).sum(-1).div(D_MODEL - 1).sqrt()
    torch.testing.assert_close(s, expected, rtol=1e-12, atol=0)
    shifted = x + torch.randn(4, 7, 1, dtype=torch.float64) * 3
    torch.testing.assert_close(position_scale(sae.cfg, shifted), s, rtol=1e-10, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(shifted), sae.encode(x), rtol=1e-8, atol=1e-9)


def test_float32_scale_is_sae_lens_own_arithmetic():
    """In the study's float32 the scale is bit-for-bit the std SAE-Lens stores for its decode."""
    sae = random_sae("topk", "layer_norm", torch.float32, seed=6, k=6)
    x = torch.randn(2, 9, D_MODEL) * 40 + 3
    with torch.no_grad():
        sae.encode(x)  # run_time_activation_ln_in keeps its statistics until the next decode
        stored = sae.ln_std.squeeze(-1).clone()
    assert torch.equal(position_scale(sae.cfg, x), stored)


@pytest.mark.parametrize("mode", ["expected_average_only_in", "covariance_whitening", "batch_norm"])
def test_normalisations_without_a_run_time_splice_are_refused_in_one_line(mode):
    with pytest.raises(UserError) as err:
        position_scale(SimpleNamespace(normalize_activations=mode, d_in=D_MODEL), torch.zeros(1, 2, D_MODEL))
    message = str(err.value)
    assert "\n" not in message and f"'{mode}'" in message and "layer_norm" in message
