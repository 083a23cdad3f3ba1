"""The engine every job runs on: plan -> claim OUT -> loader -> the job's per-batch step ->
writer threads -> manifest entries -> shard merge under a lock -> a result the CLI prints.

A job (`dump`, `topk`, `project`) supplies only what is its own: which modules or units it
needs, what it computes per batch, what it writes per image, and (topk) what it writes once
every shard is done. Everything else, and every rule of an output folder, lives here once:
its ownership (`jobs.ownership`), devices, threads and shards (`jobs.runtime`), inputs,
decoding, resume, the size bound, progress and the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from functools import partial
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from rich.filesize import decimal

from convmaps import __version__
from convmaps.core.capture import LayerRow, Trace
from convmaps.core.fields import Field
from convmaps.core.models import LoadedModel, bundled_lenet_path
from convmaps.errors import BadImageError, ConvmapsError, TooLargeError
from convmaps.io import layout
from convmaps.io import manifest as manifests
from convmaps.io.images import (
    MAX_PIXELS,
    ImageSource,
    decode_and_hash,
    find_images,
    sha256_file,
)
from convmaps.io.store import fsync_dir, locked, parse_bytes, symlink_under, write_json
from convmaps.jobs.ownership import (
    claim,
    clear_folder,
    hold,
    listed_files,
    owner,
    release,
    safe_folder,
)
from convmaps.jobs.runtime import (
    batches,
    default_workers,
    memory_format,
    resolve_device,
    resolve_shard,
    threads,
)

__all__ = ["DecodedImages", "Job", "Plan", "Result", "bundled_samples", "check_bounds",
           "check_network", "check_room", "collate", "find_sources", "identity",
           "image_loader", "inputs_id", "layer_rows", "model_identity", "per_image",
           "plain_entry", "plan_job", "run_job", "to_host"]


def bundled_samples() -> Path:
    return Path(str(resources.files("convmaps") / "data" / "samples"))


def check_bounds(o: object, bounds: Iterable[tuple[str, int]]) -> None:
    """Each option `name` of `o` that is set is at least `low` (for options that come from a
    config or Python rather than the CLI, which checks its own)."""
    for name, low in bounds:
        if getattr(o, name) is not None and getattr(o, name) < low:
            raise ConvmapsError(f"{name} must be at least {low}, not {getattr(o, name)}")


def model_identity(loaded: LoadedModel) -> dict[str, Any]:
    """What a run's fingerprint knows of its model: version, architecture, weights (a
    checkpoint's contents, not just its path: new weights in the same file redo the work) and
    preprocessing."""
    weights_file = bundled_lenet_path() if loaded.weights == "bundled" else Path(loaded.weights)
    return {
        "convmaps": __version__, "arch": loaded.arch, "weights": loaded.weights,
        "weights_sha256": sha256_file(weights_file) if weights_file.is_file() else None,
        "preprocess": repr(loaded.preprocess),
    }


def inputs_id(sources: list[ImageSource]) -> str:
    """A short hash of which inputs a run was given (keys and paths, in order)."""
    keys = "\n".join(f"{s.key}\t{s.path}" for s in sources)
    return hashlib.sha256(keys.encode()).hexdigest()[:16]


def layer_rows(table: list[LayerRow], fields: dict[str, Field]) -> list[dict[str, Any]]:
    """The layer table as a manifest records it, with each module's receptive field (its size
    in input pixels) and jump; the jump is None for 1-D outputs, which see the whole input."""
    rows = []
    for r in table:
        f = fields.get(r.name)
        rows.append({"index": r.index, "name": r.name, "type": r.type,
                     "in_shape": list(r.in_shape) if r.in_shape else None,
                     "out_shape": list(r.out_shape) if r.out_shape else None,
                     "params": r.params, "field": list(f.size) if f else None,
                     "jump": list(f.jump) if f and f.dims is not None else None})
    return rows


def identity(loaded: LoadedModel) -> str:
    """A short hash of `model_identity`: which network made a folder's projections."""
    return hashlib.sha256(json.dumps(model_identity(loaded), sort_keys=True).encode()
                          ).hexdigest()[:16]


def find_sources(inputs: list[str], arch: str, out: Path, ours: set[str]
                 ) -> tuple[list[ImageSource], dict[int, str]]:
    """The images under `inputs` (the bundled samples for lenet when none), without convmaps'
    own outputs in the folders of `ours` (image keys) under `out`; and those refused before
    decoding (their output folder would clash with another output), with the reason."""
    inputs = list(inputs)
    if not inputs:
        if arch != "lenet":
            raise ConvmapsError("give INPUT images or folders (only lenet has bundled samples)")
        inputs = [str(bundled_samples())]
    root = out.resolve()
    found = find_images(inputs)

    def own_output(src: ImageSource) -> bool:
        # Images under OUT are inputs like any other, except the files convmaps wrote there.
        path = Path(os.path.realpath(src.path))  # resolve() raises on a symlink loop
        if not path.is_relative_to(root):
            return False
        rel = PurePosixPath(path.relative_to(root).as_posix())
        if rel.parts[0] in layout.RESERVED or layout.is_temp(rel.parts[0]):
            return True
        return any("/".join(rel.parts[:i]) in ours
                   and layout.is_image_output("/".join(rel.parts[i:]))
                   for i in range(1, len(rel.parts)))

    sources = [s for s in found if not own_output(s)]
    if not sources:
        raise ConvmapsError(f"no images found in {', '.join(inputs)}")
    keys = {s.key for s in sources}
    skips = {}
    for i, s in enumerate(sources):
        reason = layout.collision(s.key, keys)
        target = out / s.key
        if reason is None and not safe_folder(out, s.key):
            reason = f"the way to its output folder {target} goes through a symlink"
        elif reason is None and (link := symlink_under(target)) is not None:
            reason = f"{link} is a symlink, and convmaps writes nothing through one"
        elif reason is None and target.exists() and not target.is_dir():
            reason = f"its output folder would replace the file {target}"
        if reason is not None:
            skips[i] = f"output clash: {reason}"
    return sources, skips


def check_room(need: int, what: str, max_bytes: str, out: Path, hint: str) -> None:
    """Refuse a run that would write `need` bytes (`what` says of what) over `max_bytes`, or
    more than the disk under `out` has free; `hint` says what else makes it smaller."""
    limit = parse_bytes(max_bytes)
    if need > limit:
        raise TooLargeError(
            f"this run would write up to {decimal(need)} ({what}), over --max-bytes "
            f"{decimal(limit)}; raise --max-bytes, {hint}"
        )
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise TooLargeError(
            f"this run would write up to {decimal(need)} ({what}) but {probe} has only "
            f"{decimal(free)} free"
        )


class DecodedImages(torch.utils.data.Dataset[dict[str, Any]]):
    """Decode + preprocess in DataLoader workers; a broken image becomes a reason, not a crash."""

    def __init__(self, sources: list[ImageSource], preprocess: Callable[[Any], torch.Tensor],
                 skips: dict[int, str]):
        self.sources = sources
        self.preprocess = preprocess
        self.skips = skips

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, Any]:
        src = self.sources[i]
        if i in self.skips:
            return {"index": i, "sha256": None, "tensor": None, "reason": self.skips[i]}
        try:
            image, sha = decode_and_hash(src.path)  # one read; FIFOs and devices refused
            _check_resized(image.size, self.preprocess)
            tensor = self.preprocess(image)
            return {"index": i, "sha256": sha, "tensor": tensor, "reason": None}
        except (BadImageError, OSError) as e:
            reason = str(e) if isinstance(e, BadImageError) else f"unreadable: {e.strerror or e}"
            return {"index": i, "sha256": None, "tensor": None, "reason": reason}


def image_loader(images: DecodedImages, batches: list[list[int]], workers: int | None,
                 device: torch.device) -> torch.utils.data.DataLoader[Any]:
    """The `batches` (lists of indices) of `images`, decoded in `workers` processes (default:
    `default_workers()`): each batch `(items, tensor)`, see `collate`. For a GPU the loader's
    thread pins that one tensor, so the copy to the device is asynchronous."""
    return torch.utils.data.DataLoader(
        images, batch_sampler=batches, collate_fn=collate,
        num_workers=default_workers() if workers is None else workers,
        pin_memory=device.type == "cuda",
    )


def collate(items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
    """A batch as the engine takes it: the items, each decoded one's `tensor` replaced by its
    row in one stacked tensor (None where it was skipped), and that tensor (None when no item
    decoded). Stacked here, in the decoding process, not after pinning: `torch.stack` of
    pinned tensors makes an unpinned one, and its copy to a GPU would wait."""
    good = [it["tensor"] for it in items if it["tensor"] is not None]
    rows = iter(range(len(good)))
    items = [{**it, "tensor": None if it["tensor"] is None else next(rows)} for it in items]
    return items, torch.stack(good) if good else None


def _check_resized(size: tuple[int, int], preprocess: Callable[[Any], torch.Tensor]) -> None:
    """ImageNet presets resize the short side first: a 20000x2 strip would become 2.5M x 256
    pixels. Refuse what would pass the decoder's pixel limit only before resizing."""
    short = getattr(preprocess, "resize_size", None)
    if not short:
        return
    w, h = size
    resized = short[0] * short[0] * max(w, h) / max(1, min(w, h))
    if resized > MAX_PIXELS:
        raise BadImageError(f"too large once resized: {w} x {h} pixels (aspect ratio) would "
                            f"become {resized:,.0f} pixels > limit of {MAX_PIXELS:,}")




# --- the engine ------------------------------------------------------------------------------

Entry = dict[str, Any]


class Job:
    """What a command adds to the engine. Subclasses set the class attributes and override
    the hooks they need; the defaults are those of a job that writes nothing per image."""

    name = "job"  # the command, in progress lines
    what = "a job's output"  # in refusals: "OUT holds {what} made with other options"
    manifest = layout.MANIFEST  # the manifest's name in `folder()`
    bounds: tuple[tuple[str, int], ...] = ()  # options' lower bounds besides the common ones

    def folder(self, out: Path) -> Path:
        """Where the job's manifest (and, for topk, its files) lives."""
        return out

    def prepare(self, o: Any, loaded: LoadedModel, table: list[LayerRow],
                fields: dict[str, Field], traced: Trace) -> None:
        """Resolve what the options name (modules, units) against the model, before any
        input is looked at. `traced`: every module's inputs and outputs for one image, on
        the meta device (shapes only), from the plan's one pass."""

    def fingerprint(self) -> dict[str, Any]:
        """What besides the model changes the bytes of the job's outputs."""
        return {}

    def header(self) -> dict[str, Any]:
        """The job's part of the manifest's run description."""
        return {}

    def files(self, plan: Plan, key: str) -> list[str]:
        """The files image `key`'s folder gets (its pending entry lists them)."""
        return []

    def remove(self, folder: Path, m: Entry) -> None:
        """Remove the files manifest `m` lists (claiming with --overwrite)."""

    def neighbours(self, out: Path, loaded: LoadedModel, resume: bool) -> None:
        """Refuse (or with --overwrite remove) parts of OUT that cannot stand beside this."""

    def ours(self, out: Path, earlier: list[Entry]) -> set[str]:
        """Image keys under OUT whose folders hold convmaps' outputs (never inputs)."""
        return {e["key"] for e in earlier}

    def resume(self, plan: Plan) -> dict[int, Entry]:
        """Entries of this shard's images whose outputs are already complete."""
        return {}

    def done(self, plan: Plan) -> Entry | None:
        """The manifest of an identical finished run (nothing left to do), else None."""
        return None

    def bytes(self, plan: Plan) -> tuple[int, str, str]:
        """An upper bound of what the run writes, what it is, and how to make it smaller."""
        return 0, "", ""

    def start(self, plan: Plan, model: torch.nn.Module, device: torch.device) -> None:
        """Called once before the first batch, with the model on its device."""

    def step(self, plan: Plan, batch: torch.Tensor | None, items: list[Entry]) -> Any:
        """The batch's computation on the device (main thread; `batch` holds the decoded
        items, None when none decoded); returns what `write` needs."""
        return None

    def write(self, plan: Plan, items: list[Entry], stepped: Any) -> list[tuple[int, Entry]]:
        """The batch's files (on a writer thread); returns its manifest entries."""
        return [(it["index"], plain_entry(plan, it)) for it in items]

    def end(self, plan: Plan) -> None:
        """Called after this shard's last batch is written."""

    def finish(self, plan: Plan, manifest: Entry) -> None:
        """Once every shard is done (under the lock, by the one that merged)."""

    def describe(self, plan: Plan) -> str:
        """What the run will do, one line."""
        return ""

    def closing(self, plan: Plan, result: Result) -> str:
        """What the run did, one line."""
        return (f"{plan.label}{result.written} image(s) written, {result.already} already "
                f"done, {len(result.skipped)} skipped; manifest: {result.path}")


class ListedJob(Job):
    """A job that writes files into image folders beside a dump and lists its images in its
    own manifest (occlude, explain): it stands only beside a dump of the same network, removes
    only the files `owns` claims, and resumes an image whose files `finished` accepts."""

    model: torch.nn.Module

    def owns(self, rel: str) -> bool:
        """Whether a path inside an image folder is one this job writes there."""
        return False

    def finished(self, plan: Plan, i: int) -> Entry | None:
        """Image i's entry when its files are complete and this run's, else None."""
        return None

    def remove(self, folder: Path, m: Entry) -> None:
        remove_listed(folder, m, self.owns, self.manifest)

    def settle(self, plan: Plan, key: str, previous: set[str]) -> list[str]:
        """After image `key`'s files are written: remove those of `previous` (what the
        manifests listed there) this run no longer writes; returns the files it has."""
        files = self.files(plan, key)
        clear_folder(plan.out, key, set(files), owner(previous))
        return sorted(f for f in files if (plan.out / key / f).is_file())

    def neighbours(self, out: Path, loaded: LoadedModel, resume: bool) -> None:
        check_network(out, loaded, self.what, own=[(".", self.manifest)])

    def ours(self, out: Path, earlier: list[Entry]) -> set[str]:
        lists = [manifests.read(out, name) for name in _IMAGE_LISTS if name != self.manifest]
        return {e["key"] for e in earlier} | {e["key"] for m in lists
                                              for e in (m or {}).get("inputs", [])}

    def resume(self, plan: Plan) -> dict[int, Entry]:
        return {i: e for i in plan.mine if i not in plan.skips
                and (e := self.finished(plan, i)) is not None}

    def start(self, plan: Plan, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model

    def describe(self, plan: Plan) -> str:
        return (f"{plan.label}{plan.loaded.arch} ({plan.loaded.weights}) · {len(plan.mine)} "
                f"input(s), {len(plan.finished)} already done · {self.doing(plan)}")

    def doing(self, plan: Plan) -> str:
        """What the run does to each image, for `describe`."""
        return ""

    def closing(self, plan: Plan, result: Result) -> str:
        return (f"{plan.label}{self.what}: {result.written} image(s) written, "
                f"{result.already} already done, {len(result.skipped)} skipped; list: "
                f"{result.path}")


# The manifests that list image folders of OUT.
_IMAGE_LISTS = (layout.MANIFEST, layout.PROJECTIONS_MANIFEST, layout.OCCLUSION_MANIFEST,
                layout.EXPLAIN_MANIFEST)


@dataclass
class Plan:
    """What a run will do, decided before any image is decoded."""

    options: Any
    job: Job
    loaded: LoadedModel
    sources: list[ImageSource]
    skips: dict[int, str]  # sources refused before decoding, with the reason
    folder: Path  # where the job's manifest lives
    fingerprint: str
    header: dict[str, Any]  # the manifest's run description (everything but the entries)
    reprs: dict[str, str]  # module name -> repr, taken once before any forward pass
    table: list[LayerRow]
    shard: tuple[int, int] = (0, 1)  # (index, count)
    batches: list[list[int]] = field(default_factory=list)  # this shard's, at fixed positions
    earlier: list[Entry] = field(default_factory=list)  # entries of earlier runs
    listed: dict[str, set[str]] = field(default_factory=dict)  # files manifests listed, by key
    finished: dict[int, Entry] = field(default_factory=dict)  # complete before this run
    done: Entry | None = None  # the manifest of an identical finished run
    lock: Any = None  # this run's hold on its part of OUT, released when the run ends
    device: torch.device = torch.device("cpu")  # where the run computes (resolve_device)
    # reports a later phase's progress: (phase, done, total), e.g. topk's projections
    on_phase: Callable[[str, int, int], None] | None = None

    @property
    def out(self) -> Path:
        return Path(self.options.out)

    @property
    def complete(self) -> set[int]:
        return set(self.finished)

    @property
    def mine(self) -> list[int]:
        """Indices of the sources this process (shard) is responsible for."""
        return [i for b in self.batches for i in b]

    @property
    def pending(self) -> int:
        """Images this process will write (not finished, not refused)."""
        return sum(1 for i in self.mine if i not in self.finished and i not in self.skips)

    @property
    def label(self) -> str:
        index, count = self.shard
        return f"shard {index}/{count}: " if count > 1 else ""


@dataclass
class Result:
    """What a run did, for the CLI's closing line."""

    manifest: Entry
    path: Path  # the manifest file that lists this process's entries
    written: int
    already: int
    skipped: list[Entry]
    merged: bool  # whether `path` is the merged manifest of every shard


def per_image(plan: Plan, items: list[Entry], write_one: Callable[[int, Entry], Entry]
              ) -> list[tuple[int, Entry]]:
    """A batch's manifest entries, for a job that writes files per image: a skipped item's
    (its old files go, except after a clash, which is never ours to clear), a finished
    image's own (it ran again only for its neighbours' sake), and `write_one(row, item)` for
    every other decoded one (`row`: its row in the batch)."""
    done = []
    for it in items:
        if it["tensor"] is None:
            key = plan.sources[it["index"]].key
            if it["index"] not in plan.skips:  # an image that became unreadable loses them
                clear_folder(plan.out, key, set(), owner(plan.listed.get(key, set())))
            done.append((it["index"], plain_entry(plan, it)))
    good = [it for it in items if it["tensor"] is not None]
    for row, it in enumerate(good):
        i = it["index"]
        done.append((i, plan.finished[i] if i in plan.finished else write_one(row, it)))
    return done


def same_bytes(source: ImageSource, sha: object) -> bool:
    """Whether the input still holds the bytes whose sha256 an output records (an unreadable
    input: no, so its image is redone and recorded as skipped)."""
    try:
        return sha == sha256_file(source.path)
    except BadImageError:
        return False


# Every part of OUT, by its manifest: (folder under OUT, manifest name, what it holds).
_PARTS = ((".", layout.MANIFEST, "a dump"), (".", layout.PROJECTIONS_MANIFEST, "projections"),
          (".", layout.OCCLUSION_MANIFEST, "occlusion maps"),
          (".", layout.EXPLAIN_MANIFEST, "explain trees"),
          (layout.TOPK, layout.MANIFEST, "a top-k"),
          (layout.INVARIANCE, layout.MANIFEST, "invariance curves"),
          (layout.FILTERS, layout.MANIFEST, "filters"))


def check_network(out: Path, loaded: LoadedModel, what: str,
                  own: Iterable[tuple[str, str]] = ()) -> None:
    """Refuse a part of OUT (`what`) of another network than any other part there (`own`: the
    parts, as (folder, manifest), that the caller checks itself): a dump's maps and the
    projections, occlusion maps, trees, top-k, curves and filters beside them must all come
    from one network, or the report would show one network's maps under another's."""
    mine, skip = identity(loaded), set(own)
    for folder, name, part in _PARTS:
        if (folder, name) in skip or not (out / folder).is_dir():
            continue
        try:
            m = manifests.read(out / folder, name)
        except ConvmapsError as e:
            raise ConvmapsError(f"{e}; convmaps will not replace it: choose another --out") from e
        if m is not None and m.get("identity", mine) != mine:
            raise ConvmapsError(
                f"{out} holds {part} of {m.get('model')} (weights {m.get('weights')}); {what} "
                f"of {loaded.arch} ({loaded.weights}) would not match: choose another --out"
            )


def plain_entry(plan: Plan, item: Entry, files: list[str] | None = None,
                top5: list[dict[str, Any]] | None = None) -> Entry:
    """An image's manifest entry: skipped with its reason, or ok with `files`."""
    src = plan.sources[item["index"]]
    if item["tensor"] is None:
        return manifests.entry(src.key, str(src.path), None, f"skipped: {item['reason']}", [])
    return manifests.entry(src.key, str(src.path), item["sha256"], "ok", files or [], top5)


def remove_listed(out: Path, m: Entry, mine: Callable[[str], bool], manifest: str
                  ) -> None:
    """Remove the files of a job's manifest `m` in OUT (those `mine` says the job writes),
    then the manifest `manifest` itself (claiming with --overwrite)."""
    for e in m["inputs"]:
        clear_folder(out, e["key"], set(), owner({f for f in e["files"] if mine(f)}))
    (out / manifest).unlink(missing_ok=True)


_RUNTIME = frozenset({"resume", "workers", "threads", "device", "out", "config", "shard",
                      "inputs", "checkpoint_seconds", "strict"})


def plan_job(o: Any, job: Job) -> Plan:
    """Load the model, resolve what the job needs, claim its folder, find inputs and finished
    work and check the size, all before any image is decoded."""
    from convmaps.core.capture import layer_table
    from convmaps.core.fields import survey
    from convmaps.core.models import load_model

    check_bounds(o, (("batch_size", 1), ("workers", 0), ("threads", 1), *job.bounds))
    if hasattr(o, "max_bytes"):
        parse_bytes(o.max_bytes)
    device = resolve_device(o.device)
    loaded = load_model(o.model, o.weights, o.arch)
    input_shape = (loaded.in_channels, *loaded.input_size)
    # one pass on the meta device: every module's shapes, and the receptive fields
    traced, found = survey(loaded.model, input_shape)
    table = layer_table(loaded.model, input_shape, traced)
    job.prepare(o, loaded, table, found, traced)
    what = {**model_identity(loaded), **job.fingerprint()}
    fingerprint = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(o.out)
    folder = job.folder(out)
    if folder != out and (link := symlink_under(folder)) is not None:
        raise ConvmapsError(f"{_quoted(link)} is a symlink: convmaps writes nothing through one "
                            "inside OUT; remove it or choose another --out")
    shard = resolve_shard(o.shard)
    part = job.manifest.removesuffix(".json")
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    with locked(folder):
        lock = _RunLock(folder, part, fingerprint, hold(folder, part, fingerprint))
    try:
        plan = _plan(o, job, loaded, table, found, fingerprint, folder, shard)
    except BaseException:
        lock.release()
        for p in made:  # a refused run leaves no empty folder behind
            with suppress(OSError):
                p.rmdir()
        raise
    plan.lock = lock
    plan.device = device
    weakref.finalize(plan, lock.release)  # a plan that is never run lets go when it goes
    return plan


def _replace(job: Job, out: Path, folder: Path, m: Entry) -> None:
    """Remove an older part of OUT (--overwrite), and the report that showed it."""
    from convmaps.report import remove_report

    job.remove(folder, m)
    remove_report(out)


@dataclass
class _RunLock:
    """This run's hold on its part of OUT (see `ownership.hold`), released once."""

    folder: Path
    part: str
    run: str
    fd: int | None

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            release(self.folder, self.part, self.run, fd)


def _quoted(path: Path) -> str:
    """A path as an error line shows it: quoted when it holds a newline or other odd
    characters, so the message stays one line."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _plan(o: Any, job: Job, loaded: LoadedModel, table: list[LayerRow],
          found: dict[str, Field], fingerprint: str, folder: Path, shard: tuple[int, int]
          ) -> Plan:
    out = Path(o.out)
    previous = listed_files(folder, fingerprint, job.manifest)
    earlier = claim(folder, fingerprint, o.resume, remove=partial(_replace, job, out),
                    what=job.what, shards=shard[1], name=job.manifest)
    job.neighbours(out, loaded, o.resume)
    sources, skips = find_sources(o.inputs, loaded.arch, out, job.ours(out, earlier))
    options = {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in asdict(o).items()
               if k not in _RUNTIME}
    header = {
        "convmaps": __version__, "model": loaded.arch, "weights": loaded.weights,
        "preprocessing": repr(loaded.preprocess), "input_size": list(loaded.input_size),
        "options": options, "run": fingerprint,
        "identity": identity(loaded),  # the network alone: every part of OUT must match
        # which inputs this run was given: a leftover shard manifest of another input set is
        # never merged with this run's
        "inputs_id": inputs_id(sources), "layers": layer_rows(table, found), **job.header(),
    }
    # Taken once, before any forward pass: capture switches `inplace` off during a pass, and a
    # repr read by a writer thread meanwhile would say ReLU() instead of ReLU(inplace=True).
    reprs = {name: repr(m) for name, m in loaded.model.named_modules() if name}
    plan = Plan(o, job, loaded, sources, skips, folder, fingerprint, header, reprs, table,
                shard=shard, earlier=earlier, listed=previous)
    plan.batches = batches(len(sources), o.batch_size, shard)
    if o.resume:
        plan.done = job.done(plan)
        mine = set(plan.mine)
        plan.finished = job.resume(plan) if plan.done is None else {
            i: e for i, e in enumerate(plan.done["inputs"]) if i in mine}
    if plan.done is None:
        need, what_, hint = job.bytes(plan)
        if hasattr(o, "max_bytes"):
            check_room(need, what_, o.max_bytes, folder, hint)
    return plan


def run_job(plan: Plan, on_progress: Callable[[int], None] | None = None,
            on_phase: Callable[[str, int, int], None] | None = None) -> Result:
    """Run the planned job; returns what it did (its manifest is in OUT: this shard's until
    the last shard to finish merges them).

    The plan's model is moved to the device (channels-last on the CPU) and left there.
    Decoding runs in DataLoader workers, the job's step in this thread, and writing on
    `writer_threads()` threads with at most two batches in flight, so memory stays bounded
    when the disk is slower than the model. `on_progress(n)` is called as each batch's
    files are written, with its count of images not done before (`plan.finished`);
    `on_phase(phase, done, total)` as a later phase goes (topk's projections and figures)."""
    plan.on_phase = on_phase
    try:
        return _run(plan, on_progress)
    finally:
        if plan.lock is not None:
            plan.lock.release()


def _run(plan: Plan, on_progress: Callable[[int], None] | None) -> Result:
    o, job = plan.options, plan.job
    if plan.done is not None:
        return _result(plan, plan.done, plan.folder / job.manifest, True)
    if plan.pending:  # OUT is about to change: a report built before would not show it
        from convmaps.report import remove_report

        remove_report(plan.out)
    device = plan.device
    memory = memory_format(device)
    model = plan.loaded.model.to(device).to(memory_format=memory)
    entries: dict[int, Entry] = dict(plan.finished)
    _write_manifest(plan, entries, pending=True)  # claims OUT before the first file
    todo = [b for b in plan.batches if not set(b) <= plan.complete]
    loader = image_loader(DecodedImages(plan.sources, plan.loaded.preprocess, plan.skips), todo,
                          o.workers, device)
    in_flight: deque[tuple[Future[list[tuple[int, Entry]]], int]] = deque()

    def settle(limit: int) -> None:
        while len(in_flight) > limit:
            future, n = in_flight.popleft()
            entries.update(future.result())
            if on_progress:
                on_progress(n)

    with threads(o.threads), \
            ThreadPoolExecutor(writer_threads(), thread_name_prefix="convmaps-writer") as writer:
        job.start(plan, model, device)
        try:
            for items, batch in loader:
                if batch is not None:
                    batch = batch.to(device, non_blocking=True, memory_format=memory)
                stepped = to_host(job.step(plan, batch, items))
                fresh = sum(1 for it in items if it["index"] not in plan.finished)
                in_flight.append((writer.submit(job.write, plan, items, stepped), fresh))
                settle(2)
            settle(0)
        finally:
            for future, _ in in_flight:
                future.cancel()
        job.end(plan)
    return _finish(plan, entries)


host_copies = 0  # device -> host transfers of batch results so far (to_host counts them)


def to_host(tree: Any) -> Any:
    """`tree` (tuples, lists, dicts, dataclasses of tensors and other values) with every
    tensor on the host, brought there in one transfer: the engine's one place where a batch's
    results leave the device (a copy per tensor would wait on the device once each). On the
    CPU nothing is copied."""
    global host_copies
    leaves: list[torch.Tensor] = []
    _walk(tree, leaves.append)
    if not leaves:
        return tree
    host_copies += 1
    if all(t.device.type == "cpu" for t in leaves):
        return tree
    raw = [t.detach().contiguous().view(-1).view(torch.uint8) for t in leaves]
    host = torch.cat(raw).cpu()
    parts = iter(host.split([r.numel() for r in raw]))
    return _walk(tree, lambda t: next(parts).view(t.dtype).view(t.shape))


def _walk(tree: Any, visit: Callable[[torch.Tensor], Any]) -> Any:
    """`tree` rebuilt with `visit(t)` in place of every tensor t (in a fixed order)."""
    if isinstance(tree, torch.Tensor):
        return visit(tree)
    if isinstance(tree, dict):
        return {k: _walk(v, visit) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_walk(v, visit) for v in tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(tree, **{f.name: _walk(getattr(tree, f.name), visit)
                                            for f in dataclasses.fields(tree) if f.init})
    return tree


def writer_threads() -> int:
    """Threads that write a job's files: two where two cores are usable. Drawing a PNG
    holds the GIL only part of the time (deflating, numpy's passes and file writes release
    it), so a second writer overlaps one image's drawing with another's; on 2 cores a dump
    of every AlexNet module with PNGs took 25-30% less time with two (no PNG: the same).
    Batches in flight stay at two whatever the count, so memory does not grow with it."""
    from convmaps.jobs.runtime import usable_cores

    return 2 if usable_cores() >= 2 else 1


def _write_manifest(plan: Plan, entries: dict[int, Entry], pending: bool) -> Entry:
    """This process's manifest: every image it knows of, in input order (with `pending`, the
    images still to do are listed with the files they will get)."""
    by_key = {e["key"]: e for e in plan.earlier}
    if plan.shard[1] > 1:  # each shard lists its own images; the merge adds the earlier ones
        by_key = {}
    files = partial(plan.job.files, plan)
    by_key.update(manifests.by_key(plan.sources, plan.mine, entries, files if pending else None))
    m = manifests.build(plan.header, manifests.ordered(by_key, (s.key for s in plan.sources)))
    write_json(plan.folder / layout.shard_manifest(*plan.shard, plan.job.manifest), m)
    return m


def _finish(plan: Plan, entries: dict[int, Entry]) -> Result:
    """Write this process's final manifest; with shards (`--shard` or torchrun), the last one
    to finish merges them all, under a lock so that two finishing together merge once. No
    shard ever waits for another to run."""
    name = plan.job.manifest
    manifest = _write_manifest(plan, entries, pending=False)
    index, count = plan.shard
    path = plan.folder / layout.shard_manifest(index, count, name)
    merged = count == 1
    with locked(plan.folder):
        if count > 1:
            both = manifests.merge(plan.folder, plan.header, count,
                                   (s.key for s in plan.sources), plan.earlier, name)
            if both is not None and both.get("run") == plan.fingerprint:
                merged, manifest, path = True, both, plan.folder / name
                for p in plan.folder.iterdir():  # shard manifests of an earlier split
                    if layout.is_shard_manifest(p.name, of=name):
                        p.unlink(missing_ok=True)
        if merged:
            plan.job.finish(plan, manifest)
        elif not path.exists():  # a sibling merged it a moment ago
            path = plan.folder / name
    fsync_dir(plan.folder)  # the renames of this run reach the disk with the manifest's
    return _result(plan, manifest, path, merged)


def _result(plan: Plan, manifest: Entry, path: Path, merged: bool) -> Result:
    mine = {plan.sources[i].key for i in plan.mine}
    entries = [e for e in manifest["inputs"] if e["key"] in mine]
    skipped = [e for e in entries if e["status"] != "ok"]
    already = len(plan.finished) if plan.done is None else len(entries) - len(skipped)
    return Result(manifest, path, len(entries) - len(skipped) - already, already, skipped,
                  merged)
