"""Steered generation on a Gemma-2-like model (rotary positions, grouped-query attention, alternating local and
global attention, RMSNorm before and after each sublayer, soft-capped logits): the KV-cache path with left-padded
prompts equals, token for token, a loop of full forward passes of each prompt alone through SAE-Lens's splice.

Rotary positions are where left padding could go wrong (a pad must take no position), and a sliding window shorter
than prompt plus continuation makes the local layers' mask matter. Tiny random weights, no download.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.engine.forward import FeatureEncoder
from pipeline.engine.generate import Rows, generate_batch
from pipeline.engine.interventions import INTERVENTIONS
from tests.builders import build_sae

LAYER = 1
HOOK = f"blocks.{LAYER}.hook_resid_post"
PROMPTS = [[2, 5, 9, 12, 7, 3], [2, 7], [2, 11, 3, 3, 8, 1, 30, 44, 17]]  # BOS = 2, as Gemma's; lengths 6, 2, 9
N_TOKENS = 7


def gemma_like(cls):
    """A 3-layer Gemma-2-architecture HookedTransformer (or HookedSAETransformer) with random weights, its config
    built from a Gemma-2 config.json as the pipeline builds it (pipeline.load.gemma2_config)."""
    from transformer_lens import HookedTransformerConfig

    from pipeline.load.gemma2_config import hooked_config_dict
    from pipeline.twin.gemma2 import Gemma2Shape, config_json

    shape = Gemma2Shape(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=48, vocab_size=61,
                        sliding_window=4)
    cfg = hooked_config_dict(config_json(shape), "google/gemma-2-2b") | {"n_ctx": 64, "seed": 0, "device": "cpu",
                                                                          "tokenizer_name": None}  # no download
    cfg["attn_scores_soft_cap"] = 5.0  # small enough to bind on these random weights
    torch.manual_seed(0)
    model = cls(HookedTransformerConfig.from_dict(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def splice_greedy(spliced, sae, prompt: list[int], feature: int | None, edit) -> list[int]:
    """The plain way: the whole sequence through SAE-Lens's splice (error term kept) at every step, no cache, no
    padding, the feature's code edited at every position but BOS."""
    tokens = list(prompt)

    def edit_hook(acts, hook):  # noqa: ARG001
        acts = acts.clone()
        acts[:, 1:, feature] = edit(acts[:, 1:, feature])
        return acts

    with torch.inference_mode():
        for _ in range(N_TOKENS):
            if feature is None:
                logits = spliced(torch.tensor([tokens]))
            else:
                with spliced.saes([sae], use_error_term=True):
                    logits = spliced.run_with_hooks(torch.tensor([tokens]),
                                                    fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", edit_hook)])
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize(("architecture", "normalize"), [("standard", "none"), ("topk", "layer_norm")])
@pytest.mark.parametrize(("mode", "value", "edit"), [("scale", 8.0, lambda a: a * 8.0), ("add", 6.0, lambda a: a + 6.0)])
def test_cached_left_padded_generation_equals_the_splice_without_a_cache(architecture, normalize, mode, value, edit):
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformer

    model = gemma_like(HookedTransformer)
    spliced = gemma_like(HookedSAETransformer)  # the same weights
    assert model.cfg.positional_embedding_type == "rotary" and model.cfg.n_key_value_heads == 2
    assert "local" in model.cfg.attn_types and max(len(p) for p in PROMPTS) + N_TOKENS > model.cfg.window_size
    sae = build_sae(d_in=32, d_sae=64, hook_name=HOOK, enc_bias=-0.3, architecture=architecture,
                    normalize_activations=normalize)
    with torch.no_grad():
        acts = sae.encode(model(torch.tensor([PROMPTS[2]]), stop_at_layer=LAYER + 1))[0, 1:]
    features = torch.argsort((acts != 0).sum(0), descending=True, stable=True)[:2].tolist()
    encoder = FeatureEncoder(sae, features)
    rows = Rows([], [], [], [])
    for p in range(len(PROMPTS)):
        for fi in (-1, 0, 1):
            rows.prompt.append(p)
            rows.feature.append(fi)
            rows.value.append(value)
            rows.sampled.append(False)
    ours = generate_batch(model, encoder, LAYER + 1, PROMPTS, rows, N_TOKENS, 1.0, 0, INTERVENTIONS[mode])
    changed = 0
    for r in range(len(rows)):
        feature = None if rows.feature[r] < 0 else features[rows.feature[r]]
        plain = splice_greedy(spliced, sae, PROMPTS[rows.prompt[r]], feature, edit)
        assert ours[r].tolist() == plain, (r, feature)
        changed += feature is not None and plain != splice_greedy(spliced, sae, PROMPTS[rows.prompt[r]], None, edit)
    assert changed > 0  # the steering changes continuations: the comparison is not vacuous
