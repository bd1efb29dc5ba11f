"""Time `dvc exp run` stage by stage: the real gpt2-small or gemma-2-2b preset on the hub twin (or, with --real, on
the real hub and Neuronpedia), or the toy.

    python benchmarks/stage_breakdown.py --scale full --layers 0,1 --passages 8     # fits a 2-core CPU
    python benchmarks/stage_breakdown.py --scale full                               # the whole default study (GPU)
    python benchmarks/stage_breakdown.py --preset toy --passages 16 --max-len 64 --repeat 3
    python benchmarks/stage_breakdown.py --preset gemma-2-2b --scale tiny --layers 0,25 --passages 4 --max-len 32
    python benchmarks/stage_breakdown.py --scale tiny --sae-release gpt2-small-resid-post-v5-32k --layers 0,11
    python benchmarks/stage_breakdown.py --preset gemma-2-2b --real   # all 26 layers, real weights (GPU, network,
                                                                      # a token with the licence)

Twin mode (the default, `--preset gpt2-small`) builds the twin (`python -m pipeline twin`, once per
--twin directory), copies the checkout into a scratch git repo, starts the local Neuronpedia
stand-in, and runs `dvc exp run` there with the committed params.yaml plus the size overrides
given, HF_HOME pointing at the twin and HF_HUB_OFFLINE=1. The twin's weights are random: these are
timings, not results.

Toy mode (`--preset toy`) first trains the toy in the scratch repo (`dvc exp run -S preset=toy`
with the sizes and `--toy-steps` given; not timed), then times what a user waits for once it is
trained: `dvc exp run -S alpha=A`, `--repeat` times, alpha alternating between 4 and 0.5 (both in
the sweep, so every run does the same work; DVC's run cache is emptied before each, so none is
restored from an earlier one). Every figure is the median over the runs.

Every stage's run record (data/runs/*.json) splits its time into process start and imports
(`startup_s` + `import_s`, the libraries a stage imports lazily), loading the model, SAEs and
tokenizer (`load_s`) and the rest (`work_s`); the table adds DVC's own time (the run's wall time
less the stages'; the `report` stage, which keeps no run record, is in it), and a bare
`python -c "import torch, transformer_lens, sae_lens"` measured in the same run for comparison (the
yardstick of issue 16's per-stage target: an intervene stage's time outside its work should not
exceed it by more than a second). `--tree DIR` benchmarks another checkout (e.g. an older commit's
`git worktree`) with this script. For a before/after comparison, `--against DIR --against-python PY`
(toy mode) trains a second scratch repo from DIR, run by PY's virtual environment (install DIR's
requirements.txt into it), and alternates the two trees' timed runs, so that a machine whose speed
drifts (a shared VM does, by 20% within an hour here) slows both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import GIT_ENV  # noqa: E402 - after the path is set
from tests.neuronpedia_standin import FakeNeuronpedia  # noqa: E402


def bare_import_s(python: str = sys.executable) -> float:
    started = time.perf_counter()
    subprocess.run([python, "-c", "import torch, transformer_lens, sae_lens"], check=True, capture_output=True)
    return time.perf_counter() - started


def ensure_twin(directory: Path, scale: str) -> float:
    manifest = directory / "twin.json"
    if manifest.exists() and json.loads(manifest.read_text())["scale"] == scale:
        return 0.0
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "twin", str(directory), "--scale", scale], check=True,
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - started


def copy_tree(source: Path, dest: Path) -> Path:
    """The files a fresh clone of `source` would have, as a git repo with one commit (DVC needs one)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=source, check=True,
                            capture_output=True, text=True).stdout.splitlines()
    for rel in listed:
        if (source / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, dest / rel)
    env = {**os.environ, **GIT_ENV}
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


WARNINGS: list[str] = []  # every warning line any timed or untimed `dvc exp run` printed


def dvc_exp_run(project: Path, sets: list[str], env: dict[str, str], python: str = sys.executable) -> float:
    cmd = [str(Path(python).parent / "dvc"), "exp", "run", *sets]
    print(f"running in {project.name}:", " ".join(cmd), flush=True)
    started = time.perf_counter()
    run = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if run.returncode != 0:
        sys.exit(f"dvc exp run failed ({run.returncode}):\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}")
    warned = [line for line in (run.stdout + run.stderr).splitlines() if "warning" in line.lower()]
    print(f"  {wall:.1f} s, {len(warned)} warning line(s)" + "".join(f"\n    {w}" for w in warned[:5]), flush=True)
    WARNINGS.extend(f"[{project.name}] {w}" for w in warned)
    return wall


def overrides(args: argparse.Namespace) -> list[str]:
    sets = []
    if args.preset == "toy":
        sets += ["preset=toy", f"toy_lm_steps={args.toy_steps}", f"toy_sae_steps={args.toy_steps}"]
    elif args.preset != "gpt2-small":
        sets.append(f"preset={args.preset}")
    if args.sae_release is not None:
        sets.append(f"sae_release={args.sae_release}")
    if args.layers is not None:
        sets.append(f"layers=[{args.layers}]")
    for key, value in (("max_passages", args.passages), ("max_len", args.max_len),
                       ("features_per_layer", args.features_per_layer), ("device", args.device)):
        if value is not None:
            sets.append(f"{key}={value}")
    return [part for s in sets for part in ("-S", s)]


def stage_rows(project: Path, since: float = 0.0) -> list[dict]:
    """Each stage's run record written after `since` (a time.time()), oldest first."""
    rows = []
    paths = [p for p in (project / "data" / "runs").glob("*.json") if p.stat().st_mtime >= since]
    for path in sorted(paths, key=lambda p: p.stat().st_mtime):
        record = json.loads(path.read_text())
        row = {key: record.get(key) for key in
               ("stage", "startup_s", "import_s", "load_s", "work_s", "wall_s", "device", "peak_gpu_mem_bytes")}
        if "seconds" in record:  # the screen stage: its one forward+backward pass apart from the exact verification
            row |= {"screen_pass_s": record["seconds"]["screen"], "screen_verify_s": record["seconds"]["verify"]}
        rows.append(row)
    return rows


def screen_agreement(project: Path) -> dict:
    """metrics/screen/agreement.json of the run (the screen's agreement with the exact delta_ce), if it ran."""
    path = project / "metrics" / "screen" / "agreement.json"
    return json.loads(path.read_text()) if path.exists() else {}


def breakdown(stages: list[dict], dvc_wall: float) -> dict:
    stages_s = sum((r["startup_s"] or 0) + r["wall_s"] for r in stages)
    return {
        "dvc_wall_s": dvc_wall, "dvc_own_s": dvc_wall - stages_s, "stages": stages,
        "totals": {"startup_s": sum((r["startup_s"] or 0) + r["import_s"] for r in stages),
                   "load_s": sum(r["load_s"] for r in stages), "work_s": sum(r["work_s"] for r in stages),
                   "stages_s": stages_s},
        "peak_gpu_mem_bytes": max((r["peak_gpu_mem_bytes"] or 0 for r in stages), default=0),
    }


def median_run(runs: list[dict]) -> dict:
    """Per stage and in total, the median of each figure over the runs (stages matched by name)."""
    def med(values):
        return float(statistics.median(values))

    names = [r["stage"] for r in runs[0]["stages"]]
    stages = []
    for name in names:
        rows = [next(r for r in run["stages"] if r["stage"] == name) for run in runs]
        stages.append({"stage": name, "device": rows[0]["device"], "peak_gpu_mem_bytes": rows[0]["peak_gpu_mem_bytes"],
                       **{k: med([(r[k] or 0) for r in rows]) for k in ("startup_s", "import_s", "load_s", "work_s",
                                                                         "wall_s")}})
    out = breakdown(stages, med([run["dvc_wall_s"] for run in runs]))
    out["totals"] = {k: med([run["totals"][k] for run in runs]) for k in out["totals"]}
    out["dvc_own_s"] = med([run["dvc_own_s"] for run in runs])
    out["dvc_wall_runs_s"] = [round(run["dvc_wall_s"], 1) for run in runs]
    return out


def intervene_overhead(result: dict) -> dict:
    """Issue 16's per-stage figure: each intervene stage's process time outside its work."""
    rows = [r for r in result["stages"] if r["stage"].startswith("intervene")]
    outside = [(r["startup_s"] or 0) + r["import_s"] + r["load_s"] for r in rows]
    return {"max_s": max(outside, default=0.0), "median_s": float(statistics.median(outside)) if outside else 0.0}


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
          f"bare `import torch, transformer_lens, sae_lens` {result['bare_import_s']:.1f} s"
          + (f"; twin built in {result['twin_build_s']:.1f} s" if "twin_build_s" in result else ""))
    if result.get("dvc_wall_runs_s"):
        print(f"medians over {len(result['dvc_wall_runs_s'])} runs; dvc exp run walls: {result['dvc_wall_runs_s']} s")
    o = intervene_overhead(result)
    if result["stages"] and o["max_s"]:
        print(f"intervene stages outside their work: median {o['median_s']:.1f} s, max {o['max_s']:.1f} s "
              f"(target: <= bare import + 1 s = {result['bare_import_s'] + 1:.1f} s)")
    for r in result["stages"]:
        if r.get("screen_pass_s") is not None:
            print(f"screen stage: the pass over every feature {r['screen_pass_s']:.1f} s, the exact verification "
                  f"{r['screen_verify_s']:.1f} s (`python -m pipeline bench` times the pass against its "
                  "forward+backward floor)")
    if "warnings" in result:
        print(f"warning lines printed by the dvc exp runs (the first one included): {len(result['warnings'])}")
    if result.get("peak_gpu_mem_bytes"):
        print(f"peak GPU memory of any stage: {result['peak_gpu_mem_bytes'] / 2**30:.2f} GiB")


def run_twin(args: argparse.Namespace, scratch: Path, project: Path) -> dict:
    twin = args.twin or scratch / "twin"
    twin_s = ensure_twin(twin, args.scale)
    bare = bare_import_s()
    server = FakeNeuronpedia(synthesize=True)
    env = {**os.environ, "HF_HOME": str(twin), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "NEURONPEDIA_API_URL": server.url, "NO_PROXY": "127.0.0.1,localhost", "DVC_NO_ANALYTICS": "1"}
    try:
        wall = dvc_exp_run(project, overrides(args), env)
    finally:
        server.stop()
    return {"scale": args.scale, "overrides": overrides(args), "twin_build_s": twin_s, "bare_import_s": bare,
            **breakdown(stage_rows(project), wall), "screen_agreement": screen_agreement(project)}


def run_real(args: argparse.Namespace, project: Path) -> dict:
    """The preset on the real hub and Neuronpedia (network; the gated Gemma repos need a token with the licence
    accepted): nothing is stood in."""
    bare = bare_import_s()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "NEURONPEDIA_API_URL"):
        env.pop(key, None)
    wall = dvc_exp_run(project, overrides(args), env)
    return {"real": True, "overrides": overrides(args), "bare_import_s": bare, **breakdown(stage_rows(project), wall),
            "screen_agreement": screen_agreement(project)}


def venv_env(python: str) -> dict[str, str]:
    """The environment a stage of `python`'s virtual environment runs in (dvc.yaml's `python -m ...`
    resolves through PATH)."""
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(python).parent}{os.pathsep}{os.environ['PATH']}"}


def time_toy_run(project: Path, alpha: float, python: str) -> dict:
    # A user's first run at an alpha finds nothing in DVC's run cache; without this, a repeat of an
    # alpha already timed would be restored from it instead of run.
    shutil.rmtree(project / ".dvc" / "cache" / "runs", ignore_errors=True)
    since = time.time()
    wall = dvc_exp_run(project, ["-S", f"alpha={alpha:g}"], venv_env(python), python)
    return breakdown(stage_rows(project, since), wall)


def run_toy(args: argparse.Namespace, project: Path, against: Path | None = None) -> dict | tuple[dict, dict]:
    """Train, then time `--repeat` runs; with `against` (a second scratch repo, run by
    --against-python), train both and alternate their timed runs (A B, B A, ...), so that a machine
    whose speed drifts over the session slows both alike."""
    trees = [(project, sys.executable)] + ([(against, str(args.against_python))] if against else [])
    trained = [dvc_exp_run(tree, overrides(args), venv_env(py), py) for tree, py in trees]  # + one study at alpha 2
    runs: list[list[dict]] = [[] for _ in trees]
    bares: list[list[float]] = [[] for _ in trees]
    for i in range(args.repeat):
        alpha = 4 if i % 2 == 0 else 0.5
        order = range(len(trees)) if i % 2 == 0 else reversed(range(len(trees)))
        for k in order:
            tree, py = trees[k]
            bares[k].append(bare_import_s(py))
            runs[k].append(time_toy_run(tree, alpha, py))
    results = [{"preset": "toy", "tree": str(tree), "python": py, "overrides": overrides(args),
                "first_run_s": trained[k], "bare_import_s": float(statistics.median(bares[k])),
                "bare_import_runs_s": [round(b, 2) for b in bares[k]], **median_run(runs[k])}
               for k, (tree, py) in enumerate(trees)]
    return results[0] if against is None else (results[0], results[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small", choices=["gpt2-small", "gemma-2-2b", "toy"])
    parser.add_argument("--scale", default="full", choices=["tiny", "full"],
                        help="twin scale (gemma-2-2b: tiny only; the twin does not build Gemma at full scale)")
    parser.add_argument("--real", action="store_true", help="the real hub and Neuronpedia instead of the twin")
    parser.add_argument("--sae-release", default=None, help="sae_release (default: the preset's)")
    parser.add_argument("--twin", type=Path, default=None, help="twin directory (default: a temporary one)")
    parser.add_argument("--layers", default=None, help="e.g. 0,1 (default: params.yaml's null, every layer of the preset's model)")
    parser.add_argument("--passages", type=int, default=None, help="max_passages (default: the preset's)")
    parser.add_argument("--max-len", type=int, default=None, help="max_len (default: the preset's)")
    parser.add_argument("--features-per-layer", type=int, default=None)
    parser.add_argument("--device", default=None, help="params device (default: params.yaml's, auto)")
    parser.add_argument("--toy-steps", type=int, default=1500, help="toy: LM and SAE training steps")
    parser.add_argument("--repeat", type=int, default=1, help="toy: timed `dvc exp run -S alpha=...` runs")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout to benchmark (default: this one)")
    parser.add_argument("--against", type=Path, default=None,
                        help="toy: a second checkout (e.g. an older commit's `git worktree`), timed in turn with --tree")
    parser.add_argument("--against-python", type=Path, default=None,
                        help="the python of the virtual environment --against runs in (its requirements.txt)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.against is not None and (args.preset != "toy" or args.against_python is None):
        parser.error("--against needs --preset toy and --against-python")
    if args.preset == "gemma-2-2b" and args.scale == "full" and not args.real:
        parser.error("the twin builds Gemma-2 at --scale tiny only; use --scale tiny, or --real")

    scratch = Path(tempfile.mkdtemp(prefix="stage-breakdown-"))
    try:
        project = copy_tree(args.tree.resolve(), scratch / "project")
        if args.against is not None:
            other = copy_tree(args.against.resolve(), scratch / "against")
            mine, theirs = run_toy(args, project, other)
            output = {"tree": finish(mine, project), "against": finish(theirs, other)}
            for name, result in (("--against " + str(args.against), output["against"]),
                                 ("--tree " + str(args.tree), output["tree"])):
                print(f"\n== {name}")
                print_table(result)
        else:
            if args.preset == "toy":
                result = run_toy(args, project)
            else:
                result = run_real(args, project) if args.real else run_twin(args, scratch, project)
            output = finish(result, project)
            print_table(output)
        if args.out:
            args.out.write_text(json.dumps(output, indent=2) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def finish(result: dict, project: Path) -> dict:
    result["summary"] = json.loads((project / "metrics" / "summary.json").read_text())
    result["load_average"] = os.getloadavg()
    result["warnings"] = [w for w in WARNINGS if w.startswith(f"[{project.name}]")]
    return result


if __name__ == "__main__":
    main()
