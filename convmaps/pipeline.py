"""Pipeline: the `dump` job, loader -> model -> writer, with estimate, resume and manifest.

`capture`, `decompose`, `pooling`, `store` and `render` stay pure; this module is the only one
that knows about folders of images, batches, options and progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convmaps import __version__
from convmaps.capture import Kind, Layer, LayerRow, Trace, layer_table, select, trace
from convmaps.errors import BadImageError, ConvmapsError, TooLargeError
from convmaps.images import MAX_PIXELS, ImageSource, decode, find_images, sha256_file
from convmaps.models import LoadedModel, bundled_lenet_path, load_model
from convmaps.store import (
    TensorSpec,
    format_bytes,
    parse_bytes,
    png_complete,
    read_metadata,
    save_tensors,
    write_bytes,
    write_json,
    write_safetensors,
)

__all__ = ["DType", "DumpOptions", "FilterOptions", "Plan", "plan_dump", "run_dump",
           "run_filters"]

MANIFEST = "manifest.json"


class DType(StrEnum):
    """Storage dtype of float outputs; computation is always float32."""

    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"

    @property
    def torch(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, self.value)
        return dtype


@dataclass
class DumpOptions:
    """Every `dump` option; `convmaps run` fills the same fields from a TOML file."""

    model: str = "lenet"
    inputs: list[str] = field(default_factory=list)
    layers: str | None = None
    kernels: str | None = None
    taps: str | None = None
    switches: bool = True
    png: bool = True
    out: str = "convmaps_out"
    weights: str | None = None
    arch: str | None = None
    batch_size: int = 8
    workers: int | None = None  # None: default_workers()
    device: str = "cpu"
    dtype: DType = DType.float32
    max_bytes: str = "8GB"
    resume: bool = True
    strict: bool = False
    png_cap: int = 16
    chunk_bytes: str = "16MB"  # below glibc's mmap threshold: chunk memory is reused
    shard: str | None = None  # "I/N": this process does shard I (0-based) of N
    config: str | None = None  # the TOML file the options came from, if any


@dataclass
class FilterOptions:
    """Every `filters` option; a config with `command = "filters"` fills the same fields."""

    model: str = "lenet"
    layers: str | None = None
    out: str = "convmaps_out"
    weights: str | None = None
    arch: str | None = None
    png: bool = True
    png_cap: int = 64
    config: str | None = None  # the TOML file the options came from, if any


@dataclass
class Plan:
    """What a dump will do, decided before any image is decoded."""

    options: DumpOptions
    loaded: LoadedModel
    layers: list[Layer]
    pools: list[Layer]
    kernels: list[Layer]
    taps: list[Layer]
    sources: list[ImageSource]
    table: list[LayerRow]
    fingerprint: str
    image_bytes: int  # bytes of safetensors output per image
    complete: set[int]  # indices of sources whose outputs are already complete
    shard: tuple[int, int] = (0, 1)  # (index, count)
    finished: dict[int, str] = field(default_factory=dict)  # complete index -> its sha256
    batches: list[list[int]] = field(default_factory=list)  # this shard's, at fixed positions

    @property
    def out(self) -> Path:
        return Path(self.options.out)

    @property
    def mine(self) -> list[int]:
        """Indices of the sources this process (shard) is responsible for."""
        return [i for b in self.batches for i in b]

    @property
    def pending(self) -> int:
        return len(self.mine) - len(self.complete)


def bundled_samples() -> Path:
    return Path(str(resources.files("convmaps") / "data" / "samples"))


def _per_image_bytes(table: list[LayerRow], layers: list[Layer], pools: list[Layer],
                     kernels: list[Layer], taps: list[Layer], itemsize: int) -> int:
    rows = {r.name: r for r in table}

    def numel(shape: tuple[int, ...] | None) -> int:
        return int(torch.Size(shape or ()).numel())

    total = sum(numel(rows[x.name].out_shape) * itemsize for x in layers)
    total += sum(numel(rows[x.name].out_shape) * 8 for x in pools)
    total += sum((rows[x.name].kernel_map_bytes or 0) // 4 * itemsize for x in kernels)
    total += sum((rows[x.name].tap_map_bytes or 0) // 4 * itemsize for x in taps)
    return total


def _fingerprint(o: DumpOptions, loaded: LoadedModel, layers: list[Layer], pools: list[Layer],
                 kernels: list[Layer], taps: list[Layer]) -> str:
    """Everything that changes the bytes of an image's outputs (not batch size or workers)."""
    weights_file = bundled_lenet_path() if loaded.weights == "bundled" else Path(loaded.weights)
    what = {
        "convmaps": __version__, "arch": loaded.arch, "weights": loaded.weights,
        # a checkpoint's contents, not just its path: new weights in the same file redo images
        "weights_sha256": sha256_file(weights_file) if weights_file.is_file() else None,
        "preprocess": repr(loaded.preprocess), "layers": [x.name for x in layers],
        "switches": [x.name for x in pools], "kernels": [x.name for x in kernels],
        "taps": [x.name for x in taps], "png": o.png, "png_cap": o.png_cap, "dtype": o.dtype,
        "layout": str(_layout(torch.device(o.device))),  # a layout has its own low bits
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _expected_files(plan: Plan) -> list[str]:
    files = ["activations.safetensors"] if plan.layers else []
    if plan.pools:
        files.append("switches.safetensors")
    if plan.kernels:
        files.append("kernels.safetensors")
    if plan.taps:
        files.append("taps.safetensors")
    if plan.options.png:
        files += [f"png/{x.name}.png" for x in plan.layers]
        for kind, convs in (("kernels", plan.kernels), ("taps", plan.taps)):
            for x in convs:
                assert isinstance(x.module, nn.Conv2d)
                n = min(plan.options.png_cap, x.module.out_channels)
                files += [f"png/{x.name}.{kind}/{o}.png" for o in range(n)]
    return sorted(files)


def _finished_sha(plan: Plan, source: ImageSource, files: list[str]) -> str | None:
    """The image's sha256 when all its `files` exist whole (safetensors length matches its
    header, PNGs end with their end chunk) and were made by this run from this very image
    (fingerprint and sha256 in every safetensors header); else None."""
    folder = plan.out / source.key
    if not all(png_complete(folder / f) if f.endswith(".png") else (folder / f).is_file()
               for f in files):
        return None
    sha = None
    for f in files:
        if f.endswith(".safetensors"):
            meta = read_metadata(folder / f)
            if meta is None or meta.get("run") != plan.fingerprint:
                return None
            sha = sha or sha256_file(source.path)
            if meta.get("sha256") != sha:
                return None
    return sha


def plan_dump(o: DumpOptions) -> Plan:
    """Load the model, resolve layers and inputs, find finished work and check the size."""
    _check_options(o)
    loaded = load_model(o.model, o.weights, o.arch)
    model = loaded.model
    table = layer_table(model, (loaded.in_channels, *loaded.input_size))
    # Modules that never run in eval mode (GoogLeNet/Inception aux heads) have no output.
    ran = {r.name for r in table if r.out_shape is not None}

    def pick(spec: str | None, flag: str, conv_only: bool) -> list[Layer]:
        chosen = select(model, spec, conv_only=conv_only, flag=flag) if spec is not None else []
        idle = [x.name for x in chosen if x.name not in ran]
        if idle and spec not in (None, "all", *Kind.__members__):
            raise ConvmapsError(f"{flag}: {', '.join(idle[:3])} never run(s) in eval mode")
        return [x for x in chosen if x.name in ran]

    layers = pick(o.layers or "all", "--layers", False)
    pools = [x for x in layers if isinstance(x.module, nn.MaxPool2d)] if o.switches else []
    kernels = pick(o.kernels, "--kernels", True)
    taps = pick(o.taps, "--taps", True)
    if not (layers or kernels or taps):
        raise ConvmapsError("nothing selected: give --layers, --kernels or --taps a layer")
    inputs = list(o.inputs)
    if not inputs:
        if loaded.arch != "lenet":
            raise ConvmapsError("give INPUT images or folders (only `dump lenet` has samples)")
        inputs = [str(bundled_samples())]
    out = Path(o.out).resolve()
    # Never read this run's (or an earlier run's) own PNGs back as inputs.
    sources = [s for s in find_images(inputs) if not s.path.resolve().is_relative_to(out)]
    if not sources:
        raise ConvmapsError(f"no images found in {', '.join(inputs)}")
    itemsize = torch.empty((), dtype=DType(o.dtype).torch).element_size()
    per_image = _per_image_bytes(table, layers, pools, kernels, taps, itemsize)
    plan = Plan(o, loaded, layers, pools, kernels, taps, sources, table,
                _fingerprint(o, loaded, layers, pools, kernels, taps), per_image, set(),
                resolve_shard(o.shard))
    plan.batches = _batches(len(sources), o.batch_size, plan.shard)
    if o.resume:
        files = _expected_files(plan)
        found = {i: _finished_sha(plan, sources[i], files) for i in plan.mine}
        plan.finished = {i: sha for i, sha in found.items() if sha is not None}
        plan.complete = set(plan.finished)
    _check_size(plan)
    return plan


def _check_options(o: DumpOptions) -> None:
    """What the CLI's own bounds check, for options that come from a config or Python."""
    for name, low in (("batch_size", 1), ("workers", 0), ("png_cap", 0)):
        if getattr(o, name) is not None and getattr(o, name) < low:
            raise ConvmapsError(f"{name} must be at least {low}, not {getattr(o, name)}")
    parse_bytes(o.max_bytes)
    parse_bytes(o.chunk_bytes)
    try:
        device = torch.device(o.device)
    except RuntimeError as e:
        raise ConvmapsError(f"--device {o.device!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConvmapsError(f"--device {o.device}: no CUDA GPU is available here")


def default_workers() -> int:
    """Decoding processes when --workers is not given: a quarter of the CPU cores this process
    may use, at most 8. On 2 cores that is none: the batched forward pass keeps both cores
    busy, and a decoding process would only compete with it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(8, (cores or 1) // 4)


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


def _check_size(plan: Plan) -> None:
    need = plan.image_bytes * plan.pending
    limit = parse_bytes(plan.options.max_bytes)
    what = f"{plan.pending} image(s) x {format_bytes(plan.image_bytes)}"
    if need > limit:
        raise TooLargeError(
            f"this run would write {format_bytes(need)} ({what}), over --max-bytes "
            f"{format_bytes(limit)}; raise --max-bytes, pick fewer --layers/--kernels/--taps, "
            "or use --dtype float16"
        )
    probe = plan.out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise TooLargeError(
            f"this run would write {format_bytes(need)} ({what}) but {probe} has only "
            f"{format_bytes(free)} free"
        )


class _Decoded(torch.utils.data.Dataset[dict[str, Any]]):
    """Decode + preprocess in DataLoader workers; a broken image becomes a reason, not a crash."""

    def __init__(self, sources: list[ImageSource], preprocess: Callable[[Any], torch.Tensor]):
        self.sources = sources
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, Any]:
        src = self.sources[i]
        try:
            image = decode(src.path)  # first: it refuses FIFOs and devices, which would hang
            _check_resized(image.size, self.preprocess)
            sha = sha256_file(src.path)
            tensor = self.preprocess(image)
            return {"index": i, "sha256": sha, "tensor": tensor, "reason": None}
        except (BadImageError, OSError) as e:
            reason = str(e) if isinstance(e, BadImageError) else f"unreadable: {e.strerror or e}"
            return {"index": i, "sha256": None, "tensor": None, "reason": reason}


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


def _batches(count: int, size: int, shard: tuple[int, int]) -> list[list[int]]:
    """This shard's batches, at fixed positions in the sorted inputs: an image is always
    computed with the same neighbours (CPU kernels give batch-dependent low bits), so a resumed
    or sharded run is byte-identical to one uninterrupted process. Shard I of N takes every
    N-th batch."""
    size = max(1, size)
    every = [list(range(i, min(i + size, count))) for i in range(0, count, size)]
    return every[shard[0]::shard[1]]


def _metadata(plan: Plan, src: ImageSource, sha: str, modules: list[str]) -> dict[str, str]:
    named = dict(plan.loaded.model.named_modules())
    meta = {
        "convmaps": __version__, "model": plan.loaded.arch, "weights": plan.loaded.weights,
        "source": str(src.path), "key": src.key, "sha256": sha,
        "dtype": str(plan.options.dtype), "run": plan.fingerprint,
    }
    for name in modules:
        base = name.split("@")[0]
        if base in named:
            meta[f"module.{name}"] = repr(named[base])
    return meta


def _decomposed(plan: Plan, kind: str, x: dict[str, torch.Tensor], folder: Path,
                written: list[str]) -> tuple[list[TensorSpec], Iterator[tuple[str, torch.Tensor]]]:
    """Specs and a chunk stream for kernels/taps; PNGs of the first filters are drawn from the
    same chunks as they pass, so nothing is computed twice."""
    from convmaps import decompose, render

    convs = plan.kernels if kind == "kernels" else plan.taps
    dtype = DType(plan.options.dtype).torch
    chunk_bytes = parse_bytes(plan.options.chunk_bytes)
    specs = []
    rows = {r.name: r for r in plan.table}
    for layer in convs:
        conv = layer.module
        assert isinstance(conv, nn.Conv2d)
        c_out, h, w = rows[layer.name].out_shape or (0, 0, 0)
        shape = ((c_out, conv.in_channels // conv.groups, h, w) if kind == "kernels"
                 else (c_out, h, w, *conv.kernel_size))
        specs.append(TensorSpec(layer.name, dtype, shape))
        if conv.bias is not None:
            specs.append(TensorSpec(f"{layer.name}.bias", dtype, (c_out,)))

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        chunker = decompose.kernel_map_chunks if kind == "kernels" else decompose.tap_map_chunks
        for layer in convs:
            conv = layer.module
            assert isinstance(conv, nn.Conv2d)
            for filters, chunk in chunker(conv, x[layer.name], chunk_bytes, dtype):
                if plan.options.png and filters.start < plan.options.png_cap:
                    for o in range(filters.start, min(filters.stop, plan.options.png_cap)):
                        maps = chunk[o - filters.start].float()
                        if kind == "kernels":
                            img, note = render.map_grid(maps), None
                        else:
                            img, note = render.tap_mosaic(maps)
                        rel = f"png/{layer.name}.{kind}/{o}.png"
                        write_bytes(folder / rel, render.png_bytes(img, note=note), sync=False)
                        written.append(rel)
                yield layer.name, chunk.cpu()
            if conv.bias is not None:
                yield f"{layer.name}.bias", conv.bias.detach().to(dtype).cpu()

    return specs, stream()


def _write_image(plan: Plan, src: ImageSource, sha: str, got: Trace, i: int) -> list[str]:
    """Every output file of one image (row i of the batch); returns their relative paths."""
    from convmaps import pooling, render

    folder = plan.out / src.key
    dtype = DType(plan.options.dtype).torch
    written: list[str] = []
    # PNGs first and activations.safetensors last: a resumed run trusts an image whose
    # safetensors carry its sha256, so everything else must already be new by then.
    if plan.options.png:
        for k, v in got.outputs.items():
            img = render.render_activation(v[i].float().cpu())
            write_bytes(folder / "png" / f"{k}.png", render.png_bytes(img), sync=False)
            written.append(f"png/{k}.png")
    if plan.pools:
        sw = {}
        for x in plan.pools:
            assert isinstance(x.module, nn.MaxPool2d)
            for key in [k for k in got.inputs if k.split("@")[0] == x.name]:
                sw[key] = pooling.switches(x.module, got.inputs[key][i]).cpu()
        save_tensors(folder / "switches.safetensors", sw, _metadata(plan, src, sha, [*sw]),
                     sync=False)
        written.append("switches.safetensors")
    convs_in = {k: v[i] for k, v in got.inputs.items()}
    for kind, convs in (("kernels", plan.kernels), ("taps", plan.taps)):
        if convs:
            specs, stream = _decomposed(plan, kind, convs_in, folder, written)
            meta = _metadata(plan, src, sha, [x.name for x in convs])
            write_safetensors(folder / f"{kind}.safetensors", specs, stream, meta, sync=False)
            written.append(f"{kind}.safetensors")
    acts = {k: v[i].to(dtype).cpu() for k, v in got.outputs.items()}
    if acts:
        save_tensors(folder / "activations.safetensors", acts, _metadata(plan, src, sha, [*acts]),
                     sync=False)
        written.append("activations.safetensors")
    return sorted(written)


def _manifest(plan: Plan, entries: list[dict[str, Any]]) -> dict[str, Any]:
    o = plan.options
    return {
        "convmaps": __version__,
        "model": plan.loaded.arch,
        "weights": plan.loaded.weights,
        "preprocessing": repr(plan.loaded.preprocess),
        "input_size": list(plan.loaded.input_size),
        "options": {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in asdict(o).items()
                    if k not in ("resume", "workers", "device", "out", "config", "shard")},
        "run": plan.fingerprint,
        "layers": [
            {"index": r.index, "name": r.name, "type": r.type,
             "in_shape": list(r.in_shape) if r.in_shape else None,
             "out_shape": list(r.out_shape) if r.out_shape else None, "params": r.params}
            for r in plan.table
        ],
        "selected": {"activations": [x.name for x in plan.layers],
                     "switches": [x.name for x in plan.pools],
                     "kernels": [x.name for x in plan.kernels],
                     "taps": [x.name for x in plan.taps]},
        "inputs": entries,
    }


def _entry(src: ImageSource, sha: str | None, status: str, files: list[str]) -> dict[str, Any]:
    return {"key": src.key, "source": str(src.path), "sha256": sha, "status": status,
            "files": files}


def _write_batch(plan: Plan, items: list[dict[str, Any]], got: Trace | None
                 ) -> list[tuple[int, dict[str, Any]]]:
    """All files of one batch (runs on the writer thread); returns manifest entries."""
    done = []
    good = [it for it in items if it["tensor"] is not None]
    for it in items:
        src = plan.sources[it["index"]]
        if it["tensor"] is None:
            done.append((it["index"], _entry(src, None, f"skipped: {it['reason']}", [])))
    for row, it in enumerate(good):
        src = plan.sources[it["index"]]
        if it["index"] in plan.complete:  # redone only for its neighbours' sake
            files = _expected_files(plan)
        else:
            assert got is not None
            files = _write_image(plan, src, it["sha256"], got, row)
        done.append((it["index"], _entry(src, it["sha256"], "ok", files)))
    return done


def _layout(device: torch.device) -> torch.memory_format:
    # oneDNN convolutions run 10-15% faster in channels-last layout (AlexNet and VGG16 on the
    # CPU); saved maps are made contiguous on the way to disk whatever the layout.
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def _device(o: DumpOptions) -> torch.device:
    device = torch.device(o.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", _env_int("LOCAL_RANK", 0))  # one GPU per torchrun process
    return device


def run_dump(plan: Plan, on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the planned dump; returns the manifest (also written to OUT/manifest.json).

    The plan's model is moved to the device (and, on the CPU, to channels-last layout) and
    left there.

    Decoding runs in DataLoader workers, the forward pass in this thread, and writing on a
    writer thread with at most two batches in flight, so memory stays bounded when the disk
    is slower than the model. `on_progress(n)` is called as each batch's files are written.
    """
    o = plan.options
    device = _device(o)
    layout = _layout(device)
    model = plan.loaded.model.to(device).to(memory_format=layout)
    outputs = [x.name for x in plan.layers]
    inputs = [x.name for x in [*plan.pools, *plan.kernels, *plan.taps]]
    entries: dict[int, dict[str, Any]] = {}
    files = _expected_files(plan)
    for i in sorted(plan.complete):
        entries[i] = _entry(plan.sources[i], plan.finished[i], "ok", files)
    if on_progress and plan.complete:
        on_progress(len(plan.complete))
    todo = [b for b in plan.batches if not set(b) <= plan.complete]
    loader = torch.utils.data.DataLoader(
        _Decoded(plan.sources, plan.loaded.preprocess), batch_sampler=todo,
        num_workers=default_workers() if o.workers is None else o.workers, collate_fn=list,
        pin_memory=device.type == "cuda",
    )
    in_flight: deque[tuple[Future[list[tuple[int, dict[str, Any]]]], int]] = deque()

    def settle(limit: int) -> None:
        while len(in_flight) > limit:
            future, n = in_flight.popleft()
            entries.update(future.result())
            if on_progress:
                on_progress(n)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="convmaps-writer") as writer:
        try:
            for items in loader:
                good = [it["tensor"] for it in items if it["tensor"] is not None]
                got = None
                if good:
                    batch = torch.stack(good).to(device, non_blocking=True,
                                                 memory_format=layout)
                    got = trace(model, batch, outputs, inputs)
                fresh = sum(1 for it in items if it["index"] not in plan.complete)
                in_flight.append((writer.submit(_write_batch, plan, items, got), fresh))
                settle(2)
            settle(0)
        finally:
            for future, _ in in_flight:
                future.cancel()
    return _finish(plan, entries)


def _manifest_name(shard: tuple[int, int]) -> str:
    return MANIFEST if shard[1] == 1 else f"manifest.shard-{shard[0]}-of-{shard[1]}.json"


def _finish(plan: Plan, entries: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Write this process's manifest; with shards, merge them all once every shard is done
    (under torchrun: rank 0, after a barrier; as separate jobs: whichever finishes last)."""
    manifest = _manifest(plan, [entries[i] for i in sorted(entries)])
    write_json(plan.out / _manifest_name(plan.shard), manifest)
    index, count = plan.shard
    if count == 1:
        return manifest
    if _env_int("WORLD_SIZE", 1) == count and plan.options.shard is None:
        from datetime import timedelta

        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(days=1))
        dist.barrier()
        if index == 0:
            manifest = merge_manifests(plan)
        dist.barrier()
        dist.destroy_process_group()
        return manifest
    return merge_manifests(plan, wait=False)


def merge_manifests(plan: Plan, wait: bool = True) -> dict[str, Any]:
    """One manifest.json from every shard's manifest, in input order; the shard files go.

    With `wait=False` it merges only if every shard has finished, else returns this shard's."""
    count = plan.shard[1]
    paths = [plan.out / _manifest_name((i, count)) for i in range(count)]
    if not wait and not all(p.is_file() for p in paths):
        part: dict[str, Any] = json.loads((plan.out / _manifest_name(plan.shard)).read_text())
        return part
    try:
        parts = [json.loads(p.read_text()) for p in paths]
    except FileNotFoundError:  # another shard finishing at the same moment merged them
        mine: dict[str, Any] = json.loads((plan.out / MANIFEST).read_text())
        return mine
    if {part["run"] for part in parts} != {plan.fingerprint}:
        raise ConvmapsError(f"shard manifests in {plan.out} come from different runs")
    order = {s.key: i for i, s in enumerate(plan.sources)}
    merged = [e for part in parts for e in part["inputs"]]
    manifest = _manifest(plan, sorted(merged, key=lambda e: order.get(e["key"], len(order))))
    write_json(plan.out / MANIFEST, manifest)
    for p in paths:
        p.unlink(missing_ok=True)
    return manifest


def run_filters(o: FilterOptions) -> list[tuple[str, str | None]]:
    """`convmaps filters`: every selected conv weight into OUT/filters/filters.safetensors and
    one PNG grid per conv. Returns (module name, cap note or None) per conv."""
    from convmaps import render

    if o.png_cap < 1:
        raise ConvmapsError(f"png_cap must be at least 1, not {o.png_cap}")
    loaded = load_model(o.model, o.weights, o.arch)
    convs = select(loaded.model, o.layers or "conv", conv_only=True)
    folder = Path(o.out) / "filters"
    weights = {x.name: x.module.weight.detach().cpu() for x in convs
               if isinstance(x.module, nn.Conv2d)}
    options = {k: v for k, v in asdict(o).items() if k not in ("out", "config")}
    meta = {"convmaps": __version__, "model": loaded.arch, "weights": loaded.weights,
            "dtype": "float32", "options": json.dumps(options, sort_keys=True)}
    meta.update({f"module.{x.name}": repr(x.module) for x in convs})
    save_tensors(folder / "filters.safetensors", weights, meta)
    notes = []
    for name, w in weights.items():
        note = None
        if o.png:
            img, note = render.filter_grid(w, max_filters=o.png_cap, max_kernels=o.png_cap)
            write_bytes(folder / "png" / f"{name}.png", render.png_bytes(img, note=note))
        notes.append((name, note))
    return notes
