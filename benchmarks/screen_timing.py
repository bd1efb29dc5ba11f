"""Time the attribution screen against its floor, a plain forward + backward of the same tokens
(pipeline/bench/screen.py, the figure `python -m pipeline bench` prints), at a size of your choice.

    python benchmarks/screen_timing.py                                  # 4 layers, 4 x 128 tokens (a 2-core CPU)
    python benchmarks/screen_timing.py --layers all --passages 200 --max-len 256 --batch 8 --device cuda

Prints one JSON object: both times, their ratio, the firing pairs contracted and each layer's L0. The ratio grows
with layers x d_sae because the SAEs' encode does: per token one 24,576-wide encoder is 2 x 768 x 24,576 = 38
MFLOP, 2.7 GPT-2 blocks, and twelve of them 1.8 times the forward pass with its unembedding, while the floor is
about twice the forward. On a shared machine the timings drift; say so when you quote them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bench import workloads as wl  # noqa: E402 - after the path is set
from pipeline.bench.screen import screen_timing  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2,5,8,11", help="comma-separated resid_post layers, or 'all'")
    parser.add_argument("--passages", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    n_layers = wl.GPT2_SMALL_SHAPE["n_layers"]
    layers = list(range(n_layers)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    shape = {"layers": layers, "passages": args.passages, "max_len": args.max_len, "batch": args.batch}
    out = screen_timing(torch.device(args.device), False, lambda line: print(line, file=sys.stderr), shape,
                        args.repeat)
    print(json.dumps({"device": args.device, "threads": torch.get_num_threads(), **out}, indent=2))


if __name__ == "__main__":
    main()
