"""Dump: plan and run the `dump` job, loader -> model -> writer, with estimate, resume, shards.

`capture`, `decompose`, `pooling`, `store` and `render` stay pure; this module and `jobs`
(what every job shares: inputs, the output folder's owner, threads, batches, decoding) are
the ones that know about folders of images, batches and progress. Which files an image gets
comes from `layout`, what the folder's manifest says from `manifest`.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from rich.filesize import decimal
from torch import nn

from convmaps import __version__
from convmaps.core.capture import (
    Kind,
    Layer,
    LayerRow,
    Trace,
    layer_table,
    meta_trace,
    select,
    trace,
)
from convmaps.core.fields import fields
from convmaps.core.models import LoadedModel, load_model
from convmaps.errors import BadImageError, ConvmapsError
from convmaps.io import layout
from convmaps.io import manifest as manifests
from convmaps.io.images import ImageSource, sha256_file
from convmaps.io.layout import ImageLayout
from convmaps.io.store import (
    TensorSpec,
    fsync_dir,
    parse_bytes,
    png_complete,
    read_metadata,
    save_tensors,
    write_bytes,
    write_json,
    write_safetensors,
)
from convmaps.jobs.engine import (
    DecodedImages,
    batches,
    check_bounds,
    check_device,
    check_room,
    claim,
    clear_folder,
    find_sources,
    identity,
    image_loader,
    inputs_id,
    layer_rows,
    listed,
    memory_format,
    model_identity,
    owner,
    resolve_shard,
    run_device,
    threads,
    usable_cores,
)
from convmaps.options import DType, DumpOptions, PngScale

__all__ = ["Plan", "class_names", "plan_dump", "run_dump", "top5", "writer_threads"]

_PREDICTIONS = "top5"  # metadata key of activations.safetensors: the image's top-5 classes


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
    layout: ImageLayout
    fingerprint: str
    header: dict[str, Any]  # the manifest's run description (everything but the entries)
    reprs: dict[str, str]  # module name -> repr, taken once before any forward pass
    categories: list[str] | None  # class names of the model's output, when known
    image_bytes: int  # upper bound of one image's files (safetensors and PNGs)
    skips: dict[int, str] = field(default_factory=dict)  # sources refused before decoding
    complete: set[int] = field(default_factory=set)  # sources whose outputs are complete
    finished: dict[int, dict[str, Any]] = field(default_factory=dict)  # their entries
    earlier: list[dict[str, Any]] = field(default_factory=list)  # entries of earlier runs
    listed: dict[str, set[str]] = field(default_factory=dict)  # files manifests listed, by key
    shard: tuple[int, int] = (0, 1)  # (index, count)
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
        """Images this process will write (not finished, not refused)."""
        return sum(1 for i in self.mine if i not in self.complete and i not in self.skips)


# --- planning --------------------------------------------------------------------------------


def plan_dump(o: DumpOptions) -> Plan:
    """Load the model, resolve layers and inputs, claim the output folder, find finished work
    and check the size, all before any image is decoded."""
    _check_options(o)
    loaded = load_model(o.model, o.weights, o.arch)
    model = loaded.model
    input_shape = (loaded.in_channels, *loaded.input_size)
    table = layer_table(model, input_shape)
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
    shapes = meta_trace(model, input_shape, {x.name for x in [*layers, *pools]})
    lay = _image_layout(o, layers, pools, kernels, taps, shapes)
    itemsize = DType(o.dtype).torch.itemsize
    fingerprint = _fingerprint(o, loaded, lay)
    out = Path(o.out)
    shard = resolve_shard(o.shard)
    previous = listed(out, fingerprint)
    earlier = claim(out, fingerprint, o.resume, remove=_remove_dump, what="a dump",
                    shards=shard[1])
    _projections_of_another_network(out, loaded, o.resume)
    sources, skips = find_sources(o.inputs, loaded.arch, out, {e["key"] for e in earlier})
    categories = class_names(loaded)
    plan = Plan(
        o, loaded, layers, pools, kernels, taps, sources, table, lay, fingerprint,
        _header(o, loaded, table, lay, fingerprint, sources), _reprs(model),
        categories, _image_bytes(lay, shapes, kernels, taps, table, itemsize, o.png_scale),
        skips=skips, earlier=earlier, shard=shard, listed=previous,
    )
    plan.batches = batches(len(sources), o.batch_size, plan.shard)
    if o.resume:
        plan.finished = {i: e for i in plan.mine if i not in skips
                         and (e := _finished_entry(plan, sources[i])) is not None}
        plan.complete = set(plan.finished)
    _check_size(plan)
    return plan


def _check_options(o: DumpOptions) -> None:
    """What the CLI's own bounds check, for options that come from a config or Python."""
    check_bounds(o, (("batch_size", 1), ("workers", 0), ("png_cap", 0), ("threads", 1)))
    parse_bytes(o.max_bytes)
    parse_bytes(o.chunk_bytes)
    check_device(o.device)


def _image_layout(o: DumpOptions, layers: list[Layer], pools: list[Layer],
                  kernels: list[Layer], taps: list[Layer], shapes: Trace) -> ImageLayout:
    def keys(store: dict[str, torch.Tensor], chosen: list[Layer]) -> tuple[str, ...]:
        names = {x.name for x in chosen}
        return tuple(k for k in store if k.split("@")[0] in names)  # call order

    def capped(convs: list[Layer]) -> tuple[tuple[str, int], ...]:
        return tuple((x.name, min(o.png_cap, _conv(x).out_channels)) for x in convs)

    # dict order of the meta trace is call order; keep the model's module order instead
    order = {x.name: i for i, x in enumerate(layers)}
    acts = tuple(sorted(keys(shapes.outputs, layers), key=lambda k: order[k.split("@")[0]]))
    return ImageLayout(activations=acts, switches=keys(shapes.inputs, pools),
                       kernels=capped(kernels), taps=capped(taps), png=o.png)


def _conv(layer: Layer) -> nn.Conv2d:
    assert isinstance(layer.module, nn.Conv2d)  # select(conv_only=True) guarantees it
    return layer.module


def _fingerprint(o: DumpOptions, loaded: LoadedModel, lay: ImageLayout) -> str:
    """Everything that changes the bytes of an image's outputs (not batch size or workers)."""
    what = {
        **model_identity(loaded), "layout": asdict(lay),
        "png_cap": o.png_cap, "png_scale": str(o.png_scale), "dtype": o.dtype,
        "memory": str(memory_format(torch.device(o.device))),  # a layout has its own low bits
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _reprs(model: nn.Module) -> dict[str, str]:
    # Taken once, before any forward pass: capture switches `inplace` off during a pass, and a
    # repr read by the writer thread meanwhile would say ReLU() instead of ReLU(inplace=True).
    return {name: repr(m) for name, m in model.named_modules() if name}


def class_names(loaded: LoadedModel) -> list[str] | None:
    """The names of the model's output classes: the weights' `meta["categories"]`, or the
    `classes` a LeNet checkpoint records."""
    if "classes" in loaded.meta:
        return loaded.meta["classes"].split(",")
    if loaded.arch == "lenet":
        return None
    import torchvision

    try:
        names = torchvision.models.get_model_weights(loaded.arch).DEFAULT.meta.get("categories")
    except (ValueError, KeyError, AttributeError):
        return None
    return list(names) if names else None


def _header(o: DumpOptions, loaded: LoadedModel, table: list[LayerRow], lay: ImageLayout,
            fingerprint: str, sources: list[ImageSource]) -> dict[str, Any]:
    return {
        "convmaps": __version__,
        "model": loaded.arch,
        "weights": loaded.weights,
        "preprocessing": repr(loaded.preprocess),
        "input_size": list(loaded.input_size),
        "options": {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in asdict(o).items()
                    if k not in ("resume", "workers", "threads", "device", "out", "config",
                                 "shard")},
        "run": fingerprint,
        "identity": identity(loaded),  # the network alone: projections beside it must match
        # which inputs this run was given: a leftover shard manifest of another input set is
        # never merged with this run's
        "inputs_id": inputs_id(sources),
        "layers": layer_rows(table, fields(loaded.model, (loaded.in_channels,
                                                           *loaded.input_size), strict=False)),
        "selected": {"activations": list(lay.activations), "switches": list(lay.switches),
                     "kernels": [n for n, _ in lay.kernels], "taps": [n for n, _ in lay.taps]},
    }


def _projections_of_another_network(out: Path, loaded: LoadedModel, resume: bool) -> None:
    """A dump's maps and the projections beside them must come from one network: another
    network's projections are refused, or with --overwrite removed."""
    m = manifests.read(out, layout.PROJECTIONS_MANIFEST)
    if m is None or m["run"] == identity(loaded):
        return
    if resume:
        raise ConvmapsError(
            f"{out} holds projections of {m.get('model')} (weights {m.get('weights')}); a dump "
            f"of {loaded.arch} ({loaded.weights}) beside them would not match: add --overwrite "
            "to remove them, or choose another --out"
        )
    from convmaps.jobs.project import remove_projections

    remove_projections(out, m)


def _remove_dump(out: Path, m: dict[str, Any]) -> None:
    """Remove the dump files a manifest lists (and temporary files beside them); never
    anything else, whatever the manifest claims."""
    for e in m["inputs"]:
        mine = {f for f in e.get("files", []) if layout.is_dump_output(f)}
        clear_folder(out, e["key"], keep=set(), owned=owner(mine))


def _image_bytes(lay: ImageLayout, shapes: Trace, kernels: list[Layer], taps: list[Layer],
                 table: list[LayerRow], itemsize: int, png_scale: PngScale) -> int:
    """An upper bound of one image's files: the tensors exactly, PNGs at their raw size."""
    from convmaps import render

    def numel(shape: torch.Size | tuple[int, ...]) -> int:
        return int(torch.Size(shape).numel())

    rows = {r.name: r for r in table}
    per_key = {k: tuple(v.shape[1:]) for k, v in shapes.outputs.items()}
    total = sum(numel(per_key[k]) * itemsize for k in lay.activations)
    # switches have the pool's output shape: int64 indices
    total += sum(numel(per_key[k]) * 8 for k in lay.switches)
    for convs, kind in ((kernels, "kernels"), (taps, "taps")):
        for x in convs:
            conv = _conv(x)
            c_out, h, w = rows[x.name].out_shape or (0, 0, 0)
            per_filter = (conv.in_channels // conv.groups if kind == "kernels"
                          else conv.kernel_size[0] * conv.kernel_size[1]) * h * w
            total += c_out * per_filter * itemsize + (c_out * itemsize if conv.bias is not None
                                                      else 0)
            if lay.png:
                shape = ((conv.in_channels // conv.groups, h, w) if kind == "kernels"
                         else (h, w, *conv.kernel_size))
                n = min(dict(lay.kernels if kind == "kernels" else lay.taps)[x.name], c_out)
                total += n * render.png_bound(kind, shape,
                                              png_scale if kind == "kernels" else "layer")
    if lay.png:
        total += sum(render.png_bound("activation", per_key[k], png_scale)
                     for k in lay.activations)
    return total + 4096 * len(lay.tensor_files())  # headers and metadata


def _finished_entry(plan: Plan, source: ImageSource) -> dict[str, Any] | None:
    """The image's manifest entry when all its files exist whole (safetensors length matches
    its header, PNGs end with their end chunk) and were made by this run from this very image
    (fingerprint and sha256 in every safetensors header); else None."""
    folder = plan.out / source.key
    files = plan.layout.files()
    if not all(png_complete(folder / f) if f.endswith(".png") else (folder / f).is_file()
               for f in files):
        return None
    sha = None
    top5 = None
    for f in plan.layout.tensor_files():
        meta = read_metadata(folder / f)
        if meta is None or meta.get("run") != plan.fingerprint:
            return None
        try:
            sha = sha or sha256_file(source.path)
        except BadImageError:  # gone or no longer a file: redone, and decoding says why
            return None
        if meta.get("sha256") != sha:
            return None
        if _PREDICTIONS in meta:
            with suppress(ValueError, RecursionError):
                top5 = json.loads(meta[_PREDICTIONS])
    if not manifests.valid_top5(top5):  # a file edited by hand: no predictions, not a bad manifest
        top5 = None
    return manifests.entry(source.key, str(source.path), sha, "ok", files, top5)


def writer_threads() -> int:
    """Threads that write a dump's files: two where two cores are usable. Drawing a PNG
    holds the GIL only part of the time (deflating, numpy's passes and file writes release
    it), so a second writer overlaps one image's drawing with another's; on 2 cores a dump
    of every AlexNet module with PNGs took 25-30% less time with two (no PNG: the same).
    Batches in flight stay at two whatever the count, so memory does not grow with it."""
    return 2 if usable_cores() >= 2 else 1


def _check_size(plan: Plan) -> None:
    check_room(plan.image_bytes * plan.pending,
               f"{plan.pending} image(s) x at most {decimal(plan.image_bytes)}",
               plan.options.max_bytes, plan.out,
               "pick fewer --layers/--kernels/--taps, use --no-png or --dtype float16")


# --- running ---------------------------------------------------------------------------------


def _metadata(plan: Plan, src: ImageSource, sha: str, keys: list[str]) -> dict[str, str]:
    meta = {
        "convmaps": __version__, "model": plan.loaded.arch, "weights": plan.loaded.weights,
        "source": str(src.path), "key": src.key, "sha256": sha,
        "dtype": str(plan.options.dtype), "run": plan.fingerprint,
    }
    for key in keys:
        base = key.split("@")[0].removesuffix(".bias")
        if base in plan.reprs:
            meta[f"module.{key}"] = plan.reprs[base]
    return meta


def top5(logits: torch.Tensor, categories: list[str] | None) -> list[dict[str, Any]] | None:
    """The five most probable classes of one image's output (softmax of the logits)."""
    if logits.dim() != 1 or logits.numel() < 2:
        return None
    probs = torch.softmax(logits.double(), 0)
    values, indices = probs.topk(min(5, probs.numel()))
    names = categories if categories and len(categories) == probs.numel() else None
    return [{"class": names[i] if names else str(i), "index": i, "probability": round(p, 6)}
            for p, i in zip(values.tolist(), indices.tolist(), strict=True)]


def _decomposed(plan: Plan, kind: str, x: dict[str, torch.Tensor], folder: Path,
                written: list[str]) -> tuple[list[TensorSpec], Iterator[tuple[str, torch.Tensor]]]:
    """Specs and a chunk stream for kernels/taps; PNGs of the first filters are drawn from the
    same chunks as they pass, so nothing is computed twice."""
    from convmaps import render
    from convmaps.core import decompose

    convs = plan.kernels if kind == "kernels" else plan.taps
    capped = dict(plan.layout.kernels if kind == "kernels" else plan.layout.taps)
    dtype = DType(plan.options.dtype).torch
    chunk_bytes = parse_bytes(plan.options.chunk_bytes)
    specs = []
    rows = {r.name: r for r in plan.table}
    for layer in convs:
        conv = _conv(layer)
        c_out, h, w = rows[layer.name].out_shape or (0, 0, 0)
        shape = ((c_out, conv.in_channels // conv.groups, h, w) if kind == "kernels"
                 else (c_out, h, w, *conv.kernel_size))
        specs.append(TensorSpec(layer.name, dtype, shape))
        if conv.bias is not None:
            specs.append(TensorSpec(f"{layer.name}.bias", dtype, (c_out,)))

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        chunker = decompose.kernel_map_chunks if kind == "kernels" else decompose.tap_map_chunks
        for layer in convs:
            conv = _conv(layer)
            n_png = capped[layer.name] if plan.layout.png else 0
            for filters, chunk in chunker(conv, x[layer.name], chunk_bytes, dtype):
                for o in range(filters.start, min(filters.stop, n_png)):
                    pic = render.draw(kind, chunk[o - filters.start].float(),
                                      png_scale=plan.options.png_scale)
                    rel = plan.layout.filter_png(kind, layer.name, o)
                    write_bytes(folder / rel, pic.png(), sync=False)
                    written.append(rel)
                yield layer.name, chunk.cpu()
            if conv.bias is not None:
                yield f"{layer.name}.bias", conv.bias.detach().to(dtype).cpu()

    return specs, stream()


def _write_image(plan: Plan, src: ImageSource, sha: str, got: Trace, i: int,
                 predictions: list[dict[str, Any]] | None) -> list[str]:
    """Every output file of one image (row i of the batch); returns their relative paths."""
    from convmaps import render
    from convmaps.core import pooling

    folder = plan.out / src.key
    lay = plan.layout
    # files of older options and temporary files; nothing the manifests never listed
    clear_folder(plan.out, src.key, set(lay.files()), owner(plan.listed.get(src.key, set())))
    dtype = DType(plan.options.dtype).torch
    written: list[str] = []
    # PNGs first and activations.safetensors last: a resumed run trusts an image whose
    # safetensors carry its sha256, so everything else must already be new by then.
    if lay.png:
        named = _classifier_key(plan, got, i)
        for k in lay.activations:
            pic = render.draw("activation", got.outputs[k][i], png_scale=plan.options.png_scale,
                              classes=plan.categories if k == named else None)
            write_bytes(folder / lay.activation_png(k), pic.png(), sync=False)
            written.append(lay.activation_png(k))
    if lay.switches:
        pools = {x.name: x.module for x in plan.pools}
        sw = {}
        for key in lay.switches:
            pool = pools[key.split("@")[0]]
            assert isinstance(pool, nn.MaxPool2d)
            sw[key] = pooling.switches(pool, got.inputs[key][i]).cpu()
        save_tensors(folder / layout.SWITCHES, sw, _metadata(plan, src, sha, [*sw]), sync=False)
        written.append(layout.SWITCHES)
    convs_in = {k: v[i] for k, v in got.inputs.items()}
    for kind, name, convs in (("kernels", layout.KERNELS, plan.kernels),
                              ("taps", layout.TAPS, plan.taps)):
        if convs:
            specs, stream = _decomposed(plan, kind, convs_in, folder, written)
            meta = _metadata(plan, src, sha, [s.name for s in specs])
            write_safetensors(folder / name, specs, stream, meta, sync=False)
            written.append(name)
    acts = {k: got.outputs[k][i].to(dtype).cpu() for k in lay.activations}
    meta = _metadata(plan, src, sha, [*acts])
    if predictions is not None:
        meta[_PREDICTIONS] = json.dumps(predictions)
    save_tensors(folder / layout.ACTIVATIONS, acts, meta, sync=False)
    written.append(layout.ACTIVATIONS)
    assert sorted(written) == lay.files(), "layout and writer disagree"
    return sorted(written)


def _classifier_key(plan: Plan, got: Trace, i: int) -> str | None:
    """The activation whose PNG names its classes: the last one (in `plan.layers` order)
    with one value per class name, which is the model's output when it is selected."""
    if not plan.categories:
        return None
    n = len(plan.categories)
    return next((k for k in reversed(plan.layout.activations)
                 if got.outputs[k][i].numel() == n), None)


def _write_batch(plan: Plan, items: list[dict[str, Any]], got: Trace | None,
                 logits: torch.Tensor | None) -> list[tuple[int, dict[str, Any]]]:
    """All files of one batch (runs on a writer thread); returns manifest entries."""
    done = []
    good = [it for it in items if it["tensor"] is not None]
    for it in items:
        src = plan.sources[it["index"]]
        if it["tensor"] is None:
            if it["index"] not in plan.skips:  # a clash is never ours to clear
                clear_folder(plan.out, src.key, set(), owner(plan.listed.get(src.key, set())))
            entry = manifests.entry(src.key, str(src.path), None, f"skipped: {it['reason']}", [])
            done.append((it["index"], entry))
    for row, it in enumerate(good):
        i, src = it["index"], plan.sources[it["index"]]
        if i in plan.complete:  # computed again only for its neighbours' sake
            done.append((i, plan.finished[i]))
            continue
        assert got is not None
        predictions = top5(logits[row], plan.categories) if logits is not None else None
        files = _write_image(plan, src, it["sha256"], got, row, predictions)
        done.append((i, manifests.entry(src.key, str(src.path), it["sha256"], "ok", files,
                                        predictions)))
    return done


def run_dump(plan: Plan, on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the planned dump; returns the manifest (also written to OUT/manifest.json, or this
    shard's manifest until the last shard merges them).

    The plan's model is moved to the device (and, on the CPU, to channels-last layout) and
    left there.

    Decoding runs in DataLoader workers, the forward pass in this thread, and writing on
    `writer_threads()` threads with at most two batches in flight, so memory stays bounded
    when the disk is slower than the model. `on_progress(n)` is called as each batch's files
    are written.
    """
    o = plan.options
    device = run_device(o.device)
    memory = memory_format(device)
    model = plan.loaded.model.to(device).to(memory_format=memory)
    outputs = ["", *(x.name for x in plan.layers)]  # "": the model's output, for predictions
    inputs = [x.name for x in [*plan.pools, *plan.kernels, *plan.taps]]
    entries: dict[int, dict[str, Any]] = {}
    for i in sorted(plan.complete):
        entries[i] = plan.finished[i]
        key = plan.sources[i].key
        clear_folder(plan.out, key, set(plan.layout.files()), owner(plan.listed.get(key, set())))
    _write_manifest(plan, entries, pending=True)  # claims OUT before the first image file
    if on_progress and plan.complete:
        on_progress(len(plan.complete))
    todo = [b for b in plan.batches if not set(b) <= plan.complete]
    loader = image_loader(DecodedImages(plan.sources, plan.loaded.preprocess, plan.skips), todo,
                          o.workers, device)
    in_flight: deque[tuple[Future[list[tuple[int, dict[str, Any]]]], int]] = deque()

    def settle(limit: int) -> None:
        while len(in_flight) > limit:
            future, n = in_flight.popleft()
            entries.update(future.result())
            if on_progress:
                on_progress(n)

    with threads(o.threads), \
            ThreadPoolExecutor(writer_threads(), thread_name_prefix="convmaps-writer") as writer:
        try:
            for items in loader:
                good = [it["tensor"] for it in items if it["tensor"] is not None]
                got = logits = None
                if good:
                    batch = torch.stack(good).to(device, non_blocking=True, memory_format=memory)
                    got = trace(model, batch, outputs, inputs)
                    logits = got.outputs.pop("").float().cpu()
                    if logits.dim() != 2:
                        logits = None
                fresh = sum(1 for it in items if it["index"] not in plan.complete)
                in_flight.append((writer.submit(_write_batch, plan, items, got, logits), fresh))
                settle(2)
            settle(0)
        finally:
            for future, _ in in_flight:
                future.cancel()
    return _finish(plan, entries)


def _write_manifest(plan: Plan, entries: dict[int, dict[str, Any]], pending: bool
                    ) -> dict[str, Any]:
    """This process's manifest: every image it knows of, in input order (with `pending`, the
    images still to do are listed with the files they will get)."""
    by_key = {e["key"]: e for e in plan.earlier}
    if plan.shard[1] > 1:  # each shard lists its own images; the merge adds the earlier ones
        by_key = {}
    by_key.update(manifests.listed(plan.sources, plan.mine, entries,
                                   plan.layout.files() if pending else None))
    m = manifests.build(plan.header, manifests.ordered(by_key, (s.key for s in plan.sources)))
    write_json(plan.out / layout.shard_manifest(*plan.shard), m)
    return m


def _finish(plan: Plan, entries: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Write this process's final manifest; with shards (`--shard` or torchrun), the last one
    to finish merges them all. No shard ever waits for another."""
    manifest = _write_manifest(plan, entries, pending=False)
    index, count = plan.shard
    if count > 1:
        merged = manifests.merge(plan.out, plan.header, count, (s.key for s in plan.sources),
                                 plan.earlier)
        if merged is not None:
            manifest = merged
            for p in plan.out.iterdir():  # shard manifests of an earlier split: merged now
                if layout.is_shard_manifest(p.name):
                    p.unlink(missing_ok=True)
    fsync_dir(plan.out)  # the renames of this run reach the disk with the manifest's
    return manifest
