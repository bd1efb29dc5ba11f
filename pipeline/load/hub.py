"""Getting hub weights onto this machine, or failing fast and clearly when that cannot happen.

Order of business for a hub model + SAE release:
1. `HF_HUB_OFFLINE` set: use the Hugging Face cache only; anything missing is one clear error.
2. Otherwise probe the hub with one short request. If it answers, the real loaders download what
   is missing into the cache. If it does not (no network), fall back to the cache when it already
   holds every file, and fail in about a second, naming the offline preset, when it does not.
After the `model` stage, later stages run with HF_HUB_OFFLINE=1: they read exactly the snapshot
the model stage resolved and recorded, and make no network request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import UserError

SAE_FILES = ("cfg.json", "sae_weights.safetensors")
MODEL_FILES = ("config.json", "model.safetensors")  # what TransformerLens reads for a hub model's weights
OFFLINE_HINT = "the offline preset runs with `dvc exp run -S preset=toy`"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def go_offline() -> None:
    """Make huggingface_hub, transformers and datasets read the cache only (this process)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as c

        c.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        pass


def offline_for(model_source: str) -> None:
    """Later stages read a hub model's snapshot from the cache only (no request): the one the
    model stage resolved and recorded."""
    if model_source == "hub":
        go_offline()


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str

    def cached_path(self) -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.repo_id, self.filename)
        return Path(found) if isinstance(found, str) else None


def probe(repo_id: str, filename: str, timeout: float = 8.0) -> str | None:
    """None if the hub serves repo_id/filename, else a short reason (e.g. 'no network')."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=timeout)
        return None
    except (RepositoryNotFoundError, EntryNotFoundError) as exc:
        raise UserError(f"the hub has no {repo_id}/{filename} ({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - connection errors come in many types
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}" if str(exc) else type(exc).__name__


def ensure_available(files: list[HubFile], what: str) -> str:
    """Make sure the files can be loaded; returns 'online' or 'cache'. Raises one clear line."""
    if hub_offline():
        missing = [f for f in files if f.cached_path() is None]
        if missing:
            first = missing[0]
            raise UserError(
                f"HF_HUB_OFFLINE is set and the Hugging Face cache lacks {len(missing)} file(s) of {what} "
                f"(first: {first.repo_id}/{first.filename}); unset HF_HUB_OFFLINE with network access, "
                f"or {OFFLINE_HINT}"
            )
        return "cache"
    reason = probe(files[0].repo_id, files[0].filename)
    if reason is None:
        return "online"
    missing = [f for f in files if f.cached_path() is None]
    if missing:
        raise UserError(
            f"cannot fetch {what} from huggingface.co ({reason}) and the Hugging Face cache lacks "
            f"{len(missing)} of its files; connect to the internet once, or {OFFLINE_HINT}"
        )
    go_offline()
    return "cache"


def snapshot_record(file: HubFile) -> dict[str, str]:
    """Where a cached hub file came from: repo, commit and content hash (the blob's name, which is
    the sha256 for LFS files such as weights)."""
    path = file.cached_path()
    if path is None:
        return {"repo_id": file.repo_id, "file": file.filename, "revision": "unknown"}
    parts = path.parts
    revision = parts[parts.index("snapshots") + 1] if "snapshots" in parts else "unknown"
    return {
        "repo_id": file.repo_id,
        "file": file.filename,
        "revision": revision,
        "blob": Path(os.path.realpath(path)).name,
    }
