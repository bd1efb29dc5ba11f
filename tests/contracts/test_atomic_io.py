"""Unit tests of pipeline.core.io: atomic writes leave the old file or the new one and no temporary file;
JSON, CSV and NPY round trips; the sha256 helpers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core import io


def leftovers(directory: Path) -> list[str]:
    """Anything in directory other than the final files: temporaries of atomic writes."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


class Boom(Exception):
    pass


class HalfWrittenFrame:
    """Stands in for a DataFrame whose to_csv dies half-way through writing."""

    def to_csv(self, path, **kwargs):  # noqa: ARG002
        Path(path).write_text("layer,feature\n1,")
        raise Boom("disk full")


def test_atomic_path_replaces_the_file_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with io.atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible before the block ends
    assert target.read_text() == "new"
    assert leftovers(tmp_path) == []


def test_an_exception_inside_the_atomic_block_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(Boom):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half of the ne")
            raise Boom
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_a_failed_first_write_leaves_no_file_at_all(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with pytest.raises(Boom), io.atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise Boom
    assert not target.exists()
    assert leftovers(target.parent) == []


def test_a_write_function_failing_mid_write_leaves_the_old_csv(tmp_path):
    target = tmp_path / "table.csv"
    io.write_csv(target, pd.DataFrame({"layer": [1, 2], "feature": [3, 4]}))
    before = target.read_bytes()
    with pytest.raises(Boom):
        io.write_csv(target, HalfWrittenFrame())
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_a_json_that_cannot_be_serialised_leaves_the_old_file(tmp_path):
    target = tmp_path / "summary.json"
    io.write_json(target, {"a": 1})
    with pytest.raises(TypeError, match="not JSON serialisable"):
        io.write_json(target, {"a": object()})
    assert io.read_json(target) == {"a": 1}
    assert leftovers(tmp_path) == []


def test_an_npy_that_needs_pickle_is_refused_and_leaves_the_old_array(tmp_path):
    target = tmp_path / "tokens.npy"
    io.write_npy(target, np.arange(4))
    with pytest.raises(ValueError):
        io.write_npy(target, np.array([{"x": 1}], dtype=object))
    assert np.load(target).tolist() == [0, 1, 2, 3]
    assert leftovers(tmp_path) == []


def test_atomic_writes_create_missing_parent_directories(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    io.write_text(target, "x")
    assert target.read_text() == "x"


def test_written_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    target = tmp_path / "out.bin"
    io.write_bytes(target, b"\x00\x01")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert target.read_bytes() == b"\x00\x01"


def test_atomic_dir_swaps_in_the_new_directory_whole_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "stale.json").write_text("{}")
    with io.atomic_dir(target) as tmp:
        (tmp / "fresh.json").write_text("[]")
        assert (target / "stale.json").exists()  # the old directory stays until the block succeeds
    assert sorted(p.name for p in target.iterdir()) == ["fresh.json"]
    assert leftovers(tmp_path) == []


def test_a_failure_while_building_a_directory_leaves_the_old_one(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "kept.json").write_text("{}")
    with pytest.raises(Boom), io.atomic_dir(target) as tmp:
        (tmp / "half.json").write_text("[")
        raise Boom
    assert sorted(p.name for p in target.iterdir()) == ["kept.json"]
    assert leftovers(tmp_path) == []


def test_json_round_trip_turns_numpy_values_and_paths_into_plain_json_and_nan_into_null(tmp_path):
    target = tmp_path / "x.json"
    obj = {"i": np.int64(3), "f": np.float32(0.5), "arr": np.array([1, 2]), "path": Path("data/x.csv"),
           "nan": math.nan, "inf": -math.inf, "nested": [1.5, {"deep": math.nan}], "text": "α → β"}
    io.write_json(target, obj)
    raw = target.read_text(encoding="utf-8")
    assert "NaN" not in raw and "Infinity" not in raw
    assert "α → β" in raw  # not \u-escaped
    back = json.loads(raw)  # strict JSON
    assert back == {"i": 3, "f": 0.5, "arr": [1, 2], "path": "data/x.csv", "nan": None, "inf": None,
                    "nested": [1.5, {"deep": None}], "text": "α → β"}
    assert io.read_json(target) == back
    assert raw.endswith("}\n")


def test_csv_round_trip_keeps_columns_and_float32_exact_values_and_is_byte_stable(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "layer": [0, 1, 2], "label": ["a", "b,c", "d"],
        "x": rng.normal(size=3).astype(np.float32).astype(np.float64),
        "y": [1e-12, 123456.789, math.nan],
    })
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    io.write_csv(a, frame)
    io.write_csv(b, frame.copy())
    assert a.read_bytes() == b.read_bytes()
    assert b"\r\n" not in a.read_bytes()
    back = pd.read_csv(a)
    assert list(back.columns) == list(frame.columns)
    assert back["layer"].tolist() == [0, 1, 2]
    assert back["label"].tolist() == ["a", "b,c", "d"]
    # 9 significant digits hold any float32 exactly: read back as float32, the value is the same
    assert back["x"].astype(np.float32).tolist() == frame["x"].astype(np.float32).tolist()
    assert np.allclose(back["y"][:2], frame["y"][:2], rtol=1e-9, atol=0)
    assert math.isnan(back["y"][2])


def test_npy_round_trip_keeps_dtype_shape_and_values(tmp_path):
    target = tmp_path / "tokens.npy"
    array = np.arange(24, dtype=np.int32).reshape(4, 6)
    io.write_npy(target, array)
    back = np.load(target)
    assert back.dtype == np.int32
    assert np.array_equal(back, array)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_sha256_file_agrees_with_hashlib_whatever_the_chunk_size(tmp_path, chunk):
    data = bytes(range(256)) * 41 + b"tail"
    target = tmp_path / "blob"
    target.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert io.sha256_file(target, chunk=chunk) == expected
    assert io.sha256_bytes(data) == expected


def test_sha256_of_empty_input_agrees_with_hashlib(tmp_path):
    target = tmp_path / "empty"
    target.write_bytes(b"")
    assert io.sha256_file(target) == io.sha256_bytes(b"") == hashlib.sha256(b"").hexdigest()
