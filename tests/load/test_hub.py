"""The gpt2-small preset with no network: one clear line within seconds; a warm cache is used."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.core.errors import UserError
from pipeline.load import hub
from tests.conftest import ROOT, run_cli

CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens: connection refused at once


@pytest.mark.parametrize("env", [
    {"HF_HUB_OFFLINE": "1"},
    {"HF_ENDPOINT": CLOSED_PORT},  # a machine without network, even where this test has one
])
def test_model_stage_offline_without_cache_fails_in_one_line(tmp_path, env):
    result = run_cli(["--params", str(ROOT / "params.yaml"), "model"], cwd=tmp_path,
                     env={"HF_HOME": str(tmp_path / "hf"), **env})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "gpt2-small-res-jb" in lines[0] and "-S preset=toy" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "model.json").exists()
    assert not list((tmp_path / "hf").rglob("*.safetensors"))  # nothing was downloaded


@pytest.mark.parametrize("offline", [True, False])
def test_no_network_and_no_cache_is_decided_by_at_most_one_probe_before_any_loading(monkeypatch, offline):
    """What makes the offline failure fast: one probe of the hub at most (none under HF_HUB_OFFLINE), no
    retry loop, and the error comes before any loader runs."""
    probes = []
    monkeypatch.setattr(hub, "probe", lambda repo, name, **_: probes.append((repo, name)) or "no network")
    monkeypatch.setattr(hub.HubFile, "cached_path", lambda _self: None)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    files = [hub.HubFile("jbloom/GPT2-Small-SAEs-Reformatted", f"blocks.{i}.hook_resid_pre/cfg.json") for i in range(12)]
    with pytest.raises(UserError, match="-S preset=toy"):
        hub.ensure_available(files, "SAE release gpt2-small-res-jb")
    assert len(probes) == (0 if offline else 1)


def _fake_cache(root, repo_id: str, filename: str, content: bytes, commit: str = "a" * 40, blob: str = "b" * 64):
    """The layout huggingface_hub uses: blobs/<etag> and snapshots/<commit>/<file> -> blob."""
    repo_dir = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "blobs" / blob).write_bytes(content)
    snap = repo_dir / "snapshots" / commit / filename
    snap.parent.mkdir(parents=True, exist_ok=True)
    snap.symlink_to(repo_dir / "blobs" / blob)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)


def test_a_warm_cache_is_used_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    files = [hub.HubFile("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.1.hook_resid_pre/cfg.json"),
             hub.HubFile("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.1.hook_resid_pre/sae_weights.safetensors")]
    with pytest.raises(UserError, match="cache lacks 2 of its files"):
        hub.ensure_available(files, "test release")
    for i, f in enumerate(files):
        _fake_cache(tmp_path, f.repo_id, f.filename, b"x", blob=str(i) * 64)
    assert hub.ensure_available(files, "test release") == "cache"
    assert hub.hub_offline()  # later loads in this process read the cache only
    record = hub.snapshot_record(files[1])
    assert record == {"repo_id": files[1].repo_id, "file": files[1].filename, "revision": "a" * 40, "blob": "1" * 64}


def test_hf_hub_offline_is_respected(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    f = hub.HubFile("gpt2", "config.json")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set and the Hugging Face cache lacks 1 file"):
        hub.ensure_available([f], "model gpt2")
    _fake_cache(tmp_path, "gpt2", "config.json", b"{}")
    assert hub.ensure_available([f], "model gpt2") == "cache"


def test_wikitext_unreachable_is_one_line_naming_the_offline_preset(tmp_path):
    code = ("from pipeline.load.corpus import load_corpus\n"
            "from pipeline.core.errors import UserError\n"
            "try:\n    load_corpus('wikitext-2')\nexcept UserError as e:\n    print('USERERROR', e)\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    line = next(line for line in out.stdout.splitlines() if line.startswith("USERERROR"))
    assert "could not load WikiText-2 (Salesforce/wikitext, wikitext-2-raw-v1, test)" in line
    assert "-S preset=toy" in line
