from __future__ import annotations

import json

import pytest

from convmaps.errors import ConvmapsError
from convmaps.io.manifest import build, entry, merge, read, read_manifest

from .conftest import no_hang


def _write(folder, name, obj):
    (folder / name).write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


@pytest.mark.parametrize("obj", [
    [], {"inputs": []}, {"run": 3, "inputs": []}, {"run": "r", "inputs": {}},
    {"run": "r", "inputs": [{"key": 1, "status": "ok"}]},
    {"run": "r", "inputs": [{"key": "a", "status": "ok", "files": "x"}]},
    {"run": "r", "inputs": [{"key": "a", "status": "ok", "files": [3]}]},
    {"run": "r", "inputs": [{"key": "../../etc", "status": "ok", "files": []}]},
    {"run": "r", "inputs": [{"key": "/abs", "status": "ok", "files": []}]},
    {"run": "r", "model": ["x"], "inputs": []},
    {"run": "r", "inputs": [{"key": "a", "status": "ok", "files": []}]},  # no source
    {"run": "r", "inputs": [{"key": "a\u0000b", "source": "", "status": "ok", "files": []}]},
    {"run": "r", "inputs": [{"key": "a", "source": "", "status": "ok", "files": [],
                             "top5": [{"class": "x", "probability": "x"}]}]},
    {"run": "r", "inputs": [], "layers": "abc"},
    {"run": "r", "inputs": [], "layers": [{"params": 3}]},
    {"run": "r", "inputs": [], "layers": [{"name": "C1", "out_shape": ["<script>"]}]},
    {"run": "r", "inputs": [], "input_size": ["<img src=x onerror=alert(1)>", 28]},
    {"run": "r", "inputs": [], "input_size": [0, 28]},  # the report divides by it
    {"run": "r", "inputs": [], "input_size": [28]},
    {"run": "r", "inputs": [], "input_size": [28, 28, 28]},
    {"run": "r", "inputs": [], "input_size": [10**400, 28]},
    {"run": "r", "inputs": [{"key": "a", "source": "", "status": "ok", "files": [],
                             "top5": [{"class": "x", "probability": 10**400}]}]},
    {"run": "r", "inputs": [{"key": "a", "source": "", "status": "ok", "files": [],
                             "top5": [{"class": "x", "probability": -0.5}]}]},
    '{"run": "r", "inputs": [{"key": "a", "source": "", "status": "ok", "files": [], '
    '"top5": [{"class": "x", "probability": NaN}]}]}',
    {"run": "r", "inputs": [], "options": [1]},
    {"run": "r", "inputs": [], "selected": {"activations": 5}},
    {"run": "r", "inputs": [], "modules": ["../../home/notes"]},
    {"run": "r", "inputs": [], "modules": 5},
    {"run": "r", "inputs": [{"key": "a", "source": "", "status": "ok", "files": [],
                             "sha256": "../../../etc/x"}]},  # names a report picture
    "[" * 100_000 + "]" * 100_000,  # deep nesting: RecursionError inside json
    "not json", "\udcff",
])
def test_foreign_manifests_are_one_line_errors(tmp_path, obj):
    if obj == "\udcff":
        (tmp_path / "manifest.json").write_bytes(b"\xff\xfe{")
    else:
        _write(tmp_path, "manifest.json", obj)
    with pytest.raises(ConvmapsError) as e:
        read(tmp_path)
    assert "\n" not in str(e.value)


def test_missing_manifest():
    assert read("/nonexistent") is None
    with pytest.raises(ConvmapsError, match="no manifest.json"):
        read_manifest("/nonexistent")


def test_merge_waits_for_every_finished_shard_of_the_same_inputs(tmp_path):
    header = {"run": "r", "inputs_id": "i"}
    a = build(header, [entry("a", "in/a", "1" * 64, "ok", ["x"])])
    b_running = build(header, [entry("b", "in/b", None, "pending", ["x"])])
    _write(tmp_path, "manifest.shard-0-of-2.json", a)
    assert merge(tmp_path, header, 2, ["a", "b"], []) is None  # shard 1 not started
    _write(tmp_path, "manifest.shard-1-of-2.json", b_running)
    assert merge(tmp_path, header, 2, ["a", "b"], []) is None  # shard 1 still running
    stale = build({"run": "r", "inputs_id": "other"}, [entry("z", "in/z", "3" * 64, "ok", [])])
    _write(tmp_path, "manifest.shard-1-of-2.json", stale)
    assert merge(tmp_path, header, 2, ["a", "b"], []) is None  # another input set's shard
    b = build(header, [entry("b", "in/b", "2" * 64, "ok", ["x"])])
    _write(tmp_path, "manifest.shard-1-of-2.json", b)
    earlier = [entry("c", "old/c", "4" * 64, "ok", []), entry("b", "old/b", "5" * 64, "ok", [])]
    merged = merge(tmp_path, header, 2, ["b", "a"], earlier)
    assert merged is not None and merged["finished"]
    assert [(e["key"], e["sha256"]) for e in merged["inputs"]] == [("b", "2" * 64),
                                                                   ("a", "1" * 64),
                                                                   ("c", "4" * 64)]
    assert read(tmp_path) == merged and not list(tmp_path.glob("manifest.shard-*"))


@pytest.mark.parametrize("name", ["manifest.json", "manifest.shard-0-of-2.json",
                                  "projections.json"])
def test_a_fifo_in_place_of_a_manifest_is_one_line(tmp_path, fifo, name):
    fifo(tmp_path / name)
    with pytest.raises(ConvmapsError, match="not a regular file but a named pipe"):
        no_hang(read, tmp_path, name)
