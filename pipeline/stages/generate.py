"""Stage `generate`: what the model writes with each feature turned up, beside the clean model's text.

For every layer and each of its selected features, every value of `generate_alphas` continues each
prompt for `generate_tokens` tokens, greedily and by seeded sampling at `generate_temperature`,
with the intervention at every position but BOS (pipeline.engine.generate); the clean model's
continuations of the same prompts stand beside them. The prompts are `generate_prompts` (after
BOS) and, per feature, its top-activating context in data/tokens.npy cut just after the token
where it fires. The clean model then reads every continuation back (pipeline.engine.generate.
clean_readout) and pipeline.engine.generation_metrics measures it.

Writes metrics/generation.csv (one row per layer, feature, alpha and decoding), data/generations.json
(the texts, token by token, with the feature's activation at each generated token) and
data/runs/generate.json. One stage for all layers: the model loads once, each layer's SAE in turn,
and the work per layer is small (a process start alone costs seconds). It runs in shards of layers,
in this process or on a cluster as the environment says (pipeline/shards/generate.py,
pipeline/executor, docs/cluster.md); any number of shards writes the same bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline import artifacts
from pipeline.artifacts import ModelRecord
from pipeline.config import Config
from pipeline.engine.forward import FeatureEncoder, residual_at
from pipeline.engine.generate import Rows, clean_readout, generate
from pipeline.engine.generation_metrics import per_row, summary_row
from pipeline.engine.interventions import INTERVENTIONS
from pipeline.engine.snippets import CONTEXT_CHARS_BEFORE, direct_logit_effect, top_contexts
from pipeline.errors import UserError
from pipeline.io import write_json
from pipeline.runinfo import stage_record
from pipeline.stage_params import StageParams
from pipeline.tokenizer import Tokenizer, study_tokenizer

# The params this stage reads (its dvc.yaml params; tests/test_stage_deps.py checks they agree).
# alpha_sweep and intervention: a null generate_alphas is the sweep (as written) minus the identity.
PARAMS = ("layers", "generate_alphas", "alpha_sweep", "intervention", "generate_tokens", "generate_temperature",
          "generate_prompts", "generate_batch_size", "top_k_tokens", "seed", "batch_size", "device", "dtype")
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


def run_generate_stage(config: Config | StageParams) -> pd.DataFrame:
    config = StageParams.of(config, "generate", PARAMS)
    if not config.generate_alphas:
        raise UserError(f"params.yaml: generate_alphas is empty (alpha_sweep {list(config.alpha_sweep)} holds only "
                        f"the {config.intervention} identity); set generate_alphas, e.g. [0, 4]")
    model_record = ModelRecord.read()
    for layer in config.layers:
        model_record.layer(layer)  # a layer missing from data/model.json is one line, before anything runs
    features = artifacts.read_features(config.layers)
    for layer in config.layers:
        if not (features["layer"] == layer).any():
            raise UserError(f"{artifacts.FEATURES} has no features for layer {layer}; rerun the features stage")
    artifacts.need(artifacts.TOKENS, "tokenize")

    with stage_record("generate", layers=list(config.layers)) as record:
        tokenizer = study_tokenizer(model_record)
        prompt_ids(config, tokenizer, model_record.model.n_ctx)  # refused before anything loads
        # ---- the work, in shards of layers (pipeline/shards/generate.py) where the executor says ----------------
        from pipeline.executor import ShardWork, run_shards, settings_from_env, split_evenly, stage_fingerprint
        from pipeline.shards import generate as sharded

        settings = settings_from_env()
        layers = list(config.layers)
        work = ShardWork(
            stage="generate", fn=sharded.layer_block, inputs=sharded.GenerateInputs(config.for_checks()),
            specs=[{"layers": layers[block.start:block.stop]} for block in split_evenly(len(layers), settings.shards)],
            fingerprint="" if settings.executor == "local" else stage_fingerprint(
                "generate", {key: getattr(config, key) for key in PARAMS},
                [artifacts.MODEL_JSON, artifacts.preset_dir(model_record.preset), artifacts.TOKENS, artifacts.FEATURES]))
        run = run_shards(work, settings)
        tables, details, record["device"] = sharded.merge(run.results)
        record["executor"] = run.how
        # ---- end of the sharded work ---------------------------------------------------------------------------
        frame = pd.DataFrame(tables)[artifacts.GENERATION_COLUMNS]
        n_rows = sum(len(d["rows"]) for d in details)
        record["continuations"] = n_rows
        record["tokens_generated"] = n_rows * config.generate_tokens
        write_json(artifacts.GENERATIONS, {
            "intervention": config.intervention, "alphas": list(config.generate_alphas),
            "generate_tokens": config.generate_tokens, "temperature": config.generate_temperature, "seed": config.seed,
            "decodings": list(DECODINGS), "layers": details,
        })
        artifacts.write_generation_metrics(frame)
    return frame
