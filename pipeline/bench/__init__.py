"""`python -m pipeline bench`: the engine against the plain SAE-Lens way, timed and compared.

No download: GPT-2-Small-shaped random weights (HookedTransformerConfig: 12 layers, d_model 768,
12 heads, d_mlp 3072, d_vocab 50257 -- the same FLOPs as the real model) and a StandardSAE with
d_in 768 and d_sae 24576. Two workloads: `dense` (the random SAE's features fire on about half
the tokens) and `sparse` (the chosen features' encoder biases are shifted so each fires on about
0.3% of tokens, like typical res-jb features).

- plain: what a careful user writes from SAE-Lens's docs: HookedSAETransformer with the SAE
  spliced in (`use_error_term=True`) and a hook scaling `hook_sae_acts_post` of feature i at
  positions >= 1, one full forward per (feature, alpha) and batch; the clean pass once per batch.
- engine: `pipeline.engine.run.run_layer` + `variant_metrics`, exactly as `intervene` runs them.

Both produce every scalar metric; `max_rel_diff` is, over metrics, max_variants |engine - plain|
divided by max_variants |plain| (the difference relative to the metric's scale in the workload).
Both are also measured against the definition computed in float64 (`engine_vs_float64`,
`plain_vs_float64`, and absolute differences per metric): two float32 computations of the same
number differ by float32 rounding, and this says which of the two is closer to exact.
`floor_fraction` = (matmul FLOPs of the forward work the engine performs / the device's measured
fp32 matmul rate) / the engine's wall time: 1.0 would mean every second went to matmuls at peak.

The package, one job a module: `workloads` (the shapes and the random model and SAE), `references` (the plain
SAE-Lens way, the float64 definition and how metrics are compared; the tests use them too), `measure` (time,
memory, FLOPs, device consistency), `generation` (steered generation's throughput: tokens generated per
second, one layer's continuations in one batch with a KV cache) and `run` (`run_bench` and its printed table).
"""

from __future__ import annotations

from pipeline.bench.references import (
    COMPARED,
    float64_reference,
    max_rel_diff,
    metrics_table,
    plain_way,
    precision_cost,
)
from pipeline.bench.run import run_bench
from pipeline.bench.workloads import Workload

__all__ = ["COMPARED", "Workload", "float64_reference", "max_rel_diff", "metrics_table", "plain_way",
           "precision_cost", "run_bench"]
