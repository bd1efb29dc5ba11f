"""The bench's generation figure: continuations generated per second by `pipeline.engine.generate`,
exactly as stage `generate` runs it (every row of a layer in one batch, one KV cache), on the bench's
GPT-2-Small-shaped random model and SAE (pipeline.bench.workloads)."""

from __future__ import annotations

import time
from typing import Any

import torch

from pipeline.bench import workloads as wl
from pipeline.bench.measure import peak_memory, reset_peak_memory, sync
from pipeline.engine.forward import FeatureEncoder
from pipeline.engine.generate import Rows, generate
from pipeline.engine.interventions import INTERVENTIONS

LAYER = 6


def generation_shape(quick: bool, device: torch.device) -> dict[str, int]:
    """Prompts x features x values (x greedy and sampled, + a clean pair per prompt), tokens generated."""
    if quick:
        return {"prompts": 1, "features": 2, "alphas": 2, "prompt_len": 6, "tokens": 4}
    if device.type == "cpu":  # one prompt of the study's default: a minute on a laptop's CPU, not an hour
        return {"prompts": 1, "features": 5, "alphas": 4, "prompt_len": 6, "tokens": 16}
    return {"prompts": 6, "features": 5, "alphas": 4, "prompt_len": 6, "tokens": 32}  # one layer of the study


def generation_throughput(device: torch.device, quick: bool, log) -> dict[str, Any]:
    shape = generation_shape(quick, device)
    d_vocab = wl.GPT2_SMALL_SHAPE["d_vocab"]
    model = wl.build_model(device, torch.float32)
    sae = wl.build_sae(device, "float32", f"blocks.{LAYER}.hook_resid_post")
    encoder = FeatureEncoder(sae, [(100 + 37 * i) % wl.D_SAE for i in range(shape["features"])])
    g = torch.Generator().manual_seed(2)
    prompts = [[d_vocab - 1, *torch.randint(0, d_vocab - 1, (shape["prompt_len"] - 1,), generator=g).tolist()]
               for _ in range(shape["prompts"])]
    alphas = [0.0, 0.5, 2.0, 4.0][:shape["alphas"]]
    rows = Rows([], [], [], [])
    for p in range(len(prompts)):
        for fi, a in [(-1, 0.0), *((fi, a) for fi in range(shape["features"]) for a in alphas)]:
            for sampled in (False, True):
                rows.prompt.append(p)
                rows.feature.append(fi)
                rows.value.append(a)
                rows.sampled.append(sampled)
    args = (model, encoder, LAYER + 1, prompts)
    generate(*args, rows.take([0, 1]), 2, 0.7, 0, INTERVENTIONS["scale"], batch_size=2)  # warm-up
    reset_peak_memory(device)
    sync(device)
    start = time.perf_counter()
    out = generate(*args, rows, shape["tokens"], 0.7, 0, INTERVENTIONS["scale"], batch_size=len(rows))
    sync(device)
    seconds = time.perf_counter() - start
    n = out.numel()
    result = {"rows": len(rows), "tokens_per_row": shape["tokens"], "prompt_len": shape["prompt_len"],
              "generate_s": seconds, "tokens_per_s": n / seconds, "peak_mem_bytes": peak_memory(device)}
    log(f"generation: {len(rows)} continuations x {shape['tokens']} tokens in one batch with a KV cache: "
        f"{seconds:.2f} s, {result['tokens_per_s']:,.0f} tokens generated/s")
    return result
