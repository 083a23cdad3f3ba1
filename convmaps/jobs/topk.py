"""The `topk` job: per module and channel, the k images of a data set whose maximum over space
is largest (`core.ranking` keeps the running table), then their boxes, projections and figures.

Files go under `OUT/topk/`, names from `io.layout.TopkLayout`.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.filesize import decimal
from torch import Tensor

from convmaps import __version__
from convmaps.core.capture import Kind, LayerRow, Trace, modules_run, select, trace
from convmaps.core.fields import Field
from convmaps.core.models import LoadedModel, normalisation
from convmaps.core.ranking import TopK, combine, crop, empty, positions, update
from convmaps.errors import ConvmapsError
from convmaps.io import layout
from convmaps.io.layout import TopkLayout
from convmaps.io.store import (
    TensorSpec,
    write_bytes,
    write_safetensors,
)
from convmaps.jobs.engine import (
    DecodedImages,
    Job,
    Plan,
    Result,
    check_network,
    plain_entry,
    plan_job,
    run_job,
)
from convmaps.jobs.ownership import clear_folder
from convmaps.jobs.partial import (
    closing,
    dump_keys,
    entry_tensors,
    every_state,
    finished,
    load_state,
    read_entries,
    remove_states,
    save_state,
)
from convmaps.jobs.runtime import memory_format
from convmaps.options import DType, Mode, TopkOptions

__all__ = ["NO_PROJECTION", "Topk", "plan_topk", "run_topk"]

NO_PROJECTION = "none"  # `--project none`
_OVERVIEW_PX = 64  # tiles of a module's overview PNG are at most this many pixels a side
# top-k entries projected together: each distinct image among them runs forward once (images
# win for many channels), and at most this many are decoded and held at once
_PROJECT_ENTRIES = 128
_CACHE_BYTES = 256 << 20  # decoded winners kept for the next channels (they recur)
# `--explain`: each entry's tree, as `convmaps explain --depth 2 --top 3` makes it, listing at
# most 8 terms a node (the rest summed): about 20 kB a tree, bounded by _TREE_BYTES
_EXPLAIN_DEPTH, _EXPLAIN_TOP, _EXPLAIN_LISTED, _TREE_BYTES = 2, 3, 8, 64_000


# --- planning ---------------------------------------------------------------------------------


class Topk(Job):
    """Top-k: streams every batch's maxima into a `(C, k)` table per module (on the device),
    checkpointed; once every shard is done, boxes, projections and figures of the winners."""

    name = "topk"
    what = "a top-k"
    bounds = (("k", 1), ("png_cap", 0))

    def folder(self, out: Path) -> Path:
        return out / layout.TOPK

    def prepare(self, o: TopkOptions, loaded: LoadedModel, table: list[LayerRow],
                fields: dict[str, Field], traced: Trace) -> None:
        if o.project != NO_PROJECTION and o.project not in Mode.__members__:
            raise ConvmapsError(f"--project {o.project!r}: choose "
                                f"{', '.join(Mode.__members__)} or {NO_PROJECTION}")
        model = loaded.model
        input_shape = (loaded.in_channels, *loaded.input_size)
        chosen = select(model, Kind.conv.value if o.layers is None else o.layers,
                        ran=modules_run(model, input_shape, traced))
        keys = [x.name for x in chosen]
        # a module called twice per pass ranks its first call, the one its name means
        shapes = {k: tuple(traced.outputs[k].shape[1:]) for k in keys}
        for key, shape in shapes.items():
            if len(shape) not in (1, 3):
                raise ConvmapsError(f"--layers: {key} gives {tuple(shape)} per image; topk "
                                    "ranks (C, H, W) maps or 1-D outputs")
        missing = [k for k in keys if len(shapes[k]) == 3 and k not in fields]
        if missing:
            raise ConvmapsError(f"--layers: no receptive field known for {', '.join(missing)}")
        self.options = o
        self.keys = keys
        self.shapes = shapes
        self.fields = fields
        self.sizes = {k: fields[k].size if len(shapes[k]) == 3 else loaded.input_size
                      for k in keys}
        self.layout = TopkLayout(tuple(keys), tuple(min(o.png_cap, shapes[k][0]) for k in keys),
                                 o.png, tuple(shapes[k][0] for k in keys) if o.explain else ())
        if o.explain:  # a model explain cannot take apart: one line now, not after ranking
            from convmaps.core.deconv import Unit
            from convmaps.core.explain import explainable

            for key in keys:
                explainable(model, Unit(key, 0, (0, 0) if len(shapes[key]) == 3 else None))
        self.mode = None if o.project == NO_PROJECTION else o.project
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # NaN never ranks: every later check would blame the images
            raise ConvmapsError(f"the weights hold NaN or inf ({', '.join(bad[:3])}); top-k "
                                "cannot rank their outputs")
        self.state: _State | None = None

    def fingerprint(self) -> dict[str, Any]:
        o, lay = self.options, self.layout
        return {"layout": [lay.modules, lay.png_caps, lay.png], "k": o.k, "project": o.project,
                "dtype": str(o.dtype), "explain": o.explain,
                # batches fix which images are computed together: the low bits of every value
                "batch_size": o.batch_size,
                "memory": str(memory_format(torch.device(o.device)))}

    def header(self) -> dict[str, Any]:
        return {"modules": self.keys}

    def remove(self, folder: Path, m: dict[str, Any]) -> None:
        _remove_topk(folder, m)

    def neighbours(self, out: Path, loaded: LoadedModel, resume: bool) -> None:
        check_network(out, loaded, "a top-k", own=[(layout.TOPK, layout.MANIFEST)])

    def ours(self, out: Path, earlier: list[dict[str, Any]]) -> set[str]:
        return dump_keys(out)  # topk writes no image folders: a dump's are no inputs

    def done(self, plan: Plan) -> dict[str, Any] | None:
        return finished(plan, self.layout.files())

    def resume(self, plan: Plan) -> dict[int, dict[str, Any]]:
        self.state = _load_state(plan, plan.shard)
        return dict(self.state.entries) if self.state else {}

    def bytes(self, plan: Plan) -> tuple[int, str, str]:
        return (_result_bytes(plan), f"top-{self.options.k} of {len(self.keys)} module(s)",
                "lower --k, pick fewer --layers, or use --project none or --no-png")

    def start(self, plan: Plan, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        if self.state is None:
            self.state = _State({k: empty(self.shapes[k][0]) for k in self.keys}, {})
        # the running top-k stays on the device and merges there
        self.state.tops = {k: top.to(device) for k, top in self.state.tops.items()}
        self.saved = time.monotonic()

    def step(self, plan: Plan, batch: torch.Tensor | None, items: list[dict[str, Any]]
             ) -> None:
        state = self.state
        assert state is not None
        if batch is not None:
            got = trace(self.model, batch, self.keys).outputs
            index = torch.tensor([it["index"] for it in items if it["tensor"] is not None],
                                 device=batch.device)
            for key in self.keys:
                state.tops[key] = update(state.tops[key], got[key], index, self.options.k)
        state.entries.update({it["index"]: plain_entry(plan, it) for it in items})
        state.done += 1
        if time.monotonic() - self.saved >= self.options.checkpoint_seconds:
            _save_state(plan, state, plan.shard)
            self.saved = time.monotonic()

    def end(self, plan: Plan) -> None:
        assert self.state is not None
        self.state.finished = True
        _save_state(plan, self.state, plan.shard)

    def finish(self, plan: Plan, manifest: dict[str, Any]) -> None:
        """Every shard's partial top-k merged, and the results written."""
        assert self.state is not None
        states = every_state(plan, manifest, self.state, _load_state, "rank")
        if states is None:
            return
        tops = {key: combine([s.tops[key].to("cpu") for s in states],
                             self.options.k) for key in self.keys}
        _write_results(plan, tops, manifest, self.model)
        remove_states(plan.folder)

    def describe(self, plan: Plan) -> str:
        return (f"{plan.label}{plan.loaded.arch} ({plan.loaded.weights}) · {len(plan.mine)} "
                f"input(s) · top-{self.options.k} of {len(self.keys)} module(s) · projections "
                f"{self.options.project} · at most {decimal(_result_bytes(plan))} to write")

    def closing(self, plan: Plan, result: Result) -> str:
        return closing(plan, result, f"top-{self.options.k} of {len(self.keys)} module(s)",
                       "ranked")


def plan_topk(o: TopkOptions) -> Plan:
    """Plan a top-k run (see `jobs.engine.plan_job`)."""
    return plan_job(o, Topk())


def run_topk(plan: Plan, on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run a planned top-k; returns its manifest (OUT/topk/manifest.json, or this shard's
    until the last one merges them)."""
    return run_job(plan, on_progress).manifest


def _topk(plan: Plan) -> Topk:
    job = plan.job
    assert isinstance(job, Topk)
    return job


def _remove_topk(folder: Path, m: dict[str, Any]) -> None:
    # OUT/topk is convmaps' own folder: every name a top-k run writes there is its
    clear_folder(folder.parent, folder.name, set(), layout.is_topk_output)


def _result_bytes(plan: Plan) -> int:
    """An upper bound of the final files: tensors exactly, PNGs at their raw size."""
    t = _topk(plan)
    from convmaps import render

    k = min(plan.options.k, len(plan.sources))
    total = 0
    for key, cap in zip(t.keys, t.layout.png_caps, strict=True):
        c = t.shapes[key][0]
        bh, bw = t.sizes[key]
        item = DType(plan.options.dtype).torch.itemsize
        per_entry = 4 + 8 + 16 + 32 + (item * plan.loaded.in_channels * bh * bw if t.mode else 0)
        total += c * k * per_entry + 4096
        if plan.options.explain:
            total += c * (k * _TREE_BYTES + 4096)
        if t.layout.png:
            total += cap * render.topk_png_bound(k, bh, bw) + render.topk_png_bound(c, 64, 64)
    return total


# --- the streaming pass -----------------------------------------------------------------------


@dataclass
class _State:
    """One shard's partial top-k, its checkpoint: entries of the images seen and how many of its
    batches are done."""

    tops: dict[str, TopK]
    entries: dict[int, dict[str, Any]]
    done: int = 0
    finished: bool = False


def _save_state(plan: Plan, state: _State, shard: tuple[int, int]) -> None:
    """A shard's checkpoint: the partial top-k and its images' entries as tensors (40 bytes an
    image, whatever their number: the header stays small), skip reasons as JSON bytes."""
    tensors = {f"{key}/{part}": getattr(top, part).cpu() for key, top in state.tops.items()
               for part in ("values", "images", "flat")}  # a checkpoint's copy, not a batch's
    tensors.update(entry_tensors(state.entries))
    save_state(plan, shard, tensors, {"batches_done": str(state.done),
                                      "finished": str(state.finished)})


def _load_state(plan: Plan, shard: tuple[int, int]) -> _State | None:
    """A shard's saved partial top-k when it belongs to this run (see `partial.load_state`)."""
    t = _topk(plan)

    def parse(got: dict[str, Tensor], meta: dict[str, str]) -> _State:
        tops = {key: TopK(*(got[f"{key}/{p}"] for p in ("values", "images", "flat")))
                for key in t.keys}
        _check_tops(plan, tops)
        entries = read_entries(plan, got)
        done, count = int(meta["batches_done"]), math.ceil(len(plan.sources) / t.options.batch_size)
        if not 0 <= done <= count:
            raise ValueError(f"{done} batches done of {count}")
        return _State(tops, entries, done, meta["finished"] == "True")

    return load_state(plan, shard, "top-k", parse)


def _check_tops(plan: Plan, tops: dict[str, TopK]) -> None:
    """A checkpoint's tables hold this run's channels, at most k entries, indices in range."""
    t = _topk(plan)
    for key, top in tops.items():
        c = t.shapes[key][0]
        cells = math.prod(t.shapes[key][1:]) if len(t.shapes[key]) == 3 else 1
        shape = tuple(top.values.shape)
        if len(shape) != 2 or shape[0] != c or shape[1] > t.options.k or any(
                tuple(x.shape) != shape for x in (top.images, top.flat)):
            raise ValueError(f"{key} has tables of shape {shape}, not ({c}, <= {t.options.k})")
        if top.values.dtype != torch.float32 or top.images.dtype != torch.int64 or \
                top.flat.dtype != torch.int64:
            raise ValueError(f"{key} has tables of dtypes other than float32 and int64")
        if top.images.numel() and not (int(top.images.min()) >= 0 and
                                       int(top.images.max()) < len(plan.sources)):
            raise ValueError(f"{key} names images outside the {len(plan.sources)} inputs")
        if top.flat.numel() and not (int(top.flat.min()) >= 0 and int(top.flat.max()) < cells):
            raise ValueError(f"{key} names positions outside its maps")


# --- results: boxes, projections, figures -----------------------------------------------------


def _write_results(plan: Plan, tops: dict[str, TopK], manifest: dict[str, Any],
                   model: torch.nn.Module) -> None:
    """Every module's file and figures from the merged top-k; the winners' images are decoded
    again (their sha256 checked against the manifest) for projections and patches."""
    t = _topk(plan)
    loaded = plan.loaded
    c_in, (h, w) = loaded.in_channels, loaded.input_size
    geometry = t.fields
    images = _Winners(plan, manifest)
    total, done = sum(int(tops[k].values.shape[0]) for k in t.keys), 0

    def tick(n: int) -> None:  # units whose projections and figures are written
        nonlocal done
        done += n
        if plan.on_phase:
            plan.on_phase("projections" if t.mode else "figures", done, total)

    for key in t.keys:
        top = tops[key]
        spatial = len(t.shapes[key]) == 3
        pos = positions(top.flat, t.shapes[key][2]) if spatial else None
        boxes = (geometry[key].boxes(pos) if pos is not None
                 else torch.tensor([0, 0, h, w]).expand(*top.values.shape, 4).contiguous())
        tensors: dict[str, Tensor] = {"values": top.values, "images": top.images}
        if pos is not None:
            tensors["positions"] = pos
        tensors["boxes"] = boxes
        specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
        size = t.sizes[key]
        if t.mode:
            specs.append(TensorSpec("projections", DType(plan.options.dtype).torch,
                                    (*top.values.shape, c_in, *size)))
        meta = {"convmaps": __version__, "model": loaded.arch, "weights": loaded.weights,
                "run": plan.fingerprint, "module": key, f"module.{key}": plan.reprs[key],
                "k": str(top.k), "mode": plan.options.project, "dtype": str(plan.options.dtype)}
        chunks = _chunks(plan, key, top, pos, boxes, size, images, model, tick)
        write_safetensors(plan.folder / t.layout.module_file(key), specs,
                          _then(tensors.items(), chunks), meta)
    if plan.options.explain:
        _explain_all(plan, tops, images, model, manifest)


def _same_value(plan: Plan, key: str, c: int, r: int, value: float, top: TopK) -> None:
    """Refuse a winner whose unit computes to another value now than when it was ranked (its
    image or the weights changed): its projection or tree would not be of the ranked entry."""
    recorded = float(top.values[c, r])
    scale = float(top.values[c].abs().max())
    if not math.isclose(value, recorded, rel_tol=1e-3, abs_tol=1e-3 * max(scale, 1e-6)):
        src = plan.sources[int(top.images[c, r])]
        raise ConvmapsError(
            f"{src.path}: {key}:{c} is {value:.6g} now but {recorded:.6g} when ranked (the "
            "image or the weights changed); run the same command with --overwrite"
        )


def _explain_all(plan: Plan, tops: dict[str, TopK], images: _Winners, model: torch.nn.Module,
                 manifest: dict[str, Any]) -> None:
    """`explain/<module>/<channel>.json` for every unit: each of its k entries as an exact sum
    (depth 2, top 3), each root checked against the ranked value, and the unit's recipe: the
    lower units its trees go through, with how many of them do."""
    from convmaps.core.deconv import Unit
    from convmaps.core.explain import explain, explainable, recipe
    from convmaps.jobs.explain import node_record

    t = _topk(plan)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total, done = sum(int(tops[k].values.shape[0]) for k in t.keys), 0
    inputs = manifest["inputs"]
    for key in t.keys:
        top = tops[key]
        spatial = len(t.shapes[key]) == 3
        pos = positions(top.flat, t.shapes[key][2]) if spatial else None
        traced = explainable(model, Unit(key, 0))  # once a module (the model is in eval)
        for c in range(top.values.shape[0]):
            trees, entries = [], []
            for r in range(top.k):
                index = int(top.images[c, r])
                at = (int(pos[c, r, 0]), int(pos[c, r, 1])) if pos is not None else None
                with torch.inference_mode(False):
                    tree = explain(model, images.tensor(index).to(device), Unit(key, c, at),
                                   depth=_EXPLAIN_DEPTH, top=_EXPLAIN_TOP, traced=traced)
                _same_value(plan, key, c, r, tree.value, top)
                trees.append(tree)
                entries.append({"rank": r, "key": inputs[index]["key"],
                                "sha256": inputs[index].get("sha256"),
                                "tree": node_record(tree, _EXPLAIN_LISTED)})
            record = {"convmaps": __version__, "model": plan.loaded.arch,
                      "weights": plan.loaded.weights, "run": plan.fingerprint,
                      "unit": f"{key}:{c}", "depth": _EXPLAIN_DEPTH, "top": _EXPLAIN_TOP,
                      "recipe": [{"module": m, "channel": ch, "trees": n}
                                 for m, ch, n in recipe(trees)],
                      "entries": entries}
            data = json.dumps(record, indent=1, ensure_ascii=False).encode() + b"\n"
            write_bytes(plan.folder / t.layout.explain_file(key, c), data, sync=False)
            done += 1
            if plan.on_phase:
                plan.on_phase("explain", done, total)


def _then(first: Any, rest: Iterator[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    yield from first
    yield from rest


class _Winners:
    """The winners' input tensors and pictures, decoded again on demand (bounded caches: images
    recur across channels) and checked against the manifest's sha256."""

    def __init__(self, plan: Plan, manifest: dict[str, Any]):
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


def _chunks(plan: Plan, key: str, top: TopK, pos: Tensor | None, boxes: Tensor,
            size: tuple[int, int], images: _Winners, model: torch.nn.Module,
            tick: Callable[[int], None]) -> Iterator[tuple[str, Tensor]]:
    """The `projections` tensor in channel chunks, with each channel's figure drawn as its
    chunk passes (and the module's overview at the end): nothing is projected twice."""
    t = _topk(plan)
    from convmaps import render

    cap = dict(zip(t.keys, t.layout.png_caps, strict=True))[key] if t.layout.png else 0
    channels, k = top.values.shape
    if not t.mode and not t.layout.png:
        tick(channels)
        return

    def patch(c: int, r: int) -> Tensor:
        seen = images.picture(int(top.images[c, r]))
        return crop(seen, boxes[c, r].tolist(), size, 128)  # grey outside the image

    tiles = []
    step = max(1, _PROJECT_ENTRIES // max(k, 1))
    for c0 in range(0, channels, step):
        rows = range(c0, min(c0 + step, channels))
        maps = _projections(plan, key, top, pos, boxes, size, images, model, rows) \
            if t.mode else None
        if maps is not None:  # stored in --dtype; the figures draw the float32 maps
            yield "projections", maps.to(DType(plan.options.dtype).torch)
        for c in rows:
            if not t.layout.png or k == 0:
                continue
            if c < cap:
                patches = torch.stack([patch(c, r) for r in range(k)])
                img = render.topk_figure(patches, maps[c - c0] if maps is not None else None,
                                         top.values[c].tolist(),
                                         title=f"{plan.loaded.arch} · {key}:{c}")
                write_bytes(plan.folder / t.layout.channel_png(key, c),
                            render.png_bytes(img), sync=False)
            tiles.append(render.shrink(patch(c, 0), _OVERVIEW_PX))
        tick(len(rows))
    if t.layout.png:
        img = render.topk_overview(torch.stack(tiles) if tiles else torch.empty(0, 3, 1, 1),
                                   title=f"{plan.loaded.arch} · {key}")
        write_bytes(plan.folder / t.layout.module_png(key), render.png_bytes(img), sync=False)


def _projections(plan: Plan, key: str, top: TopK, pos: Tensor | None, boxes: Tensor,
                 size: tuple[int, int], images: _Winners, model: torch.nn.Module,
                 rows: range) -> Tensor:
    """Projections of channels `rows`' entries, cropped to their boxes: float32 (len(rows), k,
    C_in, bh, bw). Each distinct winner among them runs forward once, and each projection is
    computed on its unit's window only. Each winner's value is computed again and must match
    the recorded one."""
    from convmaps.core.deconv import Unit, project_jobs

    k = top.k
    pairs = [(c, r) for c in rows for r in range(k)]
    out = torch.zeros(len(rows), k, plan.loaded.in_channels, *size)
    winners = [int(top.images[c, r]) for c, r in pairs]
    distinct = list(dict.fromkeys(winners))  # in first-seen order
    row = {image: i for i, image in enumerate(distinct)}
    jobs = [(row[image], Unit(key, c, None if pos is None else
                              (int(pos[c, r, 0]), int(pos[c, r, 1]))))
            for (c, r), image in zip(pairs, winners, strict=True)]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = torch.stack([images.tensor(i) for i in distinct]).to(device)
    got = project_jobs(model, batch, jobs, Mode(plan.options.project), plan.options.batch_size,
                       trim=True)
    for (c, r), p in zip(pairs, got, strict=True):
        _same_value(plan, key, c, r, p.value, top)
        # the map covers the unit's window (zero outside the image): its box, moved to it
        y, x = p.origin
        t, left, b, right = boxes[c, r].tolist()
        out[c - rows.start, r] = crop(p.map.float().cpu(), (t - y, left - x, b - y, right - x),
                                      size, 0.0)
    return out
