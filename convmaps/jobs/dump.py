"""The `dump` job: each image's feature maps, switches, kernel and tap maps and PNG grids.

The engine (`jobs.engine`) plans, claims OUT, decodes, batches, resumes, shards and writes the
manifest; this module says which modules a dump captures, runs them for a batch, and writes one
image's files. Which files an image gets comes from `io.layout.ImageLayout`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.filesize import decimal
from torch import nn

from convmaps import __version__
from convmaps.core.capture import Layer, LayerRow, Trace, modules_run, select, trace
from convmaps.core.fields import Field
from convmaps.core.models import LoadedModel
from convmaps.errors import BadImageError, ConvmapsError
from convmaps.io import layout
from convmaps.io import manifest as manifests
from convmaps.io.images import ImageSource, sha256_file
from convmaps.io.layout import ImageLayout
from convmaps.io.store import (
    TensorSpec,
    parse_bytes,
    png_complete,
    read_metadata,
    save_tensors,
    write_bytes,
    write_safetensors,
)
from convmaps.jobs.engine import (
    Job,
    Plan,
    Result,
    check_network,
    identity,
    per_image,
    plain_entry,
    plan_job,
    run_job,
)
from convmaps.jobs.ownership import clear_folder, owner
from convmaps.jobs.runtime import memory_format
from convmaps.options import DType, DumpOptions, PngScale

__all__ = ["Dump", "class_names", "plan_dump", "run_dump", "top5"]

_PREDICTIONS = "top5"  # metadata key of activations.safetensors: the image's top-5 classes


# --- planning --------------------------------------------------------------------------------


class Dump(Job):
    """A dump: the chosen modules' outputs, the max-pools' switches, and the chosen convs'
    kernel and tap maps, per image."""

    name = "dump"
    what = "a dump"
    bounds = (("png_cap", 0),)

    def prepare(self, o: DumpOptions, loaded: LoadedModel, table: list[LayerRow],
                fields: dict[str, Field], traced: Trace) -> None:
        parse_bytes(o.chunk_bytes)
        model = loaded.model
        input_shape = (loaded.in_channels, *loaded.input_size)
        # Modules that never run in eval mode (GoogLeNet/Inception aux heads) have no output.
        ran = modules_run(model, input_shape, traced)

        def pick(spec: str | None, flag: str, conv_only: bool) -> list[Layer]:
            return [] if spec is None else select(model, spec, conv_only=conv_only, flag=flag,
                                                  ran=ran)

        self.options = o
        self.layers = pick("all" if o.layers is None else o.layers, "--layers", False)
        self.pools = [x for x in self.layers if isinstance(x.module, nn.MaxPool2d)] \
            if o.switches else []
        self.kernels = pick(o.kernels, "--kernels", True)
        self.taps = pick(o.taps, "--taps", True)
        if not (self.layers or self.kernels or self.taps):
            raise ConvmapsError("nothing selected: give --layers, --kernels or --taps a layer")
        shapes = traced
        self.layout = _image_layout(o, self.layers, self.pools, self.kernels, self.taps, shapes)
        self.categories = class_names(loaded)
        self.image_bytes = _image_bytes(self.layout, shapes, self.kernels, self.taps, table,
                                        DType(o.dtype).torch.itemsize, o.png_scale)

    def fingerprint(self) -> dict[str, Any]:
        o = self.options
        return {"layout": asdict(self.layout), "png_cap": o.png_cap,
                "png_scale": str(o.png_scale), "dtype": o.dtype,
                "memory": str(memory_format(torch.device(o.device)))}  # its own low bits

    def header(self) -> dict[str, Any]:
        lay = self.layout
        return {"selected": {"activations": list(lay.activations), "switches": list(lay.switches),
                             "kernels": [n for n, _ in lay.kernels],
                             "taps": [n for n, _ in lay.taps]}}

    def files(self, plan: Plan, key: str) -> list[str]:
        return self.layout.files()

    def remove(self, folder: Path, m: dict[str, Any]) -> None:
        _remove_dump(folder, m)

    def neighbours(self, out: Path, loaded: LoadedModel, resume: bool) -> None:
        _projections_of_another_network(out, loaded, resume)
        check_network(out, loaded, "a dump",
                      own=[(".", layout.MANIFEST), (".", layout.PROJECTIONS_MANIFEST)])

    def resume(self, plan: Plan) -> dict[int, dict[str, Any]]:
        return {i: e for i in plan.mine if i not in plan.skips
                and (e := _finished_entry(plan, plan.sources[i])) is not None}

    def bytes(self, plan: Plan) -> tuple[int, str, str]:
        return (self.image_bytes * plan.pending,
                f"{plan.pending} image(s) x at most {decimal(self.image_bytes)}",
                "pick fewer --layers/--kernels/--taps, use --no-png or --dtype float16")

    def start(self, plan: Plan, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        # kernel and tap maps are computed on the host, from the host copy of their inputs
        self.host_convs = {x.name: copy.deepcopy(_conv(x)).cpu() if device.type != "cpu"
                           else _conv(x) for x in [*self.kernels, *self.taps]}
        for i in sorted(plan.finished):  # files of older options and temporary files go
            key = plan.sources[i].key
            clear_folder(plan.out, key, set(self.layout.files()),
                         owner(plan.listed.get(key, set())))

    def step(self, plan: Plan, batch: torch.Tensor | None, items: list[dict[str, Any]]
             ) -> Any:
        if batch is None:
            return None
        outputs = ["", *(x.name for x in self.layers)]  # "": the model's output, for top-5
        inputs = [x.name for x in [*self.pools, *self.kernels, *self.taps]]
        got = trace(self.model, batch, outputs, inputs)
        logits = got.outputs.pop("").float()
        return got, (logits if logits.dim() == 2 else None)  # the engine brings it to the host

    def write(self, plan: Plan, items: list[dict[str, Any]], stepped: Any
              ) -> list[tuple[int, dict[str, Any]]]:
        got, logits = stepped if stepped is not None else (None, None)
        return _write_batch(plan, items, got, logits)

    def describe(self, plan: Plan) -> str:
        refused = sum(1 for i in plan.mine if i in plan.skips)
        return (f"{plan.label}{plan.loaded.arch} ({plan.loaded.weights}) · {len(plan.mine)} "
                f"input(s), {len(plan.finished)} already done · {len(self.layers)} layer(s) · "
                f"at most {decimal(self.image_bytes * (plan.pending + refused))} to write")


def plan_dump(o: DumpOptions) -> Plan:
    """Plan a dump (see `jobs.engine.plan_job`)."""
    return plan_job(o, Dump())


def run_dump(plan: Plan, on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run a planned dump; returns its manifest (OUT/manifest.json, or this shard's until
    the last shard merges them)."""
    result: Result = run_job(plan, on_progress)
    return result.manifest


def _dump(plan: Plan) -> Dump:
    job = plan.job
    assert isinstance(job, Dump)
    return job


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
    files = _dump(plan).layout.files()
    if not all(png_complete(folder / f) if f.endswith(".png") else (folder / f).is_file()
               for f in files):
        return None
    sha = None
    top5 = None
    for f in _dump(plan).layout.tensor_files():
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
                written: list[str], key: str
                ) -> tuple[list[TensorSpec], Iterator[tuple[str, torch.Tensor]]]:
    """Specs and a chunk stream for kernels/taps; PNGs of the first filters are drawn from the
    same chunks as they pass, so nothing is computed twice."""
    from convmaps import render
    from convmaps.core import decompose

    convs = _dump(plan).kernels if kind == "kernels" else _dump(plan).taps
    capped = dict(_dump(plan).layout.kernels if kind == "kernels" else _dump(plan).layout.taps)
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
            conv = _dump(plan).host_convs[layer.name]
            n_png = capped[layer.name] if _dump(plan).layout.png else 0
            for filters, chunk in chunker(conv, x[layer.name], chunk_bytes, dtype):
                for o in range(filters.start, min(filters.stop, n_png)):
                    pic = render.draw(kind, chunk[o - filters.start].float(),
                                      png_scale=plan.options.png_scale,
                                      title=_title(plan, layer.name, key, f"filter {o}"))
                    rel = _dump(plan).layout.filter_png(kind, layer.name, o)
                    write_bytes(folder / rel, pic.png(), sync=False)
                    written.append(rel)
                yield layer.name, chunk
            if conv.bias is not None:
                yield f"{layer.name}.bias", conv.bias.detach().to(dtype)

    return specs, stream()


def _write_image(plan: Plan, src: ImageSource, sha: str, got: Trace, i: int,
                 predictions: list[dict[str, Any]] | None) -> list[str]:
    """Every output file of one image (row i of the batch); returns their relative paths."""
    from convmaps import render
    from convmaps.core import pooling

    folder = plan.out / src.key
    lay = _dump(plan).layout
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
                              classes=_dump(plan).categories if k == named else None,
                              title=_title(plan, k, src.key))
            write_bytes(folder / lay.activation_png(k), pic.png(), sync=False)
            written.append(lay.activation_png(k))
    if lay.switches:
        pools = {x.name: x.module for x in _dump(plan).pools}
        sw = {}
        for key in lay.switches:
            pool = pools[key.split("@")[0]]
            assert isinstance(pool, nn.MaxPool2d)
            sw[key] = pooling.switches(pool, got.inputs[key][i])
        save_tensors(folder / layout.SWITCHES, sw, _metadata(plan, src, sha, [*sw]), sync=False)
        written.append(layout.SWITCHES)
    convs_in = {k: v[i] for k, v in got.inputs.items()}
    for kind, name, convs in (("kernels", layout.KERNELS, _dump(plan).kernels),
                              ("taps", layout.TAPS, _dump(plan).taps)):
        if convs:
            specs, stream = _decomposed(plan, kind, convs_in, folder, written, src.key)
            meta = _metadata(plan, src, sha, [s.name for s in specs])
            write_safetensors(folder / name, specs, stream, meta, sync=False)
            written.append(name)
    acts = {k: got.outputs[k][i].to(dtype) for k in lay.activations}
    meta = _metadata(plan, src, sha, [*acts])
    if predictions is not None:
        meta[_PREDICTIONS] = json.dumps(predictions)
    save_tensors(folder / layout.ACTIVATIONS, acts, meta, sync=False)
    written.append(layout.ACTIVATIONS)
    assert sorted(written) == lay.files(), "layout and writer disagree"
    return sorted(written)


def _title(plan: Plan, module: str, key: str, *more: str) -> str:
    """A dump PNG's title line: model, module, image (and which filter)."""
    return " · ".join((plan.loaded.arch, module, key, *more))


def _classifier_key(plan: Plan, got: Trace, i: int) -> str | None:
    """The activation whose PNG names its classes: the last one (in the dump's layer order)
    with one value per class name, which is the model's output when it is selected."""
    job = _dump(plan)
    if not job.categories:
        return None
    n = len(job.categories)
    return next((k for k in reversed(job.layout.activations)
                 if got.outputs[k][i].numel() == n), None)


def _write_batch(plan: Plan, items: list[dict[str, Any]], got: Trace | None,
                 logits: torch.Tensor | None) -> list[tuple[int, dict[str, Any]]]:
    """All files of one batch (runs on a writer thread); returns manifest entries."""

    def write_one(row: int, it: dict[str, Any]) -> dict[str, Any]:
        assert got is not None
        predictions = top5(logits[row], _dump(plan).categories) if logits is not None else None
        files = _write_image(plan, plan.sources[it["index"]], it["sha256"], got, row,
                             predictions)
        return plain_entry(plan, it, files, predictions)

    return per_image(plan, items, write_one)


