"""Pinned hub revisions: the model stage records each repo's commit, later stages load exactly that commit (not
whatever `main` points to now) and check the files they read against the recorded blobs; `hub_revisions` pins
commits up front; a hub that refuses a stale token or a gated repo says so in its own line.

The "new upstream commit" is made on a cheap copy of the hub twin (links to its blobs): a second snapshot of a
repo with one file changed, and `refs/main` moved to it, which is what a later `hf download` leaves in a cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import UserError
from pipeline.load import hub
from pipeline.load.revisions import check_pins, check_recorded, recorded_revisions, sae_lens_at
from pipeline.twin.hub_cache import repo_folder
from tests.conftest import ROOT, run_cli

OAI = "gpt2-small-resid-post-v5-32k"
OAI_REPO = "jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs"
WEIGHTS = "v5_32k_layer_4.pt/sae_weights.safetensors"
CPU = torch.device("cpu")


def cheap_copy(twin: Path, dest: Path) -> Path:
    """The twin's cache with its blobs linked, not copied (as tests/load/test_twin.py's twin_without)."""
    for top in ("hub", "datasets"):
        shutil.copytree(twin / top, dest / top, symlinks=True,
                        ignore=lambda d, names: names if Path(d).name == "blobs" else [])
    for blobs in (twin / "hub").glob("*/blobs"):
        target = dest / "hub" / blobs.parent.name / "blobs"
        target.rmdir()
        target.symlink_to(blobs)
    return dest


def new_commit(home: Path, repo_id: str, changed: dict[str, bytes]) -> tuple[str, str]:
    """A second snapshot of `repo_id` with `changed` files replaced, `main` moved to it: (old commit, new commit)."""
    root = home / "hub" / repo_folder(repo_id)
    old = (root / "refs" / "main").read_text()
    new = hashlib.sha1((old + repr(sorted(changed))).encode()).hexdigest()
    shutil.copytree(root / "snapshots" / old, root / "snapshots" / new, symlinks=True)
    blobs = home / "hub" / repo_folder(repo_id) / "new-blobs"  # the twin's blobs dir is a link to the shared one
    blobs.mkdir(exist_ok=True)
    for path, content in changed.items():
        blob = blobs / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = root / "snapshots" / new / path
        link.unlink()
        link.symlink_to(blob)
    (root / "refs" / "main").write_text(new)
    return old, new


@pytest.fixture
def moved(hub_twin, tmp_path, monkeypatch):
    """The twin's cache (this process reads it, offline) where OpenAI's SAE repo has a newer commit on main whose
    layer-4 weights differ."""
    import huggingface_hub.constants as c
    from safetensors.torch import load_file, save

    home = cheap_copy(hub_twin, tmp_path / "hf")
    old_file = home / "hub" / repo_folder(OAI_REPO) / "snapshots" / (
        home / "hub" / repo_folder(OAI_REPO) / "refs" / "main").read_text() / WEIGHTS
    tensors = load_file(old_file)
    changed = {k: v + 1.0 if k == "W_dec" else v for k, v in tensors.items()}
    old, new = new_commit(home, OAI_REPO, {WEIGHTS: save(changed)})
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return {"home": home, "old": old, "new": new, "old_W_dec": tensors["W_dec"], "new_W_dec": changed["W_dec"]}


def test_sae_lens_loads_the_pinned_commit_not_main(moved):
    from pipeline.core.params.config import parse_params
    from pipeline.core.plan.layers import plan_layers
    from pipeline.load.library import sae_from_source

    [plan] = plan_layers(parse_params({"sae_release": OAI, "layers": [4]}))
    at_main = sae_from_source(OAI, plan, CPU, "float32")
    pinned = sae_from_source(OAI, plan, CPU, "float32", revision=moved["old"])
    assert torch.equal(at_main.W_dec.detach(), moved["new_W_dec"])
    assert torch.equal(pinned.W_dec.detach(), moved["old_W_dec"])
    with sae_lens_at({OAI_REPO: moved["old"]}):
        pass  # the library's function is back after the context
    from huggingface_hub import hf_hub_download
    from sae_lens.loading import pretrained_sae_loaders as loaders

    assert loaders.hf_hub_download is hf_hub_download


def test_the_model_stage_records_commits_and_later_stages_load_them_after_main_moved(moved, tmp_path, monkeypatch):
    """The model stage pinned (hub_revisions) to the old commit records it; load_sae, run after `main` moved on,
    reads the recorded commit; a recorded blob the cache no longer holds is one line."""
    from pipeline.core.params.config import parse_params
    from pipeline.core.plan.record import ModelRecord
    from pipeline.load import load_sae
    from pipeline.stages.model import run_model_stage

    monkeypatch.chdir(tmp_path)
    config = parse_params({"sae_release": OAI, "layers": [4], "hub_revisions": {OAI_REPO: moved["old"]},
                           "device": "cpu"})
    resolved = run_model_stage(config)
    sae_files = [f for e in resolved["layers"] for f in e["hub"]]
    assert recorded_revisions(sae_files) == {OAI_REPO: moved["old"]}
    assert {f["revision"] for f in resolved["model"]["hub"]} == {(moved["home"] / "hub" / repo_folder("gpt2") / "refs"
                                                                  / "main").read_text()}
    assert {f["file"] for f in resolved["model"]["hub"]} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert resolved["tokenizer"]["revision"] == resolved["model"]["hub"][0]["revision"]
    record = ModelRecord.read()
    sae = load_sae(record, 4, CPU, "float32")  # TopK: SAE-Lens loads it, at the recorded commit
    assert torch.equal(sae.W_dec.detach(), moved["old_W_dec"])

    # the recorded file now links to another blob in the cache: one line, naming it
    snapshot = moved["home"] / "hub" / repo_folder(OAI_REPO) / "snapshots" / moved["old"]
    link = snapshot / WEIGHTS
    link.unlink()
    link.symlink_to(next(iter((moved["home"] / "hub" / repo_folder(OAI_REPO) / "new-blobs").iterdir())))
    with pytest.raises(UserError, match=rf"{OAI_REPO}/{WEIGHTS} at commit {moved['old'][:12]} is blob .*, but the "
                                        "model stage recorded blob") as err:
        load_sae(record, 4, CPU, "float32")
    assert "\n" not in str(err.value)


def fake_cache(root: Path, repo_id: str, filename: str, content: bytes, blob: str, commit: str = "c" * 40) -> Path:
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "blobs" / blob).write_bytes(content)
    link = repo_dir / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(repo_dir / "blobs" / blob)
    return link


def test_check_recorded_holds_every_file_to_its_blob_and_its_content_hash(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    good = b"weights"
    lfs = hashlib.sha256(good).hexdigest()
    git = hashlib.sha1(b"blob %d\0" % len(good) + good).hexdigest()
    fake_cache(tmp_path, "org/a", "w.safetensors", good, lfs)
    fake_cache(tmp_path, "org/a", "config.json", good, git)
    record = [{"repo_id": "org/a", "file": "w.safetensors", "revision": "c" * 40, "blob": lfs},
              {"repo_id": "org/a", "file": "config.json", "revision": "c" * 40, "blob": git}]
    check_recorded(record)  # both hash to their names
    fake_cache(tmp_path, "org/b", "w.safetensors", b"damaged", lfs)
    with pytest.raises(UserError, match="org/b/w.safetensors at commit cccccccccccc hashes to .* not its blob name"):
        check_recorded([record[0] | {"repo_id": "org/b"}])
    with pytest.raises(UserError, match=r"the Hugging Face cache has no org/a/w.safetensors at commit dddddddddddd"):
        check_recorded([record[0] | {"revision": "d" * 40}])
    with pytest.raises(UserError, match="records no commit"):
        recorded_revisions([record[0] | {"revision": "unknown"}])


def test_a_pin_for_a_repo_the_study_does_not_read_is_refused():
    assert check_pins(None, ["gpt2"]) == {}
    with pytest.raises(UserError, match="hub_revisions pins google/gemma-2-2b, which this study does not read from the "
                                        "hub; it reads: gpt2, jbloom/x"):
        check_pins({"google/gemma-2-2b": "a" * 40}, ["gpt2", "jbloom/x"])
    from pipeline.core.params.config import parse_params

    with pytest.raises(UserError, match="a branch or tag is not a pin"):
        parse_params({"hub_revisions": {"gpt2": "main"}})
    with pytest.raises(UserError, match="it needs a mapping"):
        parse_params({"hub_revisions": ["gpt2"]})


# ---- a hub that refuses: its own line ------------------------------------------------------------

class _Refusing(BaseHTTPRequestHandler):
    headers_to_send: dict[str, str] = {}

    def _refuse(self):
        body = json.dumps({"error": self.headers_to_send.get("X-Error-Message", "")}).encode()
        self.send_response(401)
        for key, value in {"Content-Type": "application/json", **self.headers_to_send}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    do_GET = do_HEAD = _refuse  # noqa: N815 - http.server's names

    def log_message(self, format, *args):  # noqa: A002, ARG002
        pass


@pytest.mark.parametrize(("headers", "expected"), [
    ({"X-Error-Message": "Invalid credentials in Authorization header"},
     "huggingface.co refused the stored Hugging Face token (401)"),
    ({"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model is restricted."},
     "is gated: accept its licence at https://huggingface.co/"),
])
def test_a_refused_token_or_a_gated_repo_is_its_own_line_not_no_network(tmp_path, headers, expected):
    handler = type("Handler", (_Refusing,), {"headers_to_send": headers})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
               "HF_TOKEN": "hf_stale_token_for_the_test", "NO_PROXY": "127.0.0.1,localhost"}
        env.pop("HF_HUB_OFFLINE", None)
        result = run_cli(["--params", str(ROOT / "params.yaml"), "model"], cwd=tmp_path,
                         env=env | {"HF_HUB_OFFLINE": ""})
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "connect to the internet" not in errors[0] and "Traceback" not in result.stderr


def test_probe_names_the_refusal_in_process(monkeypatch):
    """The same two refusals through `hub.probe` with the request replaced: what the model stage relies on."""
    import httpx2 as httpx  # huggingface_hub 2.x's HTTP client
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    response = httpx.Response(401, request=httpx.Request("HEAD", "https://huggingface.co/gpt2/resolve/main/x"))

    def stale(*_args, **_kwargs):
        raise HfHubHTTPError("401 Client Error: Invalid credentials in Authorization header", response=response)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", stale)
    with pytest.raises(UserError, match="refused the stored Hugging Face token"):
        hub.probe("gpt2", "config.json")

    def gated(*_args, **_kwargs):
        raise GatedRepoError("Access to model google/gemma-2-2b is restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", gated)
    with pytest.raises(UserError, match="google/gemma-2-2b is gated"):
        hub.probe("google/gemma-2-2b", "config.json")
    def down(*_args, **_kwargs):
        raise OSError("down")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", down)
    assert hub.probe("gpt2", "config.json") == "OSError: down"  # no network stays a reason, not an error
