"""Run records: how long a stage took, where, and with which library versions.

Each stage writes data/runs/<stage>.json when it finishes. Its time is split: `startup_s` (from
the process's start to the stage's: interpreter, module imports, reading params), `import_s`
(libraries imported lazily during the stage, e.g. TransformerLens when the model is first loaded:
`timed("import")` blocks), `load_s` (building the model, SAEs and tokenizer: `timed("load")`
blocks) and `work_s` (the rest), with `wall_s = import_s + load_s + work_s`. These are the only outputs that differ
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

from pipeline.core import artifacts
from pipeline.core.io import write_json

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


_timers = {"import": 0.0, "load": 0.0}  # seconds spent in timed() blocks by this process


@contextlib.contextmanager
def timed(kind: str) -> Iterator[None]:
    """Count the block as `kind` ("import" or "load") in the stage's record."""
    started = time.perf_counter()
    try:
        yield
    finally:
        _timers[kind] += time.perf_counter() - started


def process_age_s() -> float | None:
    """Seconds since this process started (None where the OS does not say)."""
    try:
        import psutil  # a dependency of dvc

        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a missing or failing psutil only loses this figure
        return None


@contextlib.contextmanager
def stage_record(stage: str, **fields: Any) -> Iterator[dict[str, Any]]:
    """Time the block; on success write data/runs/<stage>.json with `fields` and anything the
    block adds to the yielded dict."""
    record: dict[str, Any] = {"stage": stage, **fields}
    age = process_age_s()
    record["startup_s"] = None if age is None else round(age, 3)
    started, before = time.perf_counter(), dict(_timers)
    record["started_utc"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    yield record
    record["wall_s"] = round(time.perf_counter() - started, 3)
    record["import_s"] = round(_timers["import"] - before["import"], 3)
    record["load_s"] = round(_timers["load"] - before["load"], 3)
    record["work_s"] = round(record["wall_s"] - record["import_s"] - record["load_s"], 3)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        record["peak_gpu_mem_bytes"] = int(torch.cuda.max_memory_allocated())
    record["versions"] = library_versions()
    record["host"] = platform.node()
    write_json(artifacts.run_record(stage), record)
