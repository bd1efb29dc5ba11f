"""Hub revisions: every stage loads the commit the model stage resolved, and checks the files it reads are the ones
the model stage recorded.

The model stage resolves each hub repo it reads (the model's, the SAE release's) to a commit: the one
`hub_revisions` pins, or the newest (`main`) when none is pinned, and records it with the blob of every file
(data/model.json). Later stages never ask for `main`: they pass that commit where the libraries take a revision
(transformers' `from_pretrained(..., revision=)`) and, where they do not (SAE-Lens 6.54's pretrained loaders call
`hf_hub_download` without one), `sae_lens_at` hands the loader the recorded commit. `check_recorded` then holds each
file they read to its recorded blob: the cached snapshot of that commit must link to the same blob, whose content
must hash to its name (sha256 for files kept in Git LFS, the git blob sha1 for the others), so a cache that was
edited, damaged or re-downloaded differently is one clear line, not a silent change of weights.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.errors import UserError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
RERUN = "rerun the model stage (`dvc repro model`, with network access) to resolve and record the repo again"


def check_pins(pins: Mapping[str, str] | None, repos: Iterable[str]) -> dict[str, str]:
    """`hub_revisions` for the repos this study reads; a pin for any other repo is refused (it would pin nothing)."""
    pins = dict(pins or {})
    read = sorted(set(repos))
    unknown = sorted(set(pins) - set(read))
    if unknown:
        raise UserError(f"params.yaml: hub_revisions pins {', '.join(unknown)}, which this study does not read from the "
                        f"hub; it reads: {', '.join(read) or 'no hub repo'}")
    return pins


def recorded_revisions(files: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """repo -> the commit data/model.json records for it (one per repo)."""
    out: dict[str, str] = {}
    for f in files:
        revision = f.get("revision", "unknown")
        if not _SHA1.match(revision):
            raise UserError(f"data/model.json records no commit for {f['repo_id']}/{f['file']} ({revision}); {RERUN}")
        if out.setdefault(f["repo_id"], revision) != revision:
            raise UserError(f"data/model.json records two commits of {f['repo_id']} ({out[f['repo_id']][:12]}, "
                            f"{revision[:12]}); {RERUN}")
    return out


@contextmanager
def sae_lens_at(revisions: Mapping[str, str]) -> Iterator[None]:
    """SAE-Lens's pretrained loaders download each repo of `revisions` at that commit while this is open.

    SAE-Lens 6.54.12's loaders (sae_lens/loading/pretrained_sae_loaders.py) call the module's `hf_hub_download`
    with no revision, and `SAE.from_pretrained` takes none; a commit given here is passed to every such call for
    its repo (a call that names a revision itself keeps it). The loader's own code is otherwise unchanged."""
    if not revisions:
        yield
        return
    from sae_lens.loading import pretrained_sae_loaders as loaders

    original = loaders.hf_hub_download

    @functools.wraps(original)
    def at_revision(*args: Any, **kwargs: Any):
        repo_id = kwargs.get("repo_id", args[0] if args else None)
        if kwargs.get("revision") is None and repo_id in revisions:
            kwargs["revision"] = revisions[repo_id]
        return original(*args, **kwargs)

    loaders.hf_hub_download = at_revision
    try:
        yield
    finally:
        loaders.hf_hub_download = original


def content_hash(path: Path, like: str) -> str:
    """The hash a blob of this kind is named by: sha256 of the content (64 hex digits), or git's blob sha1 (40)."""
    size = path.stat().st_size
    digest = hashlib.sha256() if _SHA256.match(like) else hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def _verified(path: str, blob: str) -> str | None:
    """The content's hash where it is not `blob`, else None; once per process for each (file, blob)."""
    if not (_SHA256.match(blob) or _SHA1.match(blob)):
        return None  # a blob name that is no hash (an old cache's etag): only the link is checked
    found = content_hash(Path(path), blob)
    return None if found == blob else found


def check_recorded(files: Iterable[Mapping[str, str]]) -> None:
    """Each recorded hub file ({repo_id, file, revision, blob}) is in the Hugging Face cache at its commit, links to
    the recorded blob, and hashes to it; else one line naming the file."""
    from huggingface_hub import try_to_load_from_cache

    for f in files:
        repo, name, revision, blob = f["repo_id"], f["file"], f.get("revision", "unknown"), f.get("blob")
        where = f"{repo}/{name} at commit {revision[:12]}"
        found = try_to_load_from_cache(repo, name, revision=revision) if _SHA1.match(revision) else None
        if not isinstance(found, str):
            raise UserError(f"the Hugging Face cache has no {where}, which the model stage recorded; {RERUN}")
        actual = Path(os.path.realpath(found))
        if blob is not None and actual.name != blob:
            raise UserError(f"the Hugging Face cache's {where} is blob {actual.name[:16]}..., but the model stage "
                            f"recorded blob {blob[:16]}...; {RERUN}")
        if blob is not None and (wrong := _verified(str(actual), blob)) is not None:
            raise UserError(f"the Hugging Face cache's {where} hashes to {wrong[:16]}..., not its blob name "
                            f"{blob[:16]}... (a damaged or edited file): delete {actual} and {RERUN}")
