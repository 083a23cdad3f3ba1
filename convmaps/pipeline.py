"""Pipeline: the `dump` job, loader -> model -> writer, with estimate, resume and manifest.

`capture`, `decompose`, `pooling`, `store` and `render` stay pure; this module is the only one
that knows about folders of images, batches, options and progress.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convmaps import __version__
from convmaps.capture import Layer, LayerRow, Trace, layer_table, select, trace
from convmaps.errors import BadImageError, ConvmapsError, TooLargeError
from convmaps.images import ImageSource, decode, find_images, sha256_file
from convmaps.models import LoadedModel, load_model
from convmaps.store import (
    TensorSpec,
    format_bytes,
    parse_bytes,
    read_metadata,
    save_tensors,
    write_bytes,
    write_json,
    write_safetensors,
)

__all__ = ["DType", "DumpOptions", "Plan", "plan_dump", "run_dump", "run_filters"]

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
    workers: int = 0
    device: str = "cpu"
    dtype: DType = DType.float32
    max_bytes: str = "8GB"
    resume: bool = True
    strict: bool = False
    png_cap: int = 16
    chunk_bytes: str = "64MB"
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

    @property
    def out(self) -> Path:
        return Path(self.options.out)

    @property
    def pending(self) -> int:
        return len(self.sources) - len(self.complete)


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
    what = {
        "convmaps": __version__, "arch": loaded.arch, "weights": loaded.weights,
        "preprocess": repr(loaded.preprocess), "layers": [x.name for x in layers],
        "switches": [x.name for x in pools], "kernels": [x.name for x in kernels],
        "taps": [x.name for x in taps], "png": o.png, "png_cap": o.png_cap, "dtype": o.dtype,
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


def _is_complete(plan: Plan, source: ImageSource) -> bool:
    folder = plan.out / source.key
    files = _expected_files(plan)
    if not all((folder / f).is_file() for f in files):
        return False
    sha = None
    for f in files:
        if f.endswith(".safetensors"):
            meta = read_metadata(folder / f)
            if meta is None or meta.get("run") != plan.fingerprint:
                return False
            sha = sha or sha256_file(source.path)
            if meta.get("sha256") != sha:
                return False
    return True


def plan_dump(o: DumpOptions) -> Plan:
    """Load the model, resolve layers and inputs, find finished work and check the size."""
    loaded = load_model(o.model, o.weights, o.arch)
    model = loaded.model
    layers = select(model, o.layers)
    pools = [x for x in layers if isinstance(x.module, nn.MaxPool2d)] if o.switches else []
    kernels = select(model, o.kernels, conv_only=True, flag="--kernels") if o.kernels else []
    taps = select(model, o.taps, conv_only=True, flag="--taps") if o.taps else []
    inputs = list(o.inputs)
    if not inputs:
        if loaded.arch != "lenet":
            raise ConvmapsError("give INPUT images or folders (only `dump lenet` has samples)")
        inputs = [str(bundled_samples())]
    sources = find_images(inputs)
    if not sources:
        raise ConvmapsError(f"no images found in {', '.join(inputs)}")
    table = layer_table(model, (loaded.in_channels, *loaded.input_size))
    itemsize = torch.empty((), dtype=DType(o.dtype).torch).element_size()
    per_image = _per_image_bytes(table, layers, pools, kernels, taps, itemsize)
    plan = Plan(o, loaded, layers, pools, kernels, taps, sources, table,
                _fingerprint(o, loaded, layers, pools, kernels, taps), per_image, set())
    if o.resume:
        plan.complete = {i for i, s in enumerate(sources) if _is_complete(plan, s)}
    _check_size(plan)
    return plan


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
            sha = sha256_file(src.path)
            tensor = self.preprocess(decode(src.path))
            return {"index": i, "sha256": sha, "tensor": tensor, "reason": None}
        except (BadImageError, OSError) as e:
            reason = str(e) if isinstance(e, BadImageError) else f"unreadable: {e.strerror or e}"
            return {"index": i, "sha256": None, "tensor": None, "reason": reason}


def _batches(plan: Plan) -> list[list[int]]:
    """Batches at fixed positions in the sorted inputs, so an image is always computed with the
    same neighbours: CPU kernels give batch-dependent low bits, and a resumed run must be
    byte-identical to an uninterrupted one. A batch with any unfinished image is redone."""
    size = max(1, plan.options.batch_size)
    every = [list(range(i, min(i + size, len(plan.sources))))
             for i in range(0, len(plan.sources), size)]
    return [b for b in every if not set(b) <= plan.complete]


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
                        write_bytes(folder / rel, render.png_bytes(img, note=note))
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
    acts = {k: v[i].to(dtype).cpu() for k, v in got.outputs.items()}
    if acts:
        save_tensors(folder / "activations.safetensors", acts, _metadata(plan, src, sha, [*acts]))
        written.append("activations.safetensors")
    if plan.pools:
        sw = {}
        for x in plan.pools:
            assert isinstance(x.module, nn.MaxPool2d)
            for key in [k for k in got.inputs if k.split("@")[0] == x.name]:
                sw[key] = pooling.switches(x.module, got.inputs[key][i]).cpu()
        save_tensors(folder / "switches.safetensors", sw, _metadata(plan, src, sha, [*sw]))
        written.append("switches.safetensors")
    convs_in = {k: v[i] for k, v in got.inputs.items()}
    for kind, convs in (("kernels", plan.kernels), ("taps", plan.taps)):
        if convs:
            specs, stream = _decomposed(plan, kind, convs_in, folder, written)
            meta = _metadata(plan, src, sha, [x.name for x in convs])
            write_safetensors(folder / f"{kind}.safetensors", specs, stream, meta)
            written.append(f"{kind}.safetensors")
    if plan.options.png:
        for k, v in got.outputs.items():
            img = render.render_activation(v[i].float().cpu())
            write_bytes(folder / "png" / f"{k}.png", render.png_bytes(img))
            written.append(f"png/{k}.png")
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
                    if k not in ("resume", "workers", "device", "out", "config")},
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


def run_dump(plan: Plan, on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the planned dump; returns the manifest (also written to OUT/manifest.json).

    `on_progress(n)` is called after each batch with the number of images it finished.
    """
    o = plan.options
    device = torch.device(o.device)
    model = plan.loaded.model.to(device)
    outputs = [x.name for x in plan.layers]
    inputs = [x.name for x in [*plan.pools, *plan.kernels, *plan.taps]]
    entries: dict[int, dict[str, Any]] = {}
    for i in sorted(plan.complete):
        src = plan.sources[i]
        entries[i] = {"key": src.key, "source": str(src.path), "sha256": sha256_file(src.path),
                      "status": "ok", "files": _expected_files(plan)}
    if on_progress and plan.complete:
        on_progress(len(plan.complete))
    loader = torch.utils.data.DataLoader(
        _Decoded(plan.sources, plan.loaded.preprocess),
        batch_sampler=_batches(plan), num_workers=o.workers, collate_fn=list,
    )
    for items in loader:
        good = [it for it in items if it["tensor"] is not None]
        for it in items:
            if it["tensor"] is None:
                src = plan.sources[it["index"]]
                entries[it["index"]] = {"key": src.key, "source": str(src.path), "sha256": None,
                                        "status": f"skipped: {it['reason']}", "files": []}
        if good:
            batch = torch.stack([it["tensor"] for it in good]).to(device)
            got = trace(model, batch, outputs, inputs)
            for row, it in enumerate(good):
                src = plan.sources[it["index"]]
                files = (_expected_files(plan) if it["index"] in plan.complete
                         else _write_image(plan, src, it["sha256"], got, row))
                entries[it["index"]] = {"key": src.key, "source": str(src.path),
                                        "sha256": it["sha256"], "status": "ok", "files": files}
        if on_progress:
            on_progress(sum(1 for it in items if it["index"] not in plan.complete))
    manifest = _manifest(plan, [entries[i] for i in sorted(entries)])
    write_json(plan.out / MANIFEST, manifest)
    return manifest


def run_filters(loaded: LoadedModel, spec: str | None, out: str | Path, png: bool = True,
                png_cap: int = 64) -> list[tuple[str, str | None]]:
    """`convmaps filters`: every selected conv weight into OUT/filters/filters.safetensors and
    one PNG grid per conv. Returns (module name, cap note or None) per conv."""
    from convmaps import render

    convs = select(loaded.model, spec or "conv", conv_only=True)
    folder = Path(out) / "filters"
    weights = {x.name: x.module.weight.detach().cpu() for x in convs
               if isinstance(x.module, nn.Conv2d)}
    meta = {"convmaps": __version__, "model": loaded.arch, "weights": loaded.weights,
            "dtype": "float32"}
    meta.update({f"module.{x.name}": repr(x.module) for x in convs})
    save_tensors(folder / "filters.safetensors", weights, meta)
    notes = []
    for name, w in weights.items():
        note = None
        if png:
            img, note = render.filter_grid(w, max_filters=png_cap, max_kernels=png_cap)
            write_bytes(folder / "png" / f"{name}.png", render.png_bytes(img, note=note))
        notes.append((name, note))
    return notes
