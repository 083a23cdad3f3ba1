"""Manifest: build, read (checked), and merge the `manifest.json` of an output folder.

A manifest records one run configuration (its fingerprint, `run`) and one entry per image in
the folder: key, source, sha256, status (`ok`, `pending`, or `skipped: reason`), the files
written, and the model's top-5 predictions. Shards each write their own manifest; the last to
finish merges them.

    >>> m = build({"run": "abc"}, [entry("cat.jpg", "in/cat.jpg", "00", "ok", ["a"])])
    >>> m["inputs"][0]["status"], m["finished"]
    ('ok', True)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from convmaps.errors import ConvmapsError
from convmaps.io.layout import MANIFEST, shard_manifest

__all__ = ["build", "by_key", "entry", "merge", "ordered", "read", "read_manifest", "valid_top5"]

_SHA256 = re.compile(r"[0-9a-f]{64}")  # names report pictures: nothing else may pass
_MAX_BYTES = 1 << 30  # a manifest of a million images is ~300 MB; refuse absurd files unread
_MAX_SIDE = 1 << 16  # of a network's input, in pixels: no classifier comes near


def entry(key: str, source: str, sha: str | None, status: str, files: list[str],
          top5: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One image's manifest entry."""
    e: dict[str, Any] = {"key": key, "source": source, "sha256": sha, "status": status,
                         "files": files}
    if top5 is not None:
        e["top5"] = top5
    return e


def by_key(sources: Sequence[Any], mine: Iterable[int], entries: dict[int, dict[str, Any]],
           pending_files: Callable[[str], list[str]] | None) -> dict[str, dict[str, Any]]:
    """The entries of the images `mine` (indices into `sources`, which have `.key` and
    `.path`), by key: each one's entry when it is done, else, when `pending_files` is given,
    a pending entry that will get the files it names for that key."""
    found = {}
    for i in mine:
        src = sources[i]
        if i in entries:
            found[src.key] = entries[i]
        elif pending_files is not None:
            found[src.key] = entry(src.key, str(src.path), None, "pending",
                                   pending_files(src.key))
    return found


def build(header: dict[str, Any], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest: the run's `header` (model, options, layer table, `run` …), whether every
    entry is final, and the entries in the order given."""
    finished = all(e["status"] != "pending" for e in entries)
    return {**header, "finished": finished, "inputs": entries}


def _check(manifest: Any, path: Path) -> dict[str, Any]:
    def bad(why: str) -> ConvmapsError:
        return ConvmapsError(f"{path} is not a convmaps manifest ({why})")

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    if not isinstance(manifest.get("run"), str):
        raise bad("no run fingerprint")
    inputs = manifest.get("inputs")
    if not isinstance(inputs, list):
        raise bad("no list of inputs")
    for e in inputs:
        ok = (isinstance(e, dict) and isinstance(e.get("key"), str) and _relative(e["key"])
              and isinstance(e.get("source"), str)
              and isinstance(e.get("status"), str)
              and (e.get("sha256") is None or _SHA256.fullmatch(str(e["sha256"])))
              and isinstance(e.get("files", []), list)
              and all(isinstance(f, str) and _relative(f) for f in e.get("files", [])))
        if not ok:
            raise bad("an input entry lacks a string key, status or list of files")
    for e in inputs:
        if not valid_top5(e.get("top5")):
            raise bad(f"the top5 of {e['key']} is not a list of classes with probabilities")
    for name in ("model", "weights", "preprocessing", "identity"):
        if not isinstance(manifest.get(name, ""), str):
            raise bad(f"{name} is not a string")
    for name in ("options", "selected"):
        if not isinstance(manifest.get(name, {}), dict):
            raise bad(f"{name} is not an object")
    if not all(isinstance(v, list) and all(isinstance(x, str) and _plain_name(x) for x in v)
               for v in manifest.get("selected", {}).values()):
        raise bad("selected is not lists of module names")
    size = manifest.get("input_size", [1, 1])
    if not (_ints(size) and len(size) == 2 and all(1 <= v <= _MAX_SIDE for v in size)):
        raise bad(f"input_size is not two integers from 1 to {_MAX_SIDE}")
    layers = manifest.get("layers", [])
    if not isinstance(layers, list) or not all(
            isinstance(r, dict) and isinstance(r.get("name"), str)
            and isinstance(r.get("params", 0), int | None)
            and all(r.get(k) is None or _ints(r[k])
                    for k in ("in_shape", "out_shape", "field", "jump")) for r in layers):
        raise bad("layers is not a list of named layers with integer shapes")
    files = manifest.get("files", [])  # a part without inputs (filters/) lists its files
    if not (isinstance(files, list) and all(isinstance(f, str) and _relative(f) for f in files)):
        raise bad("files is not a list of relative paths")
    modules = manifest.get("modules", [])
    if not (isinstance(modules, list) and all(isinstance(n, str) and _plain_name(n)
                                              for n in modules)):
        raise bad("modules is not a list of module names")
    return manifest


def valid_top5(top5: Any) -> bool:
    """None, or a list of classes with their probabilities (0 to 1), as `entry` records them."""
    return top5 is None or (isinstance(top5, list) and all(
        isinstance(t, dict) and isinstance(t.get("probability"), int | float)
        and 0 <= t["probability"] <= 1  # also no NaN, and no int too large for a float
        and isinstance(t.get("class", ""), str) for t in top5))


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                           for v in value)


def _plain_name(name: str) -> bool:
    # module names become file names (topk/<module>.safetensors, report pages)
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")


def _relative(key: str) -> bool:
    # A key or file names a path under OUT that convmaps may clear or link to: relative,
    # normalised and never outside it. Any other character is a legal file name (a backslash
    # is no separator on POSIX).
    parts = PurePosixPath(key).parts
    return (bool(parts) and not key.startswith("/") and ".." not in parts and "\0" not in key
            and PurePosixPath(key).as_posix() == key)


def read(folder: str | Path, name: str = MANIFEST) -> dict[str, Any] | None:
    """The checked manifest `name` in `folder`, or None when there is none.

    Raises:
        ConvmapsError: the file is there but unreadable or not a convmaps manifest.
    """
    from convmaps.io.store import open_regular

    path = Path(folder) / name
    try:
        with open_regular(path) as f:  # a FIFO in its place would block forever
            if os.fstat(f.fileno()).st_size > _MAX_BYTES:
                raise ConvmapsError(f"{path} is over {_MAX_BYTES >> 20} MB; not a convmaps "
                                    "manifest")
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ConvmapsError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise ConvmapsError(f"{path} is not a convmaps manifest (not valid JSON)") from e
    return _check(data, path)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The folder's `manifest.json`, checked; an error naming the folder when there is none."""
    manifest = read(folder)
    if manifest is None:
        raise ConvmapsError(f"{folder} has no manifest.json (not a convmaps output folder)")
    return manifest


def merge(folder: Path, header: dict[str, Any], count: int, order: Iterable[str],
          earlier: list[dict[str, Any]], name: str = MANIFEST) -> dict[str, Any] | None:
    """Merge every shard's manifest into `name` once all `count` have finished; the
    shard files go. Returns the merged manifest, or None while a shard is still running.

    `earlier` are entries of a finished run with the same fingerprint (kept unless an image is
    redone); entries follow `order` (the run's image keys), then the rest by key.
    """
    names = [shard_manifest(i, count, name) for i in range(count)]
    parts = []
    for each in names:
        if not (folder / each).exists():  # not started yet, or merged a moment ago
            merged = not any((folder / n).exists() for n in names)
            return read(folder, name) if merged else None
        part = read(folder, each)  # unreadable: an error naming it, never a silent "not yet"
        if part is None:
            return None
        # a shard of another input set (a leftover of an earlier job) is never merged
        same = all(part.get(k) == header.get(k) for k in ("run", "inputs_id"))
        if not same or not part.get("finished"):
            return None
        parts.append(part)
    by_key = {e["key"]: e for e in earlier}
    by_key.update({e["key"]: e for part in parts for e in part["inputs"]})
    manifest = build(header, ordered(by_key, order))
    from convmaps.io.store import write_json

    write_json(folder / name, manifest)
    for each in names:
        (folder / each).unlink(missing_ok=True)
    return manifest


def ordered(by_key: dict[str, dict[str, Any]], order: Iterable[str]) -> list[dict[str, Any]]:
    """Entries in the run's input order, then those of earlier runs by key."""
    first = [k for k in order if k in by_key]
    seen = set(first)
    return [by_key[k] for k in first] + [by_key[k] for k in sorted(by_key) if k not in seen]
