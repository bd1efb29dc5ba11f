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
"""

from __future__ import annotations

import math
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import DTYPES
from pipeline.engine.metrics import live_positions, variant_metrics
from pipeline.engine.run import LayerResult, run_layer
from pipeline.errors import UserError
from pipeline.io import write_json
from pipeline.loading import resolve_device, torch_dtype
from pipeline.quiet import quiet_library_warnings

GPT2_SMALL_SHAPE = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024, d_vocab=50257,
                        act_fn="gelu_new", normalization_type="LN")
D_SAE = 24576
COMPARED = ("ce_int", "delta_ce", "delta_ce_se", "kl", "kl_se", "delta_ce_live", "kl_live", "mean_act_live")


@dataclass(frozen=True)
class Workload:
    name: str
    layer: int
    n_features: int
    alphas: tuple[float, ...]
    n_passages: int
    max_len: int
    batch_size: int
    density: float | None  # None: the random SAE as is (dense)

    def describe(self) -> str:
        return (f"{self.name}: layer {self.layer}, {self.n_features} features x {len(self.alphas)} alphas "
                f"{list(self.alphas)}, {self.n_passages} passages x {self.max_len} tokens, batch {self.batch_size}"
                + (f", features firing on ~{self.density:.1%} of tokens" if self.density else ", dense features"))


def workloads(quick: bool, full: bool) -> list[Workload]:
    alphas = (0.0, 0.5, 1.0, 2.0, 4.0)
    if full:  # the default study's whole shape: 12 layers x 5 features x 5 alphas x 200 x 256
        return [Workload(f"full-L{layer}", layer, 5, alphas, 200, 256, 16, 0.003) for layer in range(12)]
    n, t = (4, 64) if quick else (8, 128)
    f = 2 if quick else 3
    return [Workload("dense", 6, f, alphas, n, t, 8, None), Workload("sparse", 6, f, alphas, n, t, 8, 0.003)]


def build_model(device: torch.device, dtype: torch.dtype, seed: int = 0):
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(**GPT2_SMALL_SHAPE, seed=seed, device=str(device), dtype=dtype)
    model = HookedSAETransformer(cfg)
    model.eval().requires_grad_(False)
    return model


def build_sae(device: torch.device, dtype: str, hook: str, seed: int = 0):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=GPT2_SMALL_SHAPE["d_model"], d_sae=D_SAE, dtype=dtype, device=str(device),
                                        metadata=SAEMetadata(hook_name=hook, model_name="gpt2-shaped")))
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.normal_(0, 0.05)
    sae.eval().requires_grad_(False)
    return sae


@torch.inference_mode()
def make_sparse(model, sae, tokens: torch.Tensor, hook: str, features: list[int], density: float) -> None:
    """Shift the features' encoder biases so each fires on about `density` of the positions."""
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    x = sae.process_sae_in(cache[hook][:, 1:].reshape(-1, sae.cfg.d_in))
    pre = (x @ sae.W_enc[:, features] + sae.b_enc[features]).float()
    q = torch.quantile(pre[:100_000], 1.0 - density, dim=0)
    # A margin keeps the position at the quantile clear of 0: a pre-activation within rounding of
    # the ReLU's kink would fire in one float path and not in another.
    margin = 1e-3 * pre.std(dim=0)
    sae.b_enc[features] -= (q + margin).to(sae.b_enc.dtype)


# ---------------------------------------------------------------------------------------------
# the two ways


@torch.inference_mode()
def plain_way(model, sae, tokens: torch.Tensor, hook: str, features: list[int], alphas: tuple[float, ...],
              batch_size: int) -> dict[str, np.ndarray]:
    """One full forward per (feature, alpha) with the SAE spliced in; clean pass once per batch."""
    n, t = tokens.shape
    ce_clean = np.empty((n, t - 2))
    ce_int = np.empty((len(features), len(alphas), n, t - 2))
    kl = np.empty_like(ce_int)
    acts = np.empty((n, t, len(features)), dtype=np.float32)
    acts_hook = f"{sae.cfg.metadata.hook_name}.hook_sae_acts_post"
    for b0 in range(0, n, batch_size):
        tok = tokens[b0:b0 + batch_size]
        clean, cache = model.run_with_cache(tok, names_filter=[hook])
        acts[b0:b0 + len(tok)] = sae.encode(cache[hook])[..., features].float().cpu().numpy()
        lp_c = torch.log_softmax(clean[:, 1:-1].float(), -1)
        nxt = tok[:, 2:, None]
        ce_clean[b0:b0 + len(tok)] = (-lp_c.gather(-1, nxt)[..., 0]).double().cpu().numpy()
        for fi, feature in enumerate(features):
            for ai, alpha in enumerate(alphas):
                def scale(a, hook, feature=feature, alpha=alpha):  # noqa: ARG001
                    a = a.clone()
                    a[:, 1:, feature] *= alpha
                    return a

                with model.saes([sae], use_error_term=True):
                    logits = model.run_with_hooks(tok, fwd_hooks=[(acts_hook, scale)])
                lp_i = torch.log_softmax(logits[:, 1:-1].float(), -1)
                ce_int[fi, ai, b0:b0 + len(tok)] = (-lp_i.gather(-1, nxt)[..., 0]).double().cpu().numpy()
                kl[fi, ai, b0:b0 + len(tok)] = (lp_c.exp() * (lp_c - lp_i)).sum(-1).double().cpu().numpy()
    return {"ce_clean": ce_clean, "ce_int": ce_int, "kl": kl, "acts": acts}


@torch.inference_mode()
def float64_reference(model, sae, tokens: torch.Tensor, hook: str, features: list[int], alphas: tuple[float, ...],
                      batch_size: int) -> dict[str, np.ndarray]:
    """The definition in float64: full forward passes with the delta added by a hook, every number
    in double precision. Both float32 ways are measured against it."""
    device = tokens.device
    m64 = build_model(device, torch.float64)
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    w_enc, b_enc = sae.W_enc.double()[:, features], sae.b_enc.double()[features]
    b_dec = sae.b_dec.double() * sae.cfg.apply_b_dec_to_input
    w_dec = sae.W_dec.double()[features]
    n, t = tokens.shape
    ce_clean = np.empty((n, t - 2))
    ce_int = np.empty((len(features), len(alphas), n, t - 2))
    kl = np.empty_like(ce_int)
    acts = np.empty((n, t, len(features)), dtype=np.float32)
    for b0 in range(0, n, batch_size):
        tok = tokens[b0:b0 + batch_size]
        clean, cache = m64.run_with_cache(tok, names_filter=[hook])
        acts[b0:b0 + len(tok)] = torch.relu((cache[hook] - b_dec) @ w_enc + b_enc).float().cpu().numpy()
        lp_c = torch.log_softmax(clean[:, 1:-1], -1)
        nxt = tok[:, 2:, None]
        ce_clean[b0:b0 + len(tok)] = (-lp_c.gather(-1, nxt)[..., 0]).cpu().numpy()
        for fi in range(len(features)):
            for ai, alpha in enumerate(alphas):
                def add(r, hook, fi=fi, alpha=alpha):  # noqa: ARG001
                    a = torch.relu((r - b_dec) @ w_enc[:, fi] + b_enc[fi])
                    out = r + ((alpha - 1.0) * a)[..., None] * w_dec[fi]
                    out[:, 0] = r[:, 0]
                    return out

                lp_i = torch.log_softmax(m64.run_with_hooks(tok, fwd_hooks=[(hook, add)])[:, 1:-1], -1)
                ce_int[fi, ai, b0:b0 + len(tok)] = (-lp_i.gather(-1, nxt)[..., 0]).cpu().numpy()
                kl[fi, ai, b0:b0 + len(tok)] = (lp_c.exp() * (lp_c - lp_i)).sum(-1).cpu().numpy()
    return {"ce_clean": ce_clean, "ce_int": ce_int, "kl": kl, "acts": acts}


def metrics_table(ce_clean, ce_int, kl, acts, n_features, n_alphas, live_percentile=90.0) -> np.ndarray:
    """[features, alphas, len(COMPARED)] of every compared metric."""
    out = np.empty((n_features, n_alphas, len(COMPARED)))
    for f in range(n_features):
        live = live_positions(acts[:, 1:-1, f], live_percentile)
        for a in range(n_alphas):
            m = variant_metrics(ce_clean, ce_int[f, a], kl[f, a], acts[:, 1:-1, f], live)
            out[f, a] = [m[k] for k in COMPARED]
    return out


def max_rel_diff(engine: np.ndarray, plain: np.ndarray) -> float:
    worst = 0.0
    for k in range(len(COMPARED)):
        a, b = engine[..., k], plain[..., k]
        ok = ~(np.isnan(a) & np.isnan(b))
        if np.any(np.isnan(a[ok]) | np.isnan(b[ok])):
            return math.inf  # NaN on one side only
        scale = np.max(np.abs(b[ok])) if ok.any() else 0.0
        if scale > 0:
            worst = max(worst, float(np.max(np.abs(a[ok] - b[ok])) / scale))
    return worst


def precision_cost(low: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """How far a low-precision run's metrics are from float32's, metric by metric.

    Relative to each metric's scale in the workload, over the (feature, alpha) entries where both
    are numbers. A metric that is NaN on one side only (a feature that fires in one precision and
    not at all in the other, so it has no live position) is counted, not folded into the maximum.
    """
    per_metric, mismatches = {}, 0
    for k, name in enumerate(COMPARED):
        a, b = low[..., k], ref[..., k]
        one_sided = np.isnan(a) != np.isnan(b)
        mismatches += int(one_sided.sum())
        both = ~(np.isnan(a) | np.isnan(b))
        scale = float(np.max(np.abs(b[both]))) if both.any() else 0.0
        per_metric[name] = float(np.max(np.abs(a[both] - b[both])) / scale) if scale > 0 else 0.0
    return {"max_rel_diff_vs_float32": max(per_metric.values()), "rel_diff_vs_float32": per_metric,
            "nan_mismatches": mismatches}


# ---------------------------------------------------------------------------------------------
# FLOPs and the machine


def block_flops(tokens: int, t: int) -> float:
    d, ff = GPT2_SMALL_SHAPE["d_model"], GPT2_SMALL_SHAPE["d_mlp"]
    # QKV + output projection 8 d^2, MLP 4 d ff, attention scores and values 4 t d (per token)
    return tokens * (8 * d * d + 4 * d * ff + 4 * t * d)


def unembed_flops(positions: int) -> float:
    return positions * 2 * GPT2_SMALL_SHAPE["d_model"] * GPT2_SMALL_SHAPE["d_vocab"]


def engine_flops(result: LayerResult, n: int, t: int, resume_at: int) -> float:
    """Matmul FLOPs of the forward work the engine performed (from its own counters)."""
    n_layers = GPT2_SMALL_SHAPE["n_layers"]
    prefix = block_flops(n * t, t) * resume_at
    suffix = block_flops((n + result.stats.rows_run) * t, t) * (n_layers - resume_at)
    unembed = unembed_flops(n * (t - 2) + result.stats.positions_unembedded)
    encoder = 2 * n * t * GPT2_SMALL_SHAPE["d_model"] * len(result.features)
    return prefix + suffix + unembed + encoder


def plain_flops(n: int, t: int, n_variants: int) -> float:
    full = block_flops(n * t, t) * GPT2_SMALL_SHAPE["n_layers"] + unembed_flops(n * t)
    d = GPT2_SMALL_SHAPE["d_model"]
    sae = n * t * 4 * 2 * d * D_SAE  # encode + decode, twice for the error term
    return full * (1 + n_variants) + sae * n_variants + n * t * 2 * d * D_SAE


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-5 FLOP/s of a GPT-2-MLP-shaped matmul ([4096 x 768] @ [768 x 3072])."""
    a = torch.randn(4096, 768, device=device, dtype=dtype)
    b = torch.randn(768, 3072, device=device, dtype=dtype)
    best = math.inf
    for _ in range(6):
        _sync(device)
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * 4096 * 768 * 3072 / best


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int:
    """Peak bytes since the last reset: CUDA allocations, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # lifetime peak, KiB on Linux


# ---------------------------------------------------------------------------------------------


def timed_engine(model, sae, resume_at: int, tokens: torch.Tensor, features: list[int], w: Workload
                 ) -> tuple[LayerResult, np.ndarray, float]:
    """The engine as `intervene` runs it (run_layer + metrics), and its wall time."""
    _sync(tokens.device)
    start = time.perf_counter()
    result = run_layer(model, sae, resume_at, tokens.cpu(), features, list(w.alphas), batch_size=w.batch_size)
    table = metrics_table(result.ce_clean, result.ce_int, result.kl, result.acts, len(features), len(w.alphas))
    _sync(tokens.device)
    return result, table, time.perf_counter() - start


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    both = ~(np.isnan(a) & np.isnan(b))
    return float(np.nanmax(np.abs(a[both] - b[both]))) if both.any() else 0.0


def device_consistency(model, sae, resume_at: int, tokens: torch.Tensor, features: list[int], w: Workload,
                       engine_table: np.ndarray, log) -> dict[str, Any]:
    """What a GPU user can expect of reruns: the same card twice, and this card against the CPU."""
    _, again, _ = timed_engine(model, sae, resume_at, tokens, features, w)
    cpu = torch.device("cpu")
    cpu_model = build_model(cpu, torch.float32)
    cpu_model.load_state_dict(model.state_dict())
    cpu_sae = build_sae(cpu, "float32", f"blocks.{w.layer}.hook_resid_post")
    cpu_sae.load_state_dict(sae.state_dict())
    _, on_cpu, _ = timed_engine(cpu_model, cpu_sae, resume_at, tokens.cpu(), features, w)
    result = {"rerun_bit_identical": bool(np.array_equal(again, engine_table, equal_nan=True)),
              "rerun_max_rel_diff": max_rel_diff(again, engine_table),
              "device_vs_cpu_max_rel_diff": max_rel_diff(engine_table, on_cpu)}
    log(f"  rerun on this device: {'bit-identical' if result['rerun_bit_identical'] else 'differs'} "
        f"(max relative difference {result['rerun_max_rel_diff']:.2e}); against the CPU: "
        f"{result['device_vs_cpu_max_rel_diff']:.2e}")
    return result


def run_workload(w: Workload, device: torch.device, dtypes: list[str], skip_plain: bool, log,
                 reference: bool = True) -> dict[str, Any]:
    hook = f"blocks.{w.layer}.hook_resid_post"
    resume_at = w.layer + 1
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, GPT2_SMALL_SHAPE["d_vocab"], (w.n_passages, w.max_len), generator=g)
    tokens[:, 0] = GPT2_SMALL_SHAPE["d_vocab"] - 1  # <|endoftext|> = 50256 is GPT-2's BOS
    tokens = tokens.to(device)
    features = [(100 + 37 * i) % D_SAE for i in range(w.n_features)]
    model = build_model(device, torch.float32)
    sae = build_sae(device, "float32", hook)
    if w.density is not None:
        make_sparse(model, sae, tokens, hook, features, w.density)
    run_layer(model, sae, resume_at, tokens[:2, :16].cpu(), features[:1], [2.0], batch_size=2)  # warm-up

    reset_peak_memory(device)
    result, engine_table, engine_s = timed_engine(model, sae, resume_at, tokens, features, w)
    engine_peak = peak_memory(device)
    flops = engine_flops(result, w.n_passages, w.max_len, resume_at)
    rate = matmul_rate(device)
    n_variants = len(features) * len(w.alphas)
    out: dict[str, Any] = {
        "workload": w.describe(),
        "tokens": w.n_passages * w.max_len,
        "measured_density": float((result.acts[:, 1:-1] > 0).mean()),
        "engine_s": engine_s,
        "tokens_per_s": w.n_passages * w.max_len * n_variants / engine_s,
        "engine_flops": flops,
        "matmul_flops_per_s": rate,
        "floor_fraction": flops / rate / engine_s,
        "peak_mem_bytes": engine_peak,
        "rows_run": result.stats.rows_run,
        "rows_total": result.stats.rows_total,
    }
    log(f"  engine  {engine_s:8.2f} s  ({out['tokens_per_s']:,.0f} intervened tokens/s, "
        f"floor fraction {out['floor_fraction']:.2f}, {result.stats.rows_run}/{result.stats.rows_total} rows run)")

    if not skip_plain:
        _sync(device)
        start = time.perf_counter()
        plain = plain_way(model, sae, tokens, hook, features, w.alphas, w.batch_size)
        plain_table = metrics_table(plain["ce_clean"], plain["ce_int"], plain["kl"], plain["acts"],
                                    len(features), len(w.alphas))
        _sync(device)
        plain_s = time.perf_counter() - start
        out |= {
            "plain_s": plain_s,
            "plain_flops": plain_flops(w.n_passages, w.max_len, n_variants),
            "speedup_vs_plain": plain_s / engine_s,
            "max_rel_diff": max_rel_diff(engine_table, plain_table),
            "max_abs_diff": float(np.nanmax(np.abs(engine_table - plain_table))),
        }
        log(f"  plain   {plain_s:8.2f} s  -> engine speed-up {out['speedup_vs_plain']:.1f}x, "
            f"max relative difference {out['max_rel_diff']:.2e}")
        if reference:
            ref = float64_reference(model, sae, tokens, hook, features, w.alphas, w.batch_size)
            ref_table = metrics_table(ref["ce_clean"], ref["ce_int"], ref["kl"], ref["acts"], len(features),
                                      len(w.alphas))
            out["engine_vs_float64"] = max_rel_diff(engine_table, ref_table)
            out["plain_vs_float64"] = max_rel_diff(plain_table, ref_table)
            out["per_metric"] = {
                name: {"engine_vs_plain_abs": _max_abs(engine_table[..., k], plain_table[..., k]),
                       "engine_vs_float64_abs": _max_abs(engine_table[..., k], ref_table[..., k]),
                       "plain_vs_float64_abs": _max_abs(plain_table[..., k], ref_table[..., k]),
                       "scale": float(np.nanmax(np.abs(ref_table[..., k])))}
                for k, name in enumerate(COMPARED)
            }
            log(f"  float64 reference: engine {out['engine_vs_float64']:.2e}, plain {out['plain_vs_float64']:.2e} "
                "max relative difference")

    if device.type != "cpu" and not w.name.startswith("full"):
        out |= device_consistency(model, sae, resume_at, tokens, features, w, engine_table, log)

    for dtype in dtypes:
        low_model = build_model(device, torch_dtype(dtype))
        low_model.load_state_dict(model.state_dict())
        low_sae = build_sae(device, dtype, hook)
        low_sae.load_state_dict(sae.state_dict())
        _, low_table, low_s = timed_engine(low_model, low_sae, resume_at, tokens, features, w)
        cost = precision_cost(low_table, engine_table)
        out.setdefault("dtypes", {})[dtype] = {"engine_s": low_s} | cost
        worst = max(cost["rel_diff_vs_float32"], key=cost["rel_diff_vs_float32"].get)
        log(f"  {dtype:8s}{low_s:8.2f} s  max relative difference vs float32 {cost['max_rel_diff_vs_float32']:.2e} "
            f"({worst}); delta_ce {cost['rel_diff_vs_float32']['delta_ce']:.2e}, kl {cost['rel_diff_vs_float32']['kl']:.2e}"
            + (f"; {cost['nan_mismatches']} metric(s) defined in one precision only" if cost["nan_mismatches"] else ""))
    return out


def run_bench(device: str = "auto", out: Path | None = None, quick: bool = False, full: bool = False,
              skip_plain: bool = False, dtypes: list[str] | None = None, reference: bool | None = None,
              log=print) -> dict[str, Any]:
    quiet_library_warnings()
    dev = resolve_device(device, "--device")
    for name in dtypes or []:
        if name not in DTYPES:
            raise UserError(f"--dtype is '{name}'; allowed: {', '.join(DTYPES)}")
    if dtypes is None:
        dtypes = ["bfloat16", "float16"] if dev.type == "cuda" else []
    dtypes = [d for d in dtypes if d != "float32"]  # float32 always runs: `--dtype float32` means only it
    results: dict[str, Any] = {
        "device": _device_name(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
        "workloads": {},
    }
    log(f"bench on {results['device']} (GPT-2-Small-shaped random weights, SAE 768 x {D_SAE})")
    for w in workloads(quick, full):
        log(w.describe())
        results["workloads"][w.name] = run_workload(w, dev, dtypes, skip_plain, log,
                                                    reference=(not full) if reference is None else reference)
    # Headline figures at the top level: the sparse workload is the realistic one.
    head = results["workloads"].get("sparse") or next(iter(results["workloads"].values()))
    for key in ("speedup_vs_plain", "max_rel_diff", "engine_vs_float64", "plain_vs_float64", "tokens_per_s",
                "floor_fraction", "peak_mem_bytes"):
        if key in head:
            results[key] = head[key]
    if "dense" in results["workloads"]:
        results["floor_fraction_dense"] = results["workloads"]["dense"]["floor_fraction"]
        results["speedup_vs_plain_dense"] = results["workloads"]["dense"].get("speedup_vs_plain")
    if full:  # the headline is the whole study, not its first layer
        runs = list(results["workloads"].values())
        engine_s = sum(r["engine_s"] for r in runs)
        results |= {
            "full_study_engine_s": engine_s,
            "full_study_peak_mem_bytes": max(r["peak_mem_bytes"] for r in runs),
            "peak_mem_bytes": max(r["peak_mem_bytes"] for r in runs),
            "tokens_per_s": sum(r["tokens_per_s"] * r["engine_s"] for r in runs) / engine_s,
            "floor_fraction": (sum(r["engine_flops"] for r in runs) / engine_s
                               / max(r["matmul_flops_per_s"] for r in runs)),
        }
        line = (f"full study (12 layers x 5 features x 5 alphas x 200 x 256): {engine_s:.1f} s of engine time, "
                f"peak {results['full_study_peak_mem_bytes'] / 2**30:.2f} GiB")
        if all("plain_s" in r for r in runs):
            plain_s = sum(r["plain_s"] for r in runs)
            results |= {"full_study_plain_s": plain_s, "speedup_vs_plain": plain_s / engine_s,
                        "max_rel_diff": max(r["max_rel_diff"] for r in runs)}
            line += f"; the plain way {plain_s:.1f} s ({plain_s / engine_s:.1f}x)"
        log(line)
    _table(results, log)
    if out is not None:
        write_json(out, results)
        log(f"wrote {out}")
    return results


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _table(results: dict[str, Any], log) -> None:
    log("")
    log(f"{'workload':<12} {'engine s':>9} {'plain s':>9} {'speed-up':>9} {'max rel diff':>13} {'tok/s':>10} "
        f"{'floor':>6} {'peak MB':>8}")
    for name, r in results["workloads"].items():
        plain = f"{r['plain_s']:9.2f}" if "plain_s" in r else f"{'-':>9}"
        speed = f"{r['speedup_vs_plain']:8.1f}x" if "speedup_vs_plain" in r else f"{'-':>9}"
        diff = f"{r['max_rel_diff']:13.2e}" if "max_rel_diff" in r else f"{'-':>13}"
        log(f"{name:<12} {r['engine_s']:9.2f} {plain} {speed} {diff} {r['tokens_per_s']:10,.0f} "
            f"{r['floor_fraction']:6.2f} {r['peak_mem_bytes'] / 2**20:8.0f}")
