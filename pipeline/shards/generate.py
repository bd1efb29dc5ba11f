"""The work of stage `generate` (pipeline.stages.generate), as shards of layers.

For every layer and each of its selected features, every value of `generate_alphas` continues each prompt for
`generate_tokens` tokens, greedily and by seeded sampling at `generate_temperature`, with the intervention at
every position but BOS (pipeline.engine.generate); the clean model's continuations of the same prompts stand
beside them. The prompts are `generate_prompts` (after BOS) and, per feature, its top-activating context in
data/tokens.npy cut just after the token where it fires. The clean model then reads every continuation back
(pipeline.engine.generate.clean_readout) and pipeline.engine.generation_metrics measures it.

A layer's generation uses nothing of another layer: its own SAE, its own features' prompts and rows, sampling
noise seeded by (seed, step, prompt). So a shard (`layer_block`) runs the per-layer work for its block of layers
exactly as one run over every layer does, and `merge` concatenates the blocks in layer order: the same bytes for
any number of shards (tests/stages/test_shards_exact.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.core import artifacts
from pipeline.core.errors import UserError
from pipeline.core.params.config import Config
from pipeline.engine.forward import FeatureEncoder, residual_at
from pipeline.engine.generate import Rows, clean_readout, generate
from pipeline.engine.generation_metrics import per_row, summary_row
from pipeline.engine.interventions import INTERVENTIONS
from pipeline.engine.snippets import CONTEXT_CHARS_BEFORE, direct_logit_effect, top_contexts
from pipeline.load.tokenizer import Tokenizer

DECODINGS = ("greedy", "sampled")
ACT_DIGITS = 4  # activations in data/generations.json
CONTEXT_MAX_TOKENS = 48  # a context prompt's length, BOS included: readable, and cheap to continue


def prompt_ids(config: Config, tokenizer: Tokenizer, n_ctx: int) -> list[list[int]]:
    """BOS + each neutral prompt; one that leaves no room for the continuation is refused."""
    out = []
    for i, text in enumerate(config.generate_prompts):
        ids = [tokenizer.bos_token_id, *tokenizer.encode(text)]
        if len(ids) + config.generate_tokens > n_ctx:
            raise UserError(f"params.yaml: generate_prompts[{i}] ({text[:40]!r}) is {len(ids)} tokens with BOS; with "
                            f"generate_tokens {config.generate_tokens} it needs at most {n_ctx} (the model's "
                            "context): shorten the prompt or lower generate_tokens")
        out.append(ids)
    return out


def context_prompt(passage: np.ndarray, t: int, tokenizer: Tokenizer, max_tokens: int) -> list[int]:
    """BOS + the passage's tokens up to and including position t: about CONTEXT_CHARS_BEFORE characters
    before it, at most `max_tokens` in all."""
    lo, chars = t, len(tokenizer.token_str(int(passage[t])))
    while lo > 1 and chars < CONTEXT_CHARS_BEFORE and t + 2 - lo < max_tokens:
        lo -= 1
        chars += len(tokenizer.token_str(int(passage[lo])))
    return [int(passage[0]), *(int(x) for x in passage[lo:t + 1])]


@torch.inference_mode()
def top_context_per_feature(model, encoder: FeatureEncoder, resume_at: int, tokens: np.ndarray,
                            batch_size: int) -> list[tuple[int, int, float] | None]:
    """(passage, position, activation) of each feature's strongest firing on the corpus (None: it never fires)."""
    device = next(model.parameters()).device
    acts = []
    for start in range(0, len(tokens), batch_size):
        batch = torch.from_numpy(tokens[start:start + batch_size]).long().to(device)
        acts.append(encoder(residual_at(model, batch, resume_at))[:, 1:-1].float().cpu().numpy())
    scored = np.concatenate(acts)  # [N, T-2, n_feat], positions t = 1..T-2
    return [next(iter(top_contexts(scored[..., fi], 1)), None) for fi in range(scored.shape[-1])]


def layer_rows(n_neutral: int, contexts: list[int | None], n_features: int, alphas: list[float]) -> tuple[Rows, list[str]]:
    """Every row of a layer, a prompt's rows together: the clean rows first, then each feature x value.
    Prompts 0..n_neutral-1 are for every feature; `contexts[fi]` is feature fi's own prompt (or None)."""
    rows, decoding = Rows([], [], [], []), []

    def add(prompt: int, fi: int, value: float) -> None:
        for d in DECODINGS:
            rows.prompt.append(prompt)
            rows.feature.append(fi)
            rows.value.append(value)
            rows.sampled.append(d == "sampled")
            decoding.append(d)

    for p in range(n_neutral):
        add(p, -1, 0.0)
        for fi in range(n_features):
            for a in alphas:
                add(p, fi, a)
    for fi, p in enumerate(contexts):
        if p is not None:
            add(p, -1, 0.0)
            for a in alphas:
                add(p, fi, a)
    return rows, decoding


def metric_rows(layer: int, features: list[int], alphas: list[float], rows: Rows, decoding: list[str],
                measures: dict[str, np.ndarray], generated: np.ndarray, config: Config) -> list[dict[str, Any]]:
    clean = {(rows.prompt[r], decoding[r]): r for r in range(len(rows)) if rows.feature[r] < 0}
    out = []
    for fi, feature in enumerate(features):
        for a in alphas:
            for d in DECODINGS:
                steered = [r for r in range(len(rows))
                           if rows.feature[r] == fi and rows.value[r] == a and decoding[r] == d]
                base = [clean[(rows.prompt[r], d)] for r in steered]
                out.append({"layer": layer, "feature": feature, "alpha": a, "intervention": config.intervention,
                            "decoding": d, **summary_row(measures, steered, base, fi, generated)})
    return out


def run_layer_generation(model, sae, plan, features: list[int], tokens: np.ndarray, neutral: list[list[int]],
                         config: Config, tokenizer: Tokenizer, bar) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    encoder = FeatureEncoder(sae, features)
    alphas = list(config.generate_alphas)
    room = model.cfg.n_ctx - config.generate_tokens
    found = top_context_per_feature(model, encoder, plan.resume_at, tokens, config.batch_size)
    prompts = list(neutral)
    contexts: list[int | None] = []
    for hit in found:
        contexts.append(None if hit is None else len(prompts))
        if hit is not None:
            prompts.append(context_prompt(tokens[hit[0]], hit[1], tokenizer, min(room, CONTEXT_MAX_TOKENS)))
    rows, decoding = layer_rows(len(neutral), contexts, len(features), alphas)
    generated = generate(model, encoder, plan.resume_at, prompts, rows, config.generate_tokens,
                         config.generate_temperature, config.seed, INTERVENTIONS[config.intervention],
                         config.generate_batch_size, progress=bar.update)
    readout = clean_readout(model, encoder, plan.resume_at, prompts, rows.prompt, generated, config.generate_batch_size)
    logit = [direct_logit_effect(model, encoder.directions[fi], tokenizer, config.top_k_tokens) for fi in range(len(features))]
    promoted = [{int(p[1]) for p in effect["promoted"]} for effect in logit]
    ids, acts = generated.numpy(), readout.acts.numpy()
    measures = per_row(ids, acts, readout.nll.numpy(), promoted)
    table = metric_rows(plan.layer, features, alphas, rows, decoding, measures, ids, config)
    detail = {
        "layer": plan.layer, "hook": plan.hook, "sae_id": plan.sae_id,
        "features": [{"feature": f, "promoted": [[p[0], p[2]] for p in logit[fi]["promoted"]],
                      "context": None if found[fi] is None else
                      {"passage": found[fi][0], "position": found[fi][1], "activation": round(found[fi][2], 6)},
                      "context_prompt": contexts[fi]}
                     for fi, f in enumerate(features)],
        "prompts": [{"kind": "neutral" if i < len(neutral) else "context",
                     "tokens": [tokenizer.token_str(t) for t in p]} for i, p in enumerate(prompts)],
        "rows": [{"prompt": rows.prompt[r], "feature": None if rows.feature[r] < 0 else features[rows.feature[r]],
                  "alpha": None if rows.feature[r] < 0 else rows.value[r], "decoding": decoding[r],
                  "tokens": [tokenizer.token_str(int(t)) for t in ids[r]],
                  "loss": round(float(measures["loss"][r]), 6),
                  # the clean rows carry every feature's activations (each feature's baseline), a steered row its own
                  "acts": {str(features[fi]): np.round(acts[r, :, fi], ACT_DIGITS).tolist()
                           for fi in (range(len(features)) if rows.feature[r] < 0 else [rows.feature[r]])}}
                 for r in range(len(rows))],
    }
    return table, detail


@dataclass(frozen=True)
class GenerateInputs:
    """What every shard of `generate` needs besides the files it reads: the params (and the keys the stage
    declares, so a shard reads no other)."""

    config: Config
    params: tuple[str, ...]


def layer_block(inputs: GenerateInputs, spec: dict[str, Any]) -> dict[str, Any]:
    """One shard: the table rows and generations.json entries of the layers spec["layers"], in that order."""
    from tqdm import tqdm

    from pipeline.core.params.device import resolve_device
    from pipeline.core.params.stage_params import StageParams
    from pipeline.core.plan.record import ModelRecord
    from pipeline.core.runinfo import device_description
    from pipeline.load import load_model, load_sae, load_tokenizer

    config = StageParams.of(inputs.config, "generate", inputs.params)
    model_record = ModelRecord.read()
    features = artifacts.read_features(spec["layers"])
    tokens = artifacts.read_tokens()
    tokenizer = load_tokenizer(model_record)
    neutral = prompt_ids(config, tokenizer, model_record.model.n_ctx)
    device = resolve_device(config.device)
    model = load_model(model_record, device, config.dtype, hooks=True)
    tables, details = [], []
    with tqdm(desc="generate", unit="row", disable=None, leave=False) as bar:
        for layer in spec["layers"]:
            plan = model_record.layer(layer).plan()
            layer_features = features[features["layer"] == layer]["feature"].astype(int).tolist()
            sae = load_sae(model_record, layer, device, config.dtype)
            table, detail = run_layer_generation(model, sae, plan, layer_features, tokens, neutral, config,
                                                 tokenizer, bar)
            tables += table
            details.append(detail)
    return {"tables": tables, "details": details, "device": device_description(device)}


def merge(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Any]:
    """The shards' table rows and per-layer details in layer order (the specs' order), and the device(s)."""
    devices = sorted({r["device"] for r in results})
    return ([row for r in results for row in r["tables"]], [d for r in results for d in r["details"]],
            devices[0] if len(devices) == 1 else devices)
