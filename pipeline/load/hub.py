"""Getting hub weights onto this machine, or failing fast and clearly when that cannot happen.

Order of business for a hub model + SAE release:
1. `HF_HUB_OFFLINE` set: use the Hugging Face cache only; anything missing is one clear error.
2. Otherwise probe the hub with one short request. If it answers, the real loaders download what
   is missing into the cache. If it does not (no network), fall back to the cache when it already
   holds every file, and fail in about a second, naming the offline preset, when it does not.
After the `model` stage, later stages run with HF_HUB_OFFLINE=1: they read exactly the snapshot
the model stage resolved and recorded, and make no network request (pipeline.load.revisions checks it).

A hub that refuses us says why in one line of its own: a gated repo whose licence is not accepted (Gemma-2 and
Gemma Scope), and a stored token the hub no longer accepts (401), are not "no network".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import UserError

SAE_FILES = ("cfg.json", "sae_weights.safetensors")  # SAE-Lens's own layout (conversion_func null)
# What each SAE-Lens loader downloads per SAE folder (sae_lens/loading/pretrained_sae_loaders.py); a loader not
# listed here is not known: its files are neither checked before loading nor recorded.
SAE_FILES_BY_LOADER: dict[str | None, tuple[str, ...]] = {
    None: SAE_FILES,  # sae_lens_huggingface_loader (sparsity.safetensors is optional)
    "gemma_2": ("params.npz",),  # gemma_2_sae_huggingface_loader: the config comes from the folder's name
}
MODEL_FILES = ("config.json", "model.safetensors")  # what TransformerLens reads for a hub model's weights
WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded checkpoint (Gemma-2): the index names the shards
# Tokenizer files transformers reads where the repo has them (GPT-2: vocab.json + merges.txt; Gemma: tokenizer.json)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model")
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
    revision: str | None = None  # a commit; None: whatever `main` points to

    def cached_path(self) -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.repo_id, self.filename, revision=self.revision)
        return Path(found) if isinstance(found, str) else None


def model_files(repo_id: str, revision: str | None) -> list[HubFile]:
    """config.json and the weights TransformerLens has transformers read: model.safetensors, or the shards
    model.safetensors.index.json names where the cache holds that index (a sharded checkpoint, as Gemma-2's)."""
    files = [HubFile(repo_id, "config.json", revision)]
    index = HubFile(repo_id, WEIGHTS_INDEX, revision).cached_path()
    if index is None:
        return [*files, HubFile(repo_id, "model.safetensors", revision)]
    shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    return [*files, HubFile(repo_id, WEIGHTS_INDEX, revision), *(HubFile(repo_id, s, revision) for s in shards)]


def tokenizer_files(repo_id: str, revision: str | None) -> list[HubFile]:
    """The tokenizer files the cache holds for the repo (after loading: the ones transformers fetched)."""
    found = [HubFile(repo_id, name, revision) for name in TOKENIZER_FILES]
    return [f for f in found if f.cached_path() is not None]


def _refused(repo_id: str, exc: Exception) -> UserError | None:
    """The hub's own refusals, each its own line: a gated repo, a token it does not accept."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    if isinstance(exc, GatedRepoError):
        return UserError(f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} while logged in, "
                         "then log in here with `hf auth login` (or set HF_TOKEN) and run again")
    response = getattr(exc, "response", None)
    if isinstance(exc, HfHubHTTPError) and getattr(response, "status_code", None) == 401:
        return UserError(f"huggingface.co refused the stored Hugging Face token (401) when asked for {repo_id}: it is "
                         "stale or revoked; log in again with `hf auth login`, or remove it (`hf auth logout`, "
                         "unset HF_TOKEN) to use public repos without one")
    return None


def probe(repo_id: str, filename: str, timeout: float = 8.0, revision: str | None = None) -> str | None:
    """None if the hub serves repo_id/filename, else a short reason (e.g. 'no network'). A gated repo or a
    refused token raises its own one line."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), timeout=timeout)
        return None
    except (RepositoryNotFoundError, EntryNotFoundError) as exc:
        refused = _refused(repo_id, exc)
        if refused is not None:
            raise refused from None
        raise UserError(f"the hub has no {repo_id}/{filename}{f' at {revision}' if revision else ''} "
                        f"({type(exc).__name__}); a private repo needs `hf auth login`") from None
    except Exception as exc:  # noqa: BLE001 - connection errors come in many types
        refused = _refused(repo_id, exc)
        if refused is not None:
            raise refused from None
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
    reason = probe(files[0].repo_id, files[0].filename, revision=files[0].revision)
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
