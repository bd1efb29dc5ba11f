"""Shard functions for tests/executor/test_run.py: small, importable by a submitit job (which imports this
module by name from the repository root), and free of torch so a job starts in a second."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import UserError


def square_plus(inputs: int, spec: dict) -> dict:
    return {"x": spec["x"], "value": spec["x"] ** 2 + inputs}


def fails_first(inputs: str, spec: dict) -> dict:
    """Raises on a spec's first `spec["fails"]` attempts (counted in files under the folder `inputs`)."""
    tries = Path(inputs) / f"tries_{spec['x']}"
    count = int(tries.read_text()) + 1 if tries.exists() else 1
    tries.write_text(str(count))
    if count <= spec["fails"]:
        raise RuntimeError(f"attempt {count} of shard x={spec['x']} breaks")
    return {"x": spec["x"], "attempts": count}


def refuses(inputs: object, spec: dict) -> dict:  # noqa: ARG001 - the signature of a shard function
    if spec["x"] == 1:
        raise UserError("params.yaml: batch_size is too large for this shard, one line")
    return {"x": spec["x"]}
