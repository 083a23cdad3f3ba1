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
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from convmaps.errors import ConvmapsError
from convmaps.layout import MANIFEST, shard_manifest

__all__ = ["build", "entry", "merge", "ordered", "read", "read_manifest"]

_MAX_BYTES = 1 << 30  # a manifest of a million images is ~300 MB; refuse absurd files unread


def entry(key: str, source: str, sha: str | None, status: str, files: list[str],
          top5: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One image's manifest entry."""
    e: dict[str, Any] = {"key": key, "source": source, "sha256": sha, "status": status,
                         "files": files}
    if top5 is not None:
        e["top5"] = top5
    return e


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
              and isinstance(e.get("status"), str) and isinstance(e.get("source", ""), str)
              and isinstance(e.get("sha256"), str | None)
              and isinstance(e.get("files", []), list)
              and all(isinstance(f, str) for f in e.get("files", [])))
        if not ok:
            raise bad("an input entry lacks a string key, status or list of files")
    for name in ("model", "weights"):
        if not isinstance(manifest.get(name, ""), str):
            raise bad(f"{name} is not a string")
    return manifest


def _relative(key: str) -> bool:
    # A key names a folder under OUT that convmaps may clear: never outside it.
    parts = PurePosixPath(key).parts
    return bool(parts) and not key.startswith("/") and ".." not in parts and "\\" not in key


def read(folder: str | Path, name: str = MANIFEST) -> dict[str, Any] | None:
    """The checked manifest `name` in `folder`, or None when there is none.

    Raises:
        ConvmapsError: the file is there but unreadable or not a convmaps manifest.
    """
    path = Path(folder) / name
    try:
        if path.stat().st_size > _MAX_BYTES:
            raise ConvmapsError(f"{path} is over {_MAX_BYTES >> 20} MB; not a convmaps manifest")
        text = path.read_text(encoding="utf-8")
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
          earlier: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Merge every shard's manifest into `manifest.json` once all `count` have finished; the
    shard files go. Returns the merged manifest, or None while a shard is still running.

    `earlier` are entries of a finished run with the same fingerprint (kept unless an image is
    redone); entries follow `order` (the run's image keys), then the rest by key.
    """
    names = [shard_manifest(i, count) for i in range(count)]
    parts = []
    for name in names:
        try:
            part = read(folder, name)
        except ConvmapsError:
            part = None
        if part is None:  # not started yet, or merged a moment ago by another shard
            merged = not any((folder / n).exists() for n in names)
            return read(folder) if merged else None
        # a shard of another input set (a leftover of an earlier job) is never merged
        same = all(part.get(k) == header.get(k) for k in ("run", "inputs_id"))
        if not same or not part.get("finished"):
            return None
        parts.append(part)
    by_key = {e["key"]: e for e in earlier}
    by_key.update({e["key"]: e for part in parts for e in part["inputs"]})
    manifest = build(header, ordered(by_key, order))
    from convmaps.store import write_json

    write_json(folder / MANIFEST, manifest)
    for name in names:
        (folder / name).unlink(missing_ok=True)
    return manifest


def ordered(by_key: dict[str, dict[str, Any]], order: Iterable[str]) -> list[dict[str, Any]]:
    """Entries in the run's input order, then those of earlier runs by key."""
    first = [k for k in order if k in by_key]
    seen = set(first)
    return [by_key[k] for k in first] + [by_key[k] for k in sorted(by_key) if k not in seen]
