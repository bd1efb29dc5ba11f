"""Per-feature detail for the report: top-activating contexts with clean vs intervened predictions,
and the feature's direct effect on the logits (W_dec[i] @ W_U)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.engine.forward import FeatureEncoder, final_residual, intervened_residual, residual_at, unembed
from pipeline.engine.interventions import Intervention
from pipeline.load.tokenizer import Tokenizer

CONTEXT_CHARS_BEFORE = 120  # about a line of text, whatever the tokenizer (bytes or BPE)
CONTEXT_CHARS_AFTER = 30
TOP_PREDICTIONS = 5


def top_contexts(acts_scored: np.ndarray, n: int) -> list[tuple[int, int, float]]:
    """(passage, position t, activation) of the n strongest firings (largest |a|, the sign kept), at
    most one per passage.

    acts_scored is [N, S] over positions t = 1..T-2. Ties go to the earlier passage and position.
    """
    if n == 0:
        return []
    magnitude = np.abs(acts_scored)
    best_t = magnitude.argmax(axis=1)
    rows = np.arange(acts_scored.shape[0])
    best = magnitude[rows, best_t]
    order = np.lexsort((rows, -best))
    out = []
    for p in order[:n]:
        if best[p] == 0:
            break
        out.append((int(p), int(best_t[p]) + 1, float(acts_scored[p, best_t[p]])))
    return out


def _top(probs: torch.Tensor, tokenizer: Tokenizer, k: int = TOP_PREDICTIONS) -> list[list[Any]]:
    values, ids = probs.topk(k)
    return [[tokenizer.token_str(int(i)), int(i), round(float(v), 6)] for v, i in zip(values, ids, strict=True)]


@torch.inference_mode()
def feature_snippets(model, encoder: FeatureEncoder, resume_at: int, tokens: np.ndarray, feature_pos: int,
                     acts_scored: np.ndarray, value: float, intervention: Intervention, tokenizer: Tokenizer,
                     n: int) -> list[dict[str, Any]]:
    """Contexts where the feature fires most, the firing token marked, and the model's top
    next-token predictions there with and without the intervention at `value`."""
    found = top_contexts(acts_scored, n)
    if not found:
        return []
    device = next(model.parameters()).device
    passages = torch.from_numpy(tokens[[p for p, _, _ in found]]).long().to(device)
    resid = residual_at(model, passages, resume_at)
    acts = encoder(resid)[..., feature_pos]
    clean = unembed(model, final_residual(model, resid, resume_at))
    x = intervened_residual(resid, acts, encoder.directions[feature_pos], intervention, value, encoder.scale(resid))
    intervened = unembed(model, final_residual(model, x, resume_at))
    out = []
    for row, (p, t, a) in enumerate(found):
        lo, hi = _context_bounds(tokens[p], t, tokenizer)
        out.append({
            "passage": p,
            "position": t,
            "activation": round(a, 6),
            "tokens": [tokenizer.token_str(int(i)) for i in tokens[p, lo:hi]],
            "fire_index": t - lo,
            "next_token": tokenizer.token_str(int(tokens[p, t + 1])),
            "clean_top": _top(torch.softmax(clean[row, t], -1), tokenizer),
            "intervened_top": _top(torch.softmax(intervened[row, t], -1), tokenizer),
        })
    return out


def _context_bounds(passage: np.ndarray, t: int, tokenizer: Tokenizer) -> tuple[int, int]:
    """[lo, hi) around position t holding about CONTEXT_CHARS_BEFORE/AFTER characters (BOS excluded)."""
    lo, chars = t, 0
    while lo > 1 and chars < CONTEXT_CHARS_BEFORE:
        lo -= 1
        chars += len(tokenizer.token_str(int(passage[lo])))
    hi, chars = t + 1, 0
    while hi < len(passage) and chars < CONTEXT_CHARS_AFTER:
        chars += len(tokenizer.token_str(int(passage[hi])))
        hi += 1
    return lo, hi


@torch.inference_mode()
def direct_logit_effect(model, direction: torch.Tensor, tokenizer: Tokenizer, k: int) -> dict[str, list]:
    """Top promoted / suppressed tokens of W_dec[i] @ W_U (what Neuronpedia's logit lists show)."""
    effect = (direction.to(model.W_U.dtype) @ model.W_U).float()
    up = effect.topk(k)
    down = (-effect).topk(k)
    return {
        "promoted": [[tokenizer.token_str(int(i)), int(i), round(float(v), 6)] for v, i in zip(up.values, up.indices, strict=True)],
        "suppressed": [[tokenizer.token_str(int(i)), int(i), round(-float(v), 6)] for v, i in zip(down.values, down.indices, strict=True)],
    }
