"""The toy model's shape and file layout (its depth and SAE folder names come from the toy preset, which
`plan` reads before the toy is built); pipeline.toy.build builds it."""

from __future__ import annotations

from typing import Any

from pipeline.core.params.config import PRESETS
from pipeline.load.tokenizer import ByteTokenizer

# Tiny widths, 12 layers, a 257-token byte vocabulary (256 bytes + BOS). Two heads, d_mlp = 2 x
# d_model and exact GELU make a training step ~30% cheaper on 2 CPU cores than 4 heads, 4 x d_model
# and gelu_new, for 2.01 instead of 1.95 held-out bits per byte after the default 1500 steps.
TOY_MODEL_KWARGS: dict[str, Any] = {
    "n_layers": PRESETS["toy"].built_layers,  # the preset says, so `plan` knows before the toy is built
    "d_model": 64,
    "n_heads": 2,
    "d_head": 32,
    "d_mlp": 128,
    "n_ctx": 128,
    "d_vocab": ByteTokenizer.vocab_size,
    "act_fn": "gelu",
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "default_prepend_bos": False,
    "model_name": "toy-bytes-12L",
}
TOY_D_SAE = 512
# The toy always learns from Python's own docs: the model stage does not read the `corpus` param,
# so a trained toy never depends on which corpus a later study samples.
TOY_CORPUS = "python-docs"


def toy_sae_folder(layer: int) -> str:
    return PRESETS["toy"].built_sae_id(layer)


def toy_model_kwargs(seed: int, base: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**(base or TOY_MODEL_KWARGS), "seed": seed}
