"""The `topk` job: per module and channel, the k images of a data set whose maximum over space
is largest (`core.ranking` keeps the running table), then their boxes, projections and figures.

Files go under `OUT/topk/`, names from `io.layout.TopkLayout`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.filesize import decimal
from torch import Tensor

from convmaps import __version__
from convmaps.core.capture import Kind, layer_table, meta_trace, modules_run, select, trace
from convmaps.core.models import LoadedModel, load_model, normalisation
from convmaps.core.ranking import TopK, combine, crop, empty, positions, update
from convmaps.errors import ConvmapsError
from convmaps.io import layout
from convmaps.io import manifest as manifests
from convmaps.io.images import ImageSource
from convmaps.io.layout import TopkLayout
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
    image_loader,
    inputs_id,
    layer_rows,
    memory_format,
    model_identity,
    resolve_shard,
    run_device,
    threads,
)
from convmaps.options import Mode, TopkOptions

__all__ = ["NO_PROJECTION", "TopkPlan", "describe", "plan_topk", "run_topk"]

NO_PROJECTION = "none"  # `--project none`
_OVERVIEW_PX = 64  # tiles of a module's overview PNG are at most this many pixels a side
_PROJECT_ENTRIES = 64  # top-k entries projected together (decoded images held at once)
_CACHE_BYTES = 256 << 20  # decoded winners kept for the next channels (they recur)


# --- planning ---------------------------------------------------------------------------------


@dataclass
class TopkPlan:
    """What a topk run will do, decided before any image is decoded."""

    options: TopkOptions
    loaded: LoadedModel
    keys: list[str]  # module names, model order
    shapes: dict[str, tuple[int, ...]]  # each module's output for one image
    sizes: dict[str, tuple[int, int]]  # each module's receptive-field size (bh, bw)
    sources: list[ImageSource]
    layout: TopkLayout
    fingerprint: str
    header: dict[str, Any]
    reprs: dict[str, str]
    shard: tuple[int, int] = (0, 1)
    batches: list[list[int]] = field(default_factory=list)
    done: dict[str, Any] | None = None  # the manifest of a finished identical run

    @property
    def folder(self) -> Path:
        return Path(self.options.out) / layout.TOPK

    @property
    def mine(self) -> list[int]:
        return [i for b in self.batches for i in b]

    @property
    def mode(self) -> str | None:
        return None if self.options.project == NO_PROJECTION else self.options.project


def _check_options(o: TopkOptions) -> None:
    check_bounds(o, (("k", 1), ("batch_size", 1), ("workers", 0), ("png_cap", 0),
                     ("threads", 1)))
    if o.project != NO_PROJECTION and o.project not in Mode.__members__:
        raise ConvmapsError(f"--project {o.project!r}: choose "
                            f"{', '.join(Mode.__members__)} or {NO_PROJECTION}")
    parse_bytes(o.max_bytes)
    check_device(o.device)


def plan_topk(o: TopkOptions) -> TopkPlan:
    """Load the model, resolve layers, inputs and receptive fields, claim `OUT/topk/`, find
    finished work and check the size, all before any image is decoded."""
    from convmaps.core.fields import fields

    _check_options(o)
    loaded = load_model(o.model, o.weights, o.arch)
    model = loaded.model
    input_shape = (loaded.in_channels, *loaded.input_size)
    table = layer_table(model, input_shape)
    chosen = select(model, o.layers or Kind.conv.value, ran=modules_run(model, input_shape))
    if not chosen:
        raise ConvmapsError("--layers: nothing selected that runs in eval mode")
    keys = [x.name for x in chosen]
    # a module called twice per pass ranks its first call, the one its name means
    traced = meta_trace(model, input_shape, keys).outputs
    shapes = {k: tuple(traced[k].shape[1:]) for k in keys}
    for key, shape in shapes.items():
        if len(shape) not in (1, 3):
            raise ConvmapsError(f"--layers: {key} gives {tuple(shape)} per image; topk ranks "
                                "(C, H, W) maps or 1-D outputs")
    found = fields(model, input_shape, strict=False)
    missing = [k for k in keys if len(shapes[k]) == 3 and k not in found]
    if missing:
        raise ConvmapsError(f"--layers: no receptive field known for {', '.join(missing)}")
    sizes = {k: found[k].size if len(shapes[k]) == 3 else loaded.input_size for k in keys}
    lay = TopkLayout(tuple(keys), tuple(min(o.png_cap, shapes[k][0]) for k in keys), o.png)
    what = {**model_identity(loaded), "layout": [lay.modules, lay.png_caps, lay.png],
            "k": o.k, "project": o.project,
            # batches fix which images are computed together: the low bits of every value
            "batch_size": o.batch_size, "memory": str(memory_format(torch.device(o.device)))}
    fingerprint = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(o.out)
    folder = out / layout.TOPK
    claim(folder, fingerprint, o.resume, remove=_remove_topk, what="a top-k",
          shards=resolve_shard(o.shard)[1])
    # output clashes concern image folders, which topk does not write
    sources, _ = find_sources(o.inputs, loaded.arch, out, _dump_keys(out))
    header = {
        "convmaps": __version__, "model": loaded.arch, "weights": loaded.weights,
        "preprocessing": repr(loaded.preprocess), "input_size": list(loaded.input_size),
        "options": {"layers": o.layers, "k": o.k, "project": o.project, "png": o.png,
                    "png_cap": o.png_cap, "batch_size": o.batch_size, "max_bytes": o.max_bytes},
        "run": fingerprint, "inputs_id": inputs_id(sources), "layers": layer_rows(table, found),
        "modules": keys,
    }
    plan = TopkPlan(o, loaded, keys, shapes, sizes, sources, lay, fingerprint, header,
                    {name: repr(m) for name, m in model.named_modules() if name},
                    shard=resolve_shard(o.shard))
    plan.batches = batches(len(sources), o.batch_size, plan.shard)
    plan.done = _finished(plan)
    if plan.done is None:
        need = _result_bytes(plan)
        check_room(need, f"top-{o.k} of {len(keys)} module(s)", o.max_bytes, folder,
                   "lower --k, pick fewer --layers, or use --project none or --no-png")
    return plan


def _dump_keys(out: Path) -> set[str]:
    """The image folders of a dump in OUT (their PNGs are no inputs)."""
    try:
        m = manifests.read(out)
    except ConvmapsError:
        return set()
    return {e["key"] for e in m["inputs"]} if m else set()


def _remove_topk(folder: Path, m: dict[str, Any]) -> None:
    # OUT/topk is convmaps' own folder: every name a top-k run writes there is its
    clear_folder(folder.parent, folder.name, set(), layout.is_topk_output)


def _result_bytes(plan: TopkPlan) -> int:
    """An upper bound of the final files: tensors exactly, PNGs at their raw size."""
    from convmaps import render

    k = min(plan.options.k, len(plan.sources))
    total = 0
    for key, cap in zip(plan.keys, plan.layout.png_caps, strict=True):
        c = plan.shapes[key][0]
        bh, bw = plan.sizes[key]
        per_entry = 4 + 8 + 16 + 32 + (4 * plan.loaded.in_channels * bh * bw if plan.mode else 0)
        total += c * k * per_entry + 4096
        if plan.layout.png:
            total += cap * render.topk_png_bound(k, bh, bw) + render.topk_png_bound(c, 64, 64)
    return total


def _finished(plan: TopkPlan) -> dict[str, Any] | None:
    """The manifest of an identical finished run whose files are all whole, else None."""
    try:
        m = manifests.read(plan.folder)
    except ConvmapsError:
        return None
    if m is None or not m.get("finished") or any(
            m.get(k) != plan.header[k] for k in ("run", "inputs_id")):
        return None
    for f in plan.layout.files():
        path = plan.folder / f
        if f.endswith(".png") and not png_complete(path):
            return None
        if f.endswith(".safetensors") and (read_metadata(path) or {}).get("run") != \
                plan.fingerprint:
            return None
    return m


# --- the streaming pass -----------------------------------------------------------------------


@dataclass
class _State:
    """One shard's partial top-k, its checkpoint: entries of the images seen and how many of its
    batches are done."""

    tops: dict[str, TopK]
    entries: dict[int, dict[str, Any]]
    done: int = 0
    finished: bool = False


def _fresh(plan: TopkPlan) -> _State:
    return _State({k: empty(plan.shapes[k][0]) for k in plan.keys}, {})


def _save_state(plan: TopkPlan, state: _State, shard: tuple[int, int]) -> None:
    tensors = {f"{key}/{part}": getattr(t, part) for key, t in state.tops.items()
               for part in ("values", "images", "flat")}
    meta = {"run": plan.fingerprint, "inputs_id": plan.header["inputs_id"],
            "batches_done": str(state.done), "finished": str(state.finished),
            "entries": json.dumps(sorted(state.entries.items()))}
    save_tensors(plan.folder / plan.layout.state_file(*shard), tensors, meta)


def _load_state(plan: TopkPlan, shard: tuple[int, int]) -> _State | None:
    """A shard's saved partial top-k when it belongs to this run, else None."""
    from safetensors import SafetensorError, safe_open

    path = plan.folder / plan.layout.state_file(*shard)
    meta = read_metadata(path)
    if meta is None or meta.get("run") != plan.fingerprint or \
            meta.get("inputs_id") != plan.header["inputs_id"]:
        return None
    try:
        with safe_open(str(path), "pt") as f:
            tops = {key: TopK(*(f.get_tensor(f"{key}/{p}") for p in ("values", "images", "flat")))
                    for key in plan.keys}
        entries = {int(i): e for i, e in json.loads(meta["entries"])}
        return _State(tops, entries, int(meta["batches_done"]), meta["finished"] == "True")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return None


def _write_manifest(plan: TopkPlan, entries: dict[int, dict[str, Any]], pending: bool
                    ) -> dict[str, Any]:
    by_key = manifests.listed(plan.sources, plan.mine, entries, [] if pending else None)
    m = manifests.build(plan.header, manifests.ordered(by_key, (s.key for s in plan.sources)))
    write_json(plan.folder / layout.shard_manifest(*plan.shard), m)
    return m


def _entry(plan: TopkPlan, item: dict[str, Any]) -> dict[str, Any]:
    src = plan.sources[item["index"]]
    if item["tensor"] is None:
        return manifests.entry(src.key, str(src.path), None, f"skipped: {item['reason']}", [])
    return manifests.entry(src.key, str(src.path), item["sha256"], "ok", [])


def run_topk(plan: TopkPlan, on_progress: Callable[[int], None] | None = None
             ) -> dict[str, Any]:
    """Run the planned top-k: stream this shard's batches, checkpointing the partial top-k,
    then (the last shard to finish, or the only process) write the results. Returns the
    manifest (OUT/topk/manifest.json, or this shard's until the last one merges them).

    The plan's model is moved to the device (channels-last on the CPU) and left there.
    """
    if plan.done is not None:
        if on_progress:
            on_progress(len(plan.mine))
        return plan.done
    o = plan.options
    device = run_device(o.device)
    memory = memory_format(device)
    model = plan.loaded.model.to(device).to(memory_format=memory)
    state = _load_state(plan, plan.shard) if o.resume else None
    state = state or _fresh(plan)
    _write_manifest(plan, state.entries, pending=True)  # claims OUT/topk before any result
    if on_progress and state.done:
        on_progress(sum(len(b) for b in plan.batches[:state.done]))
    loader = image_loader(DecodedImages(plan.sources, plan.loaded.preprocess, {}),
                          plan.batches[state.done:], o.workers, device)
    saved = time.monotonic()
    with threads(o.threads):
        for items in loader:
            good = [it for it in items if it["tensor"] is not None]
            if good:
                batch = torch.stack([it["tensor"] for it in good])
                got = trace(model, batch.to(device, non_blocking=True, memory_format=memory),
                            plan.keys).outputs
                index = torch.tensor([it["index"] for it in good])
                for key in plan.keys:
                    state.tops[key] = update(state.tops[key], got[key], index, o.k)
            state.entries.update({it["index"]: _entry(plan, it) for it in items})
            state.done += 1
            if time.monotonic() - saved >= o.checkpoint_seconds:
                _save_state(plan, state, plan.shard)
                saved = time.monotonic()
            if on_progress:
                on_progress(len(items))
        state.finished = True
        _save_state(plan, state, plan.shard)
        return _finish(plan, state, model)


def _finish(plan: TopkPlan, state: _State, model: torch.nn.Module) -> dict[str, Any]:
    """This shard's manifest; when every shard's partial top-k is final, the merged results.
    No shard ever waits for another."""
    manifest = _write_manifest(plan, state.entries, pending=False)
    index, count = plan.shard
    states = [state if i == index else _load_state(plan, (i, count)) for i in range(count)]
    if not all(s is not None and s.finished for s in states):
        return manifest
    if count > 1:
        merged = manifests.merge(plan.folder, plan.header, count,
                                 (s.key for s in plan.sources), [])
        if merged is None:
            return manifest
        manifest = merged
    tops = {key: combine([s.tops[key] for s in states if s is not None], plan.options.k)
            for key in plan.keys}
    _write_results(plan, tops, manifest, model)
    for i in range(count):
        (plan.folder / plan.layout.state_file(i, count)).unlink(missing_ok=True)
    with suppress(OSError):
        (plan.folder / plan.layout.partial).rmdir()
    fsync_dir(plan.folder)
    return manifest


# --- results: boxes, projections, figures -----------------------------------------------------


def _write_results(plan: TopkPlan, tops: dict[str, TopK], manifest: dict[str, Any],
                   model: torch.nn.Module) -> None:
    """Every module's file and figures from the merged top-k; the winners' images are decoded
    again (their sha256 checked against the manifest) for projections and patches."""
    from convmaps.core.fields import fields

    loaded = plan.loaded
    c_in, (h, w) = loaded.in_channels, loaded.input_size
    geometry = fields(loaded.model, (c_in, h, w), strict=False)
    images = _Winners(plan, manifest)
    for key in plan.keys:
        top = tops[key]
        spatial = len(plan.shapes[key]) == 3
        pos = positions(top.flat, plan.shapes[key][2]) if spatial else None
        boxes = (geometry[key].boxes(pos) if pos is not None
                 else torch.tensor([0, 0, h, w]).expand(*top.values.shape, 4).contiguous())
        tensors: dict[str, Tensor] = {"values": top.values, "images": top.images}
        if pos is not None:
            tensors["positions"] = pos
        tensors["boxes"] = boxes
        specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
        size = plan.sizes[key]
        if plan.mode:
            specs.append(TensorSpec("projections", torch.float32, (*top.values.shape, c_in, *size)))
        meta = {"convmaps": __version__, "model": loaded.arch, "weights": loaded.weights,
                "run": plan.fingerprint, "module": key, f"module.{key}": plan.reprs[key],
                "k": str(top.k), "mode": plan.options.project}
        chunks = _chunks(plan, key, top, pos, boxes, size, images, model)
        write_safetensors(plan.folder / plan.layout.module_file(key), specs,
                          _then(tensors.items(), chunks), meta)


def _then(first: Any, rest: Iterator[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    yield from first
    yield from rest


class _Winners:
    """The winners' input tensors and pictures, decoded again on demand (bounded caches: images
    recur across channels) and checked against the manifest's sha256."""

    def __init__(self, plan: TopkPlan, manifest: dict[str, Any]):
        self.plan = plan
        self.data = DecodedImages(plan.sources, plan.loaded.preprocess, {})
        self.sha = {i: e.get("sha256") for i, e in enumerate(manifest["inputs"])}
        self.mean, self.std = normalisation(plan.loaded.preprocess)
        c, (h, w) = plan.loaded.in_channels, plan.loaded.input_size
        room = max(1, _CACHE_BYTES // (4 * c * h * w))
        self.tensor = functools.lru_cache(maxsize=room)(self._decode)
        self.picture = functools.lru_cache(maxsize=room)(self._picture)

    def _decode(self, i: int) -> Tensor:
        item = self.data[i]
        if item["tensor"] is None or item["sha256"] != self.sha.get(i):
            raise ConvmapsError(
                f"{self.plan.sources[i].path} changed since it was ranked (sha256 differs); "
                "run the same command with --overwrite"
            )
        tensor: Tensor = item["tensor"]
        return tensor

    def _picture(self, i: int) -> Tensor:
        from convmaps import render

        return render.picture(self.tensor(i), self.mean, self.std)


def _chunks(plan: TopkPlan, key: str, top: TopK, pos: Tensor | None, boxes: Tensor,
            size: tuple[int, int], images: _Winners, model: torch.nn.Module
            ) -> Iterator[tuple[str, Tensor]]:
    """The `projections` tensor in channel chunks, with each channel's figure drawn as its
    chunk passes (and the module's overview at the end): nothing is projected twice."""
    from convmaps import render

    cap = dict(zip(plan.keys, plan.layout.png_caps, strict=True))[key] if plan.layout.png else 0
    channels, k = top.values.shape
    if not plan.mode and not plan.layout.png:
        return
    def patch(c: int, r: int) -> Tensor:
        seen = images.picture(int(top.images[c, r]))
        return crop(seen, boxes[c, r].tolist(), size, 128)  # grey outside the image

    tiles = []
    step = max(1, _PROJECT_ENTRIES // max(k, 1))
    for c0 in range(0, channels, step):
        rows = range(c0, min(c0 + step, channels))
        maps = _projections(plan, key, top, pos, boxes, size, images, model, rows) \
            if plan.mode else None
        if maps is not None:
            yield "projections", maps
        for c in rows:
            if not plan.layout.png or k == 0:
                continue
            if c < cap:
                patches = torch.stack([patch(c, r) for r in range(k)])
                img = render.topk_figure(patches, maps[c - c0] if maps is not None else None,
                                         top.values[c].tolist())
                write_bytes(plan.folder / plan.layout.channel_png(key, c),
                            render.png_bytes(img), sync=False)
            tiles.append(render.shrink(patch(c, 0), _OVERVIEW_PX))
    if plan.layout.png:
        img = render.topk_overview(torch.stack(tiles) if tiles else torch.empty(0, 3, 1, 1))
        write_bytes(plan.folder / plan.layout.module_png(key), render.png_bytes(img), sync=False)


def _projections(plan: TopkPlan, key: str, top: TopK, pos: Tensor | None, boxes: Tensor,
                 size: tuple[int, int], images: _Winners, model: torch.nn.Module,
                 rows: range) -> Tensor:
    """Projections of channels `rows`' entries, cropped to their boxes: (len(rows), k, C_in,
    bh, bw). Each winner's value is computed again and must match the recorded one."""
    from convmaps.core.deconv import Unit, project_each

    k = top.k
    pairs = [(c, r) for c in rows for r in range(k)]
    units = [Unit(key, c, None if pos is None else (int(pos[c, r, 0]), int(pos[c, r, 1])))
             for c, r in pairs]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = torch.stack([images.tensor(int(top.images[c, r])) for c, r in pairs]).to(device)
    got = project_each(model, batch, units, Mode(plan.options.project), plan.options.batch_size)
    values = top.values[rows.start:rows.stop]
    scale = float(values.abs().max()) if values.numel() else 0.0
    out = torch.zeros(len(rows), k, plan.loaded.in_channels, *size)
    for (c, r), p in zip(pairs, got, strict=True):
        recorded = float(top.values[c, r])
        if not math.isclose(p.value, recorded, rel_tol=1e-3, abs_tol=1e-3 * max(scale, 1e-6)):
            src = plan.sources[int(top.images[c, r])]
            raise ConvmapsError(
                f"{src.path}: {key}:{c} is {p.value:.6g} now but {recorded:.6g} when ranked (the "
                "image or the weights changed); run the same command with --overwrite"
            )
        out[c - rows.start, r] = crop(p.map.float().cpu(), boxes[c, r].tolist(), size, 0.0)
    return out


def describe(plan: TopkPlan) -> str:
    """One line: what the run will do."""
    index, count = plan.shard
    label = f"shard {index}/{count}: " if count > 1 else ""
    return (f"{label}{plan.loaded.arch} ({plan.loaded.weights}) · {len(plan.mine)} image(s) · "
            f"top-{plan.options.k} of {len(plan.keys)} module(s) · projections "
            f"{plan.options.project} · at most {decimal(_result_bytes(plan))} to write")
