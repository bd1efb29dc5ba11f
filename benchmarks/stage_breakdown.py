"""Time `dvc repro` of the real gpt2-small preset on the hub twin, stage by stage.

    python benchmarks/stage_breakdown.py --scale full --layers 0,1 --passages 8     # fits a 2-core CPU
    python benchmarks/stage_breakdown.py --scale full                               # the whole default study (GPU)

It builds the twin (`python -m pipeline twin`, once per --twin directory), copies this checkout
into a scratch git repo, starts the local Neuronpedia stand-in, and runs `dvc exp run` there with
the committed params.yaml plus the size overrides given, HF_HOME pointing at the twin and
HF_HUB_OFFLINE=1. Every stage's run record (data/runs/*.json) splits its time into process start
and imports (`startup_s` + `import_s`, the libraries a stage imports lazily), loading the
model, SAEs and tokenizer (`load_s`) and the rest (`work_s`); the table adds DVC's own time (the
run's wall time less the stages'; the `report` stage, which keeps no run record, is in it), and a bare
`python -c "import torch, transformer_lens, sae_lens"` measured in the same run for comparison.
The twin's weights are random: these are timings, not results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import make_project_copy  # noqa: E402 - after the path is set
from tests.neuronpedia_standin import FakeNeuronpedia  # noqa: E402


def bare_import_s() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformer_lens, sae_lens"], check=True,
                   capture_output=True)
    return time.perf_counter() - started


def ensure_twin(directory: Path, scale: str) -> float:
    manifest = directory / "twin.json"
    if manifest.exists() and json.loads(manifest.read_text())["scale"] == scale:
        return 0.0
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "twin", str(directory), "--scale", scale], check=True,
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - started


def overrides(args: argparse.Namespace) -> list[str]:
    sets = []
    if args.layers is not None:
        sets.append(f"layers=[{args.layers}]")
    for key, value in (("max_passages", args.passages), ("max_len", args.max_len),
                       ("features_per_layer", args.features_per_layer), ("device", args.device)):
        if value is not None:
            sets.append(f"{key}={value}")
    return [part for s in sets for part in ("-S", s)]


def stage_rows(project: Path) -> list[dict]:
    rows = []
    for path in sorted((project / "data" / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime):
        record = json.loads(path.read_text())
        rows.append({key: record.get(key) for key in
                     ("stage", "startup_s", "import_s", "load_s", "work_s", "wall_s", "device", "peak_gpu_mem_bytes")})
    return rows


def print_table(result: dict) -> None:
    print(f"\n{'stage':<14} {'start+imports':>13} {'loading':>8} {'work':>8} {'process':>8}  device")
    for r in result["stages"]:
        process = (r["startup_s"] or 0) + r["wall_s"]
        imports = (r["startup_s"] or 0) + r["import_s"]
        print(f"{r['stage']:<14} {imports:>12.1f}s {r['load_s']:>7.1f}s {r['work_s']:>7.1f}s "
              f"{process:>7.1f}s  {r['device'] or ''}")
    t = result["totals"]
    print(f"{'all stages':<14} {t['startup_s']:>12.1f}s {t['load_s']:>7.1f}s {t['work_s']:>7.1f}s "
          f"{t['stages_s']:>7.1f}s")
    print(f"dvc exp run wall {result['dvc_wall_s']:.1f} s (DVC itself {result['dvc_own_s']:.1f} s); "
          f"bare `import torch, transformer_lens, sae_lens` {result['bare_import_s']:.1f} s; "
          f"twin built in {result['twin_build_s']:.1f} s")
    if result.get("peak_gpu_mem_bytes"):
        print(f"peak GPU memory of any stage: {result['peak_gpu_mem_bytes'] / 2**30:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="full", choices=["tiny", "full"])
    parser.add_argument("--twin", type=Path, default=None, help="twin directory (default: a temporary one)")
    parser.add_argument("--layers", default=None, help="e.g. 0,1 (default: params.yaml's)")
    parser.add_argument("--passages", type=int, default=None, help="max_passages (default: params.yaml's)")
    parser.add_argument("--max-len", type=int, default=None, help="max_len (default: params.yaml's)")
    parser.add_argument("--features-per-layer", type=int, default=None)
    parser.add_argument("--device", default=None, help="params device (default: params.yaml's, auto)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="stage-breakdown-"))
    twin = args.twin or scratch / "twin"
    try:
        twin_s = ensure_twin(twin, args.scale)
        project = make_project_copy(scratch / "project")
        bare = bare_import_s()
        server = FakeNeuronpedia(synthesize=True)
        env = {**os.environ, "HF_HOME": str(twin), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "NEURONPEDIA_API_URL": server.url, "NO_PROXY": "127.0.0.1,localhost", "DVC_NO_ANALYTICS": "1"}
        cmd = [str(Path(sys.executable).parent / "dvc"), "exp", "run", *overrides(args)]
        print("running:", " ".join(cmd), flush=True)
        started = time.perf_counter()
        try:
            run = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
        finally:
            server.stop()
        dvc_wall = time.perf_counter() - started
        if run.returncode != 0:
            sys.exit(f"dvc exp run failed ({run.returncode}):\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}")
        stages = stage_rows(project)
        stages_s = sum((r["startup_s"] or 0) + r["wall_s"] for r in stages)
        result = {
            "scale": args.scale, "overrides": overrides(args), "twin_build_s": twin_s, "bare_import_s": bare,
            "dvc_wall_s": dvc_wall, "dvc_own_s": dvc_wall - stages_s, "stages": stages,
            "totals": {"startup_s": sum((r["startup_s"] or 0) + r["import_s"] for r in stages),
                       "load_s": sum(r["load_s"] for r in stages), "work_s": sum(r["work_s"] for r in stages),
                       "stages_s": stages_s},
            "peak_gpu_mem_bytes": max((r["peak_gpu_mem_bytes"] or 0 for r in stages), default=0),
            "summary": json.loads((project / "metrics" / "summary.json").read_text()),
        }
        print_table(result)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(scratch / "project", ignore_errors=True)
        if args.twin is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
