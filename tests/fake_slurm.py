"""A stand-in for SLURM's `sbatch`, `srun`, `sacct` and `scancel` on one machine, enough for submitit's SLURM
executor: a job array's tasks run as local processes with SLURM's environment variables, and sacct reports
their states. It lets the tests drive the executor's SLURM path (job arrays, `%A_%a` log paths, failures seen
through sacct, scancel) where no SLURM is installed. It is not SLURM: no queueing, no resources, no nodes.

`install(bin_dir, state_dir)` writes the four commands into bin_dir (put it first on PATH); jobs keep their
state in state_dir (FAKE_SLURM_DIR), one file per task: "<state> <pid>".
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

COMMANDS = ("sbatch", "srun", "sacct", "scancel")


def install(bin_dir: Path, state_dir: Path) -> dict[str, str]:
    """The commands in bin_dir; returns the environment variables that make them the ones found."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} {name} \"$@\"\n")
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state_dir)}


def _state_dir() -> Path:
    return Path(os.environ["FAKE_SLURM_DIR"])


def _write_state(task: str, state: str, pid: int) -> None:
    path = _state_dir() / task
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{state} {pid}")
    os.replace(tmp, path)


def sbatch(args: list[str]) -> int:
    script = Path(args[-1])
    text = script.read_text()
    if "#SBATCH --partition=nosuch" in text:
        print("sbatch: error: invalid partition specified: nosuch", file=sys.stderr)
        print("sbatch: error: Batch job submission failed: Invalid partition name specified", file=sys.stderr)
        return 1
    counter = _state_dir() / "counter"
    job_id = int(counter.read_text()) + 1 if counter.exists() else 1000
    counter.write_text(str(job_id))
    array = re.search(r"^#SBATCH --array=0-(\d+)", text, re.M)
    tasks = range(int(array.group(1)) + 1) if array else [None]
    for index in tasks:
        task = str(job_id) if index is None else f"{job_id}_{index}"
        env = {**os.environ, "SLURM_JOB_ID": str(job_id if index is None else job_id + 1 + index)}
        if index is not None:
            env |= {"SLURM_ARRAY_JOB_ID": str(job_id), "SLURM_ARRAY_TASK_ID": str(index)}
        process = subprocess.Popen([sys.executable, __file__, "_run", task, str(script)], env=env,
                                   start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _write_state(task, "RUNNING", process.pid)
    print(f"Submitted batch job {job_id}")
    return 0


def _run(task: str, script: str) -> int:
    """One task: its batch script, then its final state."""
    code = subprocess.call(["bash", script])
    state = _state_dir() / task
    if not state.read_text().startswith("CANCELLED"):
        _write_state(task, "COMPLETED" if code == 0 else "FAILED", os.getpid())
    return code


def srun(args: list[str]) -> int:
    output = error = None
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag in ("--output", "--error"):
            value = args.pop(0)
            for key, var in (("%A", "SLURM_ARRAY_JOB_ID"), ("%a", "SLURM_ARRAY_TASK_ID"), ("%j", "SLURM_JOB_ID")):
                value = value.replace(key, os.environ.get(var, ""))
            value = value.replace("%t", "0")
            output, error = (value, error) if flag == "--output" else (output, value)
    env = {**os.environ, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS": "1",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "fakenode"}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "a") as out, open(error or output, "a") as err:
        return subprocess.call(args, env=env, stdout=out, stderr=err)


def sacct(args: list[str]) -> int:
    ids = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    print("JobID|State|NodeList")
    for path in sorted(_state_dir().iterdir()):
        if path.name.split("_")[0] in ids and not path.suffix:
            print(f"{path.name}|{path.read_text().split()[0]}|fakenode")
    return 0


def scancel(args: list[str]) -> int:
    for task in args:
        path = _state_dir() / task
        if path.exists():
            state, pid = path.read_text().split()
            if state == "RUNNING":
                _write_state(task, "CANCELLED", int(pid))
                try:
                    os.killpg(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    return 0


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "_run":
        sys.exit(_run(*rest))
    sys.exit({"sbatch": sbatch, "srun": srun, "sacct": sacct, "scancel": scancel}[command](rest))
