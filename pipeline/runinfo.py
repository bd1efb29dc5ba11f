"""Run records: how long a stage took, where, and with which library versions.

Each stage writes data/runs/<stage>.json when it finishes. These are the only outputs that differ
between two runs of the same params (wall time, date, host); every CSV, JSON and NPY result is
byte-identical on CPU. The report reads them for its "the run" table.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from pipeline import paths
from pipeline.io import write_json

LIBRARIES = ("torch", "transformer-lens", "sae-lens", "transformers", "datasets", "dvc", "numpy", "pandas")


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_description(device: Any) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return str(device)


@contextlib.contextmanager
def stage_record(stage: str, **fields: Any) -> Iterator[dict[str, Any]]:
    """Time the block; on success write data/runs/<stage>.json with `fields` and anything the
    block adds to the yielded dict."""
    record: dict[str, Any] = {"stage": stage, **fields}
    started = time.perf_counter()
    record["started_utc"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    yield record
    record["wall_s"] = round(time.perf_counter() - started, 3)
    record["versions"] = library_versions()
    record["host"] = platform.node()
    write_json(paths.run_record(stage), record)
