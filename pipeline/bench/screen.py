"""The bench's screen figure: the attribution screen (pipeline.engine.attribution.screen) against its floor, a plain
forward and backward pass of the same tokens (the summed scored CE backpropagated to the embedding, no SAE).

On the bench's GPT-2-Small-shaped random model with one 24,576-wide ReLU SAE per screened layer at
`blocks.L.hook_resid_post`, whose encoder biases are shifted so each feature fires on about `DENSITY` of the
positions (L0 ~ 74; res-jb's is 10-70), calibrated on the timed tokens themselves. Each time is the best of
`REPEAT` runs after a warm-up: on a shared machine the slower runs measure the neighbours. The screen's cost above
the floor is mostly the SAEs' encoders (one 24,576-wide encode per token is 2.7 GPT-2 blocks of work), which any
method that knows which features fire pays.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pipeline.bench import workloads as wl
from pipeline.bench.measure import sync
from pipeline.engine.attribution import ScreenLayer, forward_backward, screen

DENSITY = 0.003
REPEAT = 3


def screen_shape(quick: bool, device: torch.device) -> dict[str, Any]:
    if quick:
        return {"layers": [5], "passages": 2, "max_len": 32, "batch": 2}
    if device.type == "cpu":
        return {"layers": [2, 5, 8, 11], "passages": 4, "max_len": 128, "batch": 4}
    return {"layers": list(range(wl.GPT2_SMALL_SHAPE["n_layers"])), "passages": 64, "max_len": 256, "batch": 16}


@torch.inference_mode()
def sparsify(model, sae, tokens: torch.Tensor, hook: str, density: float) -> None:
    """Shift every feature's encoder bias so it fires on about `density` of the calibration positions."""
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    x = sae.process_sae_in(cache[hook][:, 1:].reshape(-1, sae.cfg.d_in))
    pre = (x @ sae.W_enc + sae.b_enc).float()
    threshold = torch.quantile(pre, 1.0 - density, dim=0)
    sae.b_enc -= (threshold + 1e-3 * pre.std(dim=0)).to(sae.b_enc.dtype)


def best_time(fn, device: torch.device, repeat: int) -> tuple[float, Any]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times), out


def screen_timing(device: torch.device, quick: bool, log, shape: dict[str, Any] | None = None,
                  repeat: int = REPEAT) -> dict[str, Any]:
    shape = shape or screen_shape(quick, device)
    model = wl.build_model(device, torch.float32)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, wl.GPT2_SMALL_SHAPE["d_vocab"], (shape["passages"], shape["max_len"]), generator=g)
    tokens[:, 0] = wl.GPT2_SMALL_SHAPE["d_vocab"] - 1  # GPT-2's BOS
    specs = []
    for layer in shape["layers"]:
        hook = f"blocks.{layer}.hook_resid_post"
        sae = wl.build_sae(device, "float32", hook, seed=layer)
        sparsify(model, sae, tokens.to(device), hook, DENSITY)
        specs.append(ScreenLayer(layer, sae, layer + 1))
    floor_s, _ = best_time(lambda: forward_backward(model, tokens, batch_size=shape["batch"]), device, repeat)
    screen_s, result = best_time(lambda: screen(model, specs, tokens, batch_size=shape["batch"]), device, repeat)
    n_scored = shape["passages"] * (shape["max_len"] - 2)
    out = {**shape, "d_sae": wl.D_SAE, "floor_s": floor_s, "screen_s": screen_s, "screen_over_floor": screen_s / floor_s,
           "firing_pairs": result.stats.firing_pairs,
           "l0": {layer: float(s.n_firing.sum()) / n_scored for layer, s in result.layers.items()}}
    log(f"screen: every feature of {len(specs)} layer(s) x {wl.D_SAE} features over {shape['passages']} x "
        f"{shape['max_len']} tokens: {screen_s:.2f} s against {floor_s:.2f} s for a plain forward+backward of the "
        f"same tokens (the floor): {out['screen_over_floor']:.1f}x")
    return out
