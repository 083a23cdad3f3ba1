"""Jobs: what every job (dump, project, topk) shares around its tensors: finding its inputs,
making an output folder its own and clearing only what it owns there, devices, threads,
shards, batches and decoding.

An output folder belongs to one run configuration (its fingerprint): the same configuration
adds images and skips finished ones; another one is refused unless `--overwrite`, which first
removes convmaps' own files there and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from rich.filesize import decimal

from convmaps import __version__
from convmaps.core.capture import LayerRow
from convmaps.core.fields import Field
from convmaps.core.models import LoadedModel, bundled_lenet_path
from convmaps.errors import BadImageError, ConvmapsError, TooLargeError
from convmaps.io import layout
from convmaps.io import manifest as manifests
from convmaps.io.images import MAX_PIXELS, ImageSource, decode, find_images, sha256_file
from convmaps.io.store import parse_bytes

__all__ = ["DecodedImages", "batches", "bundled_samples", "check_bounds", "check_device",
           "check_room", "claim", "clear_folder", "default_threads", "default_workers",
           "find_sources", "identity", "image_loader", "inputs_id", "layer_rows", "listed",
           "memory_format", "model_identity", "owner", "resolve_shard", "run_device",
           "safe_folder", "threads", "usable_cores"]


def bundled_samples() -> Path:
    return Path(str(resources.files("convmaps") / "data" / "samples"))


def check_bounds(o: object, bounds: Iterable[tuple[str, int]]) -> None:
    """Each option `name` of `o` that is set is at least `low` (for options that come from a
    config or Python rather than the CLI, which checks its own)."""
    for name, low in bounds:
        if getattr(o, name) is not None and getattr(o, name) < low:
            raise ConvmapsError(f"{name} must be at least {low}, not {getattr(o, name)}")


def check_device(name: str) -> torch.device:
    """The device `name` names, proven by allocating on it (a typo, a GPU index that is not
    there, or a backend this build lacks is one line, not a traceback mid-run)."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConvmapsError(f"--device {name!r}: {str(e).splitlines()[0]}") from e
    if device.type == "meta":
        raise ConvmapsError("--device meta holds no values; use cpu or a GPU such as cuda")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, AttributeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConvmapsError(f"--device {name}: not usable here ({first})") from e
    return device


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


def _existing(out: Path) -> list[tuple[str, dict[str, Any]]]:
    """The manifests in `out` (the merged one and any shard's), by file name."""
    if not out.is_dir():
        return []
    names = [layout.MANIFEST, *sorted(p.name for p in out.iterdir()
                                      if layout.is_shard_manifest(p.name))]
    found = []
    for name in names:
        try:
            m = manifests.read(out, name)
        except ConvmapsError as e:
            raise ConvmapsError(f"{e}; convmaps will not replace it: choose another --out") from e
        if m is not None:
            found.append((name, m))
    return found


def claim(out: Path, fingerprint: str, resume: bool, *,
          remove: Callable[[Path, dict[str, Any]], None], what: str, shards: int = 1
          ) -> list[dict[str, Any]]:
    """Make `out` this run's: returns the entries of earlier runs of the same configuration.

    Another configuration's dump there is refused, or with `--overwrite` (resume off) removed
    first, as is this configuration's own when not resuming — except under shards, whose
    siblings of the same configuration may be writing right now: their files are rewritten
    by their own shard, never removed by another."""
    found = _existing(out)
    other = [m for _, m in found if m["run"] != fingerprint]
    if other and resume:
        m = other[0]
        raise ConvmapsError(
            f"{out} holds {what} made with other options ({m.get('model')}, weights "
            f"{m.get('weights')}, run {m['run']}); add --overwrite to replace it, or choose "
            "another --out"
        )
    if not resume:
        for name, m in found:
            if shards > 1 and m["run"] == fingerprint:
                continue
            remove(out, m)  # the files its manifest lists, and nothing else
            (out / name).unlink(missing_ok=True)
        if shards == 1:
            return []
        found = [(n, m) for n, m in found if m["run"] == fingerprint]
    by_key: dict[str, dict[str, Any]] = {}
    for _, m in found:  # the merged manifest first, then shards' newer entries
        by_key.update({e["key"]: e for e in m["inputs"] if e["status"] != "pending"})
    return [by_key[k] for k in sorted(by_key)]


def identity(loaded: LoadedModel) -> str:
    """A short hash of `model_identity`: which network made a folder's projections."""
    return hashlib.sha256(json.dumps(model_identity(loaded), sort_keys=True).encode()
                          ).hexdigest()[:16]


def listed(out: Path, fingerprint: str) -> dict[str, set[str]]:
    """The files this configuration's manifests in `out` list per image key (pending entries
    of a killed run included): the only files a redone image may lose besides temporary ones."""
    files: dict[str, set[str]] = {}
    for _, m in _existing(out):
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
        elif reason is None and target.exists() and not target.is_dir():
            reason = f"its output folder would replace the file {target}"
        if reason is not None:
            skips[i] = f"output clash: {reason}"
    return sources, skips


def default_workers() -> int:
    """Decoding processes when --workers is not given: a quarter of the CPU cores this process
    may use, at most 8. On 2 cores that is none: the batched forward pass keeps both cores
    busy, and a decoding process would only compete with it."""
    return min(8, usable_cores() // 4)


def default_threads() -> int:
    """Compute threads when --threads is not given: every usable core but one, at least one.

    torch's OpenMP threads spin while they wait for each other; when another process holds a
    core, a thread per core stalls every GEMM behind the one that lost its core (kernel maps:
    4.2 s against 0.2 s per image on a shared 2-core box). One core left free keeps that from
    happening and costs little when the machine is quiet (`benchmarks/bench_kernel_maps.py
    --busy` measures both)."""
    return max(1, usable_cores() - 1)


def usable_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def _env_int(name: str, default: int) -> int:
    """A torch.distributed variable (WORLD_SIZE, RANK, LOCAL_RANK) as an integer."""
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ConvmapsError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_shard(spec: str | None) -> tuple[int, int]:
    """`--shard I/N`, else torchrun's RANK/WORLD_SIZE, else the whole input (0, 1)."""
    if spec is None:
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        if world > 1 and not 0 <= rank < world:
            raise ConvmapsError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return (rank, world) if world > 1 else (0, 1)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not int(m[1]) < int(m[2]):
        raise ConvmapsError(f"--shard {spec!r}: write I/N with 0 <= I < N, e.g. 0/4 … 3/4")
    return int(m[1]), int(m[2])


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


def batches(count: int, size: int, shard: tuple[int, int]) -> list[list[int]]:
    """This shard's batches, at fixed positions in the sorted inputs: an image is always
    computed with the same neighbours (CPU kernels give batch-dependent low bits), so a resumed
    or sharded run is byte-identical to one uninterrupted process. Shard I of N takes every
    N-th batch."""
    size = max(1, size)
    every = [list(range(i, min(i + size, count))) for i in range(0, count, size)]
    return every[shard[0]::shard[1]]


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
            image = decode(src.path)  # first: it refuses FIFOs and devices, which would hang
            _check_resized(image.size, self.preprocess)
            sha = sha256_file(src.path)
            tensor = self.preprocess(image)
            return {"index": i, "sha256": sha, "tensor": tensor, "reason": None}
        except (BadImageError, OSError) as e:
            reason = str(e) if isinstance(e, BadImageError) else f"unreadable: {e.strerror or e}"
            return {"index": i, "sha256": None, "tensor": None, "reason": reason}


def image_loader(images: DecodedImages, batches: list[list[int]], workers: int | None,
                 device: torch.device) -> torch.utils.data.DataLoader[dict[str, Any]]:
    """The `batches` (lists of indices) of `images`, decoded in `workers` processes (default:
    `default_workers()`), each batch a list of `DecodedImages` items."""
    return torch.utils.data.DataLoader(
        images, batch_sampler=batches, collate_fn=list,
        num_workers=default_workers() if workers is None else workers,
        pin_memory=device.type == "cuda",
    )


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


def memory_format(device: torch.device) -> torch.memory_format:
    # oneDNN convolutions run 10-15% faster in channels-last layout (AlexNet and VGG16 on the
    # CPU); saved maps are made contiguous on the way to disk whatever the layout.
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def run_device(name: str) -> torch.device:
    """The device a run computes on: `name`, with torchrun's LOCAL_RANK for a bare `cuda`."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", _env_int("LOCAL_RANK", 0))  # one GPU per torchrun process
    return device


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `n` (default: `default_threads()`), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or default_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)
