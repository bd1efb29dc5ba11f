"""Write files into a Hugging Face hub cache exactly as `huggingface_hub` lays one out.

`HF_HOME=D` puts the hub cache at `D/hub`. A repo `org/name` of type `model` (or `dataset`) lives
in `D/hub/models--org--name` (`datasets--org--name`):

    blobs/<etag>                      the file's bytes, named by its etag: the sha256 of the content
                                      for files stored with Git LFS (weights, parquet), the git blob
                                      sha1 for ordinary files (json, txt)
    snapshots/<commit>/<path>         a relative symlink to ../../blobs/<etag>
    refs/main                         the commit that `main` points at

`huggingface_hub.hf_hub_download(..., local_files_only=True)` (or with HF_HUB_OFFLINE=1) reads
refs/main, then snapshots/<commit>/<path>; nothing else is needed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

# Extensions the real repos keep in Git LFS (their etag is the sha256 of the content).
# (.npz and .model as in the default .gitattributes of a hub repo: Gemma Scope's params.npz is an LFS file.)
LFS_SUFFIXES = (".safetensors", ".parquet", ".bin", ".h5", ".msgpack", ".ot", ".onnx", ".npz", ".model")


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def etag(path: str, content: bytes) -> str:
    if path.endswith(LFS_SUFFIXES):
        return hashlib.sha256(content).hexdigest()
    return git_blob_sha1(content)


def repo_folder(repo_id: str, repo_type: str = "model") -> str:
    return f"{repo_type}s--" + repo_id.replace("/", "--")


@dataclass
class CachedRepo:
    """One repo's files, written into the cache by `write`; the commit is derived from the content."""

    repo_id: str
    repo_type: str = "model"
    files: dict[str, bytes] = field(default_factory=dict)

    def add(self, path: str, content: bytes | str) -> None:
        self.files[path] = content.encode("utf-8") if isinstance(content, str) else content

    def commit(self) -> str:
        digest = hashlib.sha1()
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + etag(path, self.files[path]).encode() + b"\n")
        return digest.hexdigest()

    def write(self, hf_home: Path) -> Path:
        """Write every file; returns the snapshot directory."""
        root = Path(hf_home) / "hub" / repo_folder(self.repo_id, self.repo_type)
        commit = self.commit()
        snapshot = root / "snapshots" / commit
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        for path, content in self.files.items():
            tag = etag(path, content)
            blob = root / "blobs" / tag
            if not blob.exists():
                tmp = blob.with_name(blob.name + ".incomplete")
                tmp.write_bytes(content)
                os.replace(tmp, blob)
            link = snapshot / path
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(os.path.relpath(blob, link.parent))
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(commit)
        return snapshot
