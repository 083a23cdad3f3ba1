"""Ownership: an output folder belongs to one run configuration (its fingerprint).

The same configuration adds images and skips finished ones; another one is refused unless
`--overwrite`, which first removes convmaps' own files there (those its manifests list) and
nothing else. Nothing is written or removed through a symlink.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path, PurePosixPath
from typing import Any

from convmaps.errors import ConvmapsError
from convmaps.io import layout
from convmaps.io import manifest as manifests

__all__ = ["claim", "clear_folder", "hold", "listed_files", "owner", "release", "safe_folder"]

_RUN_LOCK = ".convmaps-run.{part}.{run}.lock"  # held (shared) by every process of one run


def _existing(out: Path, name: str = layout.MANIFEST) -> list[tuple[str, dict[str, Any]]]:
    """The manifests `name` in `out` (the merged one and any shard's), by file name."""
    if not out.is_dir():
        return []
    names = [name, *sorted(p.name for p in out.iterdir()
                           if layout.is_shard_manifest(p.name, of=name))]
    found = []
    for each in names:
        try:
            m = manifests.read(out, each)
        except ConvmapsError as e:
            raise ConvmapsError(f"{e}; convmaps will not replace it: choose another --out") from e
        if m is not None:
            found.append((each, m))
    return found


def claim(out: Path, fingerprint: str, resume: bool, *,
          remove: Callable[[Path, dict[str, Any]], None], what: str, shards: int = 1,
          name: str = layout.MANIFEST) -> list[dict[str, Any]]:
    """Make `out` this run's: returns the entries of earlier runs of the same configuration.

    Another configuration's dump there is refused, or with `--overwrite` (resume off) removed
    first, as is this configuration's own when not resuming — except under shards, whose
    siblings of the same configuration may be writing right now: their files are rewritten
    by their own shard, never removed by another."""
    found = _existing(out, name)
    other = [m for _, m in found if m["run"] != fingerprint]
    if other and resume:
        m = other[0]
        raise ConvmapsError(
            f"{out} holds {what} made with other options ({m.get('model')}, weights "
            f"{m.get('weights')}, run {m['run']}); add --overwrite to replace it, or choose "
            "another --out"
        )
    if not resume:
        for each, m in found:
            if shards > 1 and m["run"] == fingerprint:
                continue
            remove(out, m)  # the files its manifest lists, and nothing else
            (out / each).unlink(missing_ok=True)
        if shards == 1:
            return []
        found = [(n, m) for n, m in found if m["run"] == fingerprint]
    by_key: dict[str, dict[str, Any]] = {}
    for _, m in found:  # the merged manifest first, then shards' newer entries
        by_key.update({e["key"]: e for e in m["inputs"] if e["status"] != "pending"})
    return [by_key[k] for k in sorted(by_key)]


def listed_files(out: Path, fingerprint: str, name: str = layout.MANIFEST
                 ) -> dict[str, set[str]]:
    """The files this configuration's manifests in `out` list per image key (pending entries
    of a killed run included): the only files a redone image may lose besides temporary ones."""
    files: dict[str, set[str]] = {}
    for _, m in _existing(out, name):
        if m["run"] == fingerprint:
            for e in m["inputs"]:
                files.setdefault(e["key"], set()).update(e.get("files", []))
    return files


def owner(files: set[str]) -> Callable[[str], bool]:
    """Files a command may remove in an image folder: those it listed, and temporary files."""
    return lambda rel: rel in files or layout.is_temp(PurePosixPath(rel).name)


def safe_folder(out: Path, key: str) -> bool:
    """Whether no step from OUT down to OUT/key is a symlink (which could lead anywhere, so
    convmaps neither writes nor removes anything through it)."""
    path = out
    for part in PurePosixPath(key).parts:
        path = path / part
        if path.is_symlink():
            return False
    return True


def clear_folder(out: Path, key: str, keep: set[str], owned: Callable[[str], bool]) -> None:
    """Remove the files `owned` picks in the folder OUT/key, except `keep` (relative paths),
    then the folders that this left empty; a user's own files, and another command's, stay.
    Nothing is done through a symlink."""
    folder = out / key
    if not safe_folder(out, key) or not folder.is_dir():
        return
    emptied: set[str] = set()
    for root, dirs, names in os.walk(folder, topdown=False):  # never follows symlinks
        here = Path(root)
        for name in names:
            path = here / name
            rel = path.relative_to(folder).as_posix()
            if rel not in keep and owned(rel) and not path.is_symlink():
                path.unlink(missing_ok=True)
                emptied.add(root)
        if root in emptied or any(str(here / d) in emptied for d in dirs):
            with suppress(OSError):
                here.rmdir()  # only when empty
                emptied.add(root)


def hold(folder: Path, part: str, run: str) -> int:
    """Mark `folder` as being written by run `run` (for the part `part`: a dump, projections,
    a top-k) until `release`: a run of other options there meanwhile is refused in one line
    naming this one, while processes of this same run (shards, torchrun ranks) share it.
    Call it with `locked(folder)` held, before claiming. Returns the lock's descriptor."""
    import fcntl

    for path in sorted(folder.glob(_RUN_LOCK.format(part=part, run="*"))):
        if path.name == _RUN_LOCK.format(part=part, run=run) or not path.is_file() \
                or path.is_symlink():
            continue
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
            raise ConvmapsError(
                f"{folder} is being written by another convmaps run with other options "
                f"({holder}); wait for it to finish, or choose another --out") from None
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)  # a killed run's: nobody holds it
    path = folder / _RUN_LOCK.format(part=part, run=run)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    holder = f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv[:3])[:200]}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    return fd


def release(folder: Path, part: str, run: str, fd: int) -> None:
    """Let go of `hold`'s lock; the last process of the run removes its file."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no sibling holds it any more
        (folder / _RUN_LOCK.format(part=part, run=run)).unlink(missing_ok=True)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


def is_run_lock(name: str) -> bool:
    return name.startswith(".convmaps-run.") and name.endswith(".lock")
