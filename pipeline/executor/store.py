"""Finished shards on disk: one file per shard key, written atomically, so a rerun can reuse them.

`<executor folder>/store/<stage>/<key>.pkl` holds one shard's result (a pickle: the store is this
project's own cache, written and read by its own code). The key (pipeline/executor/fingerprint.py)
changes with any input, param or code the shard depends on, so a stored result is never served for
other inputs; old entries are only disk space (delete the folder whenever no stage is running).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from pipeline.core.io import atomic_path


def safe_name(name: str) -> str:
    """A stage name as a folder or job name: letters, digits, `.`, `_`, `-` and `@` kept, the rest `_`."""
    return re.sub(r"[^A-Za-z0-9._@-]", "_", name)


def save_result(path: Path, result: Any) -> None:
    """Write one shard's result; a reader sees the whole file or none (pipeline.core.io.atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)


class ShardStore:
    """The finished shards of one stage."""

    def __init__(self, folder: Path, stage: str):
        self.dir = Path(folder) / "store" / safe_name(stage)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.pkl"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> Any:
        with open(self.path(key), "rb") as f:
            return pickle.load(f)
