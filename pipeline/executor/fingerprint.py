"""The key a finished shard is stored under: everything its result depends on, hashed.

A shard is a pure function of its stage's inputs and its own spec, so its result can be reused by a
later run exactly when all of these are unchanged:

- the params the stage reads (their resolved values, as the stage sees them);
- the content of every input file and folder the stage reads (what DVC lists as its data deps);
- the code: every file of the `pipeline` package (any edit invalidates every stored shard, the
  conservative choice) and the versions of the libraries that compute the numbers;
- the stage's name (e.g. `intervene`) and the shard's spec (e.g. which features it runs).

How the shards run (the executor, the cluster, the number of retries) is not in the key: it changes
nothing they compute. The number of shards changes the specs, so only shards with the same spec are
reused.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # pipeline/
LIBRARIES = ("torch", "numpy", "pandas", "transformer-lens", "sae-lens", "transformers")


def _canonical(value: Any) -> str:
    """One text per value, whatever the dict order; tuples and lists alike (params hold either)."""
    return json.dumps(value, sort_keys=True, default=repr, separators=(",", ":"))


def _hash_tree(path: Path, h: Any, root: Path | None) -> None:
    """Feed every file under `path` (or `path` itself) to h: its name (relative to root, or as given), then
    its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if "__pycache__" in file.parts:
            continue
        name = file.relative_to(root) if root is not None else file
        h.update(f"\0{name.as_posix()}\0".encode())
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)


def files_digest(paths: Iterable[Path | str], root: Path | None = None) -> str:
    """sha256 of the named files and folders: each file's name (relative to `root`, or as given: the
    stages give paths relative to the repository) and contents; a missing path counts as missing."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        if path.exists():
            _hash_tree(path, h, root)
        else:
            h.update(f"\0missing:{path.as_posix()}\0".encode())
    return h.hexdigest()


def code_version(package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 of every file of the package (names and contents), and the Python and library versions."""
    h = hashlib.sha256(files_digest([package_dir], root=package_dir.parent).encode())
    versions = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    h.update(_canonical(versions).encode())
    return h.hexdigest()


def stage_fingerprint(stage: str, params: Mapping[str, Any], inputs: Iterable[Path | str]) -> str:
    """The part of every shard's key its stage shares: name, params, input files, code."""
    parts = {"stage": stage, "params": dict(params), "inputs": files_digest(inputs), "code": code_version()}
    return hashlib.sha256(_canonical(parts).encode()).hexdigest()


def shard_key(fingerprint: str, spec: Any) -> str:
    """The key of one shard: its stage's fingerprint and its own spec."""
    return hashlib.sha256(f"{fingerprint}\0{_canonical(spec)}".encode()).hexdigest()
