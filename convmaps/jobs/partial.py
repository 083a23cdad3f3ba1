"""What the aggregate jobs (`topk`, `invariance`) share: a result folder of their own under OUT
whose files are written once, by the shard that merges, from every shard's partial state.

A shard's state is a safetensors file (`layout.state_file`) holding the job's own tensors and
the manifest entries of the images it has seen, as tensors (40 bytes an image, whatever their
number: the header stays small). These helpers encode and check those entries, tell a finished
run's folder from an unfinished one, and clear the states once merged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from convmaps.errors import ConvmapsError
from convmaps.io import layout
from convmaps.io import manifest as manifests
from convmaps.io.images import sha256_file
from convmaps.io.store import png_complete, read_metadata, save_tensors
from convmaps.jobs.engine import Plan, Result

__all__ = ["closing", "dump_keys", "entry_tensors", "every_state", "finished", "load_state",
           "read_entries", "remove_states", "save_state"]

Entry = dict[str, Any]
S = TypeVar("S")


class _Finishing(Protocol):
    finished: bool


F = TypeVar("F", bound=_Finishing)


def every_state(plan: Plan, manifest: Entry, mine: F,
                load: Callable[[Plan, tuple[int, int]], F | None], verb: str) -> list[F] | None:
    """Every shard's state in shard order (this one's is `mine`) once all are finished; None
    while one is not (a shard of an earlier split merged the manifest first).

    Raises:
        ConvmapsError: no input is usable: nothing to `verb` ("rank").
    """
    index, count = plan.shard
    states = [mine if i == index else load(plan, (i, count)) for i in range(count)]
    done = [s for s in states if s is not None and s.finished]
    if len(done) < count:
        return None
    if not any(e["status"] == "ok" for e in manifest["inputs"]):
        raise ConvmapsError(
            f"no usable image among the {len(manifest['inputs'])} input(s): nothing to "
            f"{verb} (why each was skipped: {plan.folder / layout.MANIFEST})")
    return done


def save_state(plan: Plan, shard: tuple[int, int], tensors: dict[str, Tensor],
               meta: dict[str, str]) -> None:
    """A shard's state: `tensors` with its images' `entries` (`entry_tensors`), marked as this
    run's over these inputs."""
    save_tensors(plan.folder / layout.state_file(*shard), tensors,
                 {"run": plan.fingerprint, "inputs_id": plan.header["inputs_id"], **meta})


def load_state(plan: Plan, shard: tuple[int, int], what: str,
               parse: Callable[[dict[str, Tensor], dict[str, str]], S]) -> S | None:
    """`parse(tensors, metadata)` of a shard's saved state when it belongs to this run; None
    when there is none (or it is another run's leftover: claim removes it with --overwrite).

    Raises:
        ConvmapsError: the file is there but cannot be read, or `parse` finds it is not a
            state of this run's shapes (ValueError, KeyError, …): never a silent restart from
            zero. `what` names it ("top-k").
    """
    from safetensors import SafetensorError, safe_open

    path = plan.folder / layout.state_file(*shard)
    if not path.exists():
        return None
    meta = read_metadata(path)
    if meta is not None and (meta.get("run") != plan.fingerprint
                             or meta.get("inputs_id") != plan.header["inputs_id"]):
        return None
    try:
        if meta is None:
            raise ValueError("no safetensors header")
        with safe_open(str(path), "pt") as f:
            got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        return parse(got, meta)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ConvmapsError(f"{path} is not a readable {what} checkpoint of this run ({e}); "
                            "remove it, or run the same command with --overwrite") from None


def dump_keys(out: Path) -> set[str]:
    """The image folders of a dump in OUT (their PNGs are no inputs)."""
    try:
        m = manifests.read(out)
    except ConvmapsError:
        return set()
    return {e["key"] for e in m["inputs"]} if m else set()


def entry_tensors(entries: dict[int, Entry]) -> dict[str, Tensor]:
    """Manifest entries (by input index) as a state's tensors: `entries/index`,
    `entries/sha256` (n, 32) and `entries/skipped`, the skip reasons as JSON bytes."""
    index = sorted(entries)
    rows = [entries[i] for i in index]
    sha = torch.frombuffer(bytearray(b"".join(
        bytes.fromhex(e["sha256"] or "0" * 64) for e in rows)), dtype=torch.uint8
    ).reshape(len(rows), 32) if rows else torch.zeros(0, 32, dtype=torch.uint8)
    reasons = {str(i): e["status"] for i, e in zip(index, rows, strict=True) if e["status"] != "ok"}
    return {"entries/index": torch.tensor(index, dtype=torch.int64), "entries/sha256": sha,
            "entries/skipped": torch.frombuffer(bytearray(json.dumps(reasons).encode()),
                                                dtype=torch.uint8)}


def read_entries(plan: Plan, got: dict[str, Tensor]) -> dict[int, Entry]:
    """The manifest entries a state's tensors stand for (`entry_tensors`' inverse).

    Raises:
        ValueError, KeyError: tensors of the wrong shapes or contents.
    """
    index, sha = got["entries/index"], got["entries/sha256"]
    skipped = json.loads(bytes(got["entries/skipped"].tolist()).decode())
    if index.dim() != 1 or tuple(sha.shape) != (len(index), 32) or sha.dtype != torch.uint8:
        raise ValueError("entries of the wrong shapes")
    if not isinstance(skipped, dict) or not all(isinstance(v, str) for v in skipped.values()):
        raise ValueError("skip reasons are not a JSON object of strings")
    found = {}
    digests = sha.numpy().tobytes()
    for row, i in enumerate(index.tolist()):
        if not 0 <= i < len(plan.sources):
            raise ValueError(f"entry {i} is outside the {len(plan.sources)} inputs")
        src = plan.sources[i]
        status = skipped.get(str(i), "ok")
        digest = digests[32 * row:32 * row + 32].hex() if status == "ok" else None
        found[i] = manifests.entry(src.key, str(src.path), digest, status, [])
    return found


def finished(plan: Plan, files: list[str]) -> Entry | None:
    """The manifest of an identical finished run whose `files` are all whole (PNGs complete,
    safetensors of this run), else None."""
    try:
        m = manifests.read(plan.folder)
    except ConvmapsError:
        return None
    if m is None or not m.get("finished") or any(
            m.get(k) != plan.header[k] for k in ("run", "inputs_id")):
        return None
    for f in files:
        path = plan.folder / f
        if f.endswith(".png") and not png_complete(path):
            return None
        if f.endswith(".safetensors") and (read_metadata(path) or {}).get("run") != \
                plan.fingerprint:
            return None
    # an input whose bytes changed since it was seen (or became unreadable) redoes the run, as
    # it redoes its image in a dump: the result is over every image at once
    for src, e in zip(plan.sources, m["inputs"], strict=False):
        if e["key"] != src.key or (e["status"] == "ok") != (_sha(src.path) == e["sha256"]):
            return None
    return m


def _sha(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except (OSError, ConvmapsError):
        return None


def remove_states(folder: Path) -> None:
    """Every shard state under `folder` (any split's: all merged now), and their folder."""
    partial = folder / layout.state_file(0, 1)
    for path in partial.parent.glob("shard-*-of-*.safetensors"):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
    with suppress(OSError):
        partial.parent.rmdir()


def closing(plan: Plan, result: Result, made: str, verb: str) -> str:
    """An aggregate run's closing line: what the merge `made`, or what this shard did (`verb`:
    "ranked") while another is still to finish."""
    if result.merged and result.manifest.get("finished"):
        return (f"{plan.label}{made} over {len(plan.sources) - len(result.skipped)} image(s) in "
                f"{plan.folder}")
    return (f"{plan.label}{len(plan.mine)} image(s) {verb}; the last shard to finish writes "
            f"{plan.folder}")
