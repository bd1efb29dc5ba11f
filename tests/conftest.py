"""Shared fixtures: seeding, network detection for `network` tests, and project copies.

`network` tests run for real where huggingface.co and neuronpedia.org answer and are skipped
(reported as skipped, not passed) where they do not, e.g. in CI here.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.quiet import quiet_library_warnings

ROOT = Path(__file__).resolve().parents[1]
quiet_library_warnings()
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)


@functools.cache
def network_available() -> bool:
    for host in ("huggingface.co", "www.neuronpedia.org"):
        try:
            socket.create_connection((host, 443), timeout=3).close()
        except OSError:
            return False
    return True


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    needs = [item for item in items if "network" in item.keywords]
    if needs and not network_available():
        skip = pytest.mark.skip(reason="needs the internet (huggingface.co, neuronpedia.org): unreachable here")
        for item in needs:
            item.add_marker(skip)


GIT_ENV = {
    "GIT_AUTHOR_NAME": "tests", "GIT_AUTHOR_EMAIL": "tests@example.invalid",
    "GIT_COMMITTER_NAME": "tests", "GIT_COMMITTER_EMAIL": "tests@example.invalid",
    "DVC_NO_ANALYTICS": "1",
}


def project_files() -> list[str]:
    """The files a fresh clone of the working tree would have (tracked + new, not ignored)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def make_project_copy(dest: Path) -> Path:
    """Copy the working tree into dest and make it a git repo with one commit (DVC needs one)."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    env = {**os.environ, **GIT_ENV}
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def run_cli(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` in a subprocess, as DVC runs it (the package from this checkout,
    or from cwd when cwd is a project copy)."""
    pythonpath = str(cwd) if (Path(cwd) / "pipeline").is_dir() else str(ROOT)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **GIT_ENV, "PYTHONPATH": pythonpath, **(env or {})})


def run_dvc(args: list[str], cwd: Path, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    dvc = Path(sys.executable).parent / "dvc"
    return subprocess.run([str(dvc), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **GIT_ENV, **(env or {})})
