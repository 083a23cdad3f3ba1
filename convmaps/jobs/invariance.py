"""The `invariance` job (Zeiler & Fergus, Fig. 5): every input translated, scaled and rotated,
and how far each chosen module's output moves and what becomes of the top class's probability
(`core.invariance`), gathered into one aggregate folder `OUT/invariance/`:

- `invariance.safetensors`: `amounts/<transform>` float32 (T,); `distance/<transform>` float32
  (N, T, L), the Euclidean distance between each module's flattened output for the original
  and the transformed image (modules in the order of the `modules` metadata); `probability/
  <transform>` float32 (N, T), the original top class's probability; `images` int64 (N,), each
  row's index in the manifest's inputs (the usable ones, in input order); `top_class` int64
  (N,);
- `manifest.json`: the inputs, as for a dump;
- `png/<transform>.png`: line plots of the mean normalised distance per module and of the
  probability.

Each shard keeps its rows in a state file (`layout.state_file`, checkpointed); the shard that
merges the manifests assembles the file in input order, byte-identical to one process (each
image runs with its own copies alone, so no row depends on its batch).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from convmaps import __version__
from convmaps.core.capture import Kind, LayerRow, Trace, modules_run, select
from convmaps.core.fields import Field
from convmaps.core.invariance import TRANSFORMS, amounts, invariance
from convmaps.core.models import LoadedModel
from convmaps.errors import ConvmapsError
from convmaps.io import layout
from convmaps.io.store import save_tensors, write_bytes
from convmaps.jobs.engine import Job, Plan, Result, check_network, plain_entry, run_job, to_host
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
from convmaps.options import InvarianceOptions

__all__ = ["Invariance", "run_invariance"]

Entry = dict[str, Any]


@dataclass
class _State:
    """One shard's rows so far (by input index) and its images' entries: its checkpoint."""

    rows: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    entries: dict[int, Entry] = field(default_factory=dict)
    finished: bool = False


class Invariance(Job):
    """Invariance curves: each image with its transformed copies, one transform at a time."""

    name = "invariance"
    what = "invariance curves"
    bounds = (("steps", 2),)

    def folder(self, out: Path) -> Path:
        return out / layout.INVARIANCE

    def prepare(self, o: InvarianceOptions, loaded: LoadedModel, table: list[LayerRow],
                fields: dict[str, Field], traced: Trace) -> None:
        unknown = [t for t in o.transforms if t not in TRANSFORMS]
        if unknown or not o.transforms:
            raise ConvmapsError(f"--transform {', '.join(unknown) or '(none)'}: choose "
                                f"{', '.join(TRANSFORMS)}")
        self.options = o
        # in the paper's order, each once
        self.transforms = tuple(t for t in TRANSFORMS if t in o.transforms)
        shape = (loaded.in_channels, *loaded.input_size)
        spec = f"{Kind.conv.value},{Kind.linear.value}" if o.layers is None else o.layers
        chosen = select(loaded.model, spec, ran=modules_run(loaded.model, shape, traced))
        self.modules = [x.name for x in chosen]  # a module called twice: its first call
        outputs = [r.out_shape for r in table if r.out_shape is not None]
        if not outputs or len(outputs[-1]) != 1:
            raise ConvmapsError(f"{loaded.arch} has no 1-D output of classes: no top class to "
                                "follow")
        self.amounts = {t: amounts(t, o.steps, loaded.input_size) for t in self.transforms}
        self.state = _State()

    def fingerprint(self) -> dict[str, Any]:
        o = self.options
        return {"transforms": list(self.transforms), "steps": o.steps,
                "modules": self.modules, "png": o.png,
                # the memory format picks the kernels: the low bits of every distance
                "memory": str(memory_format(torch.device(o.device)))}

    def header(self) -> dict[str, Any]:
        return {"modules": self.modules, "transforms": list(self.transforms)}

    def remove(self, folder: Path, m: Entry) -> None:
        clear_folder(folder.parent, folder.name, set(), layout.is_invariance_output)

    def neighbours(self, out: Path, loaded: LoadedModel, resume: bool) -> None:
        check_network(out, loaded, "invariance curves",
                      own=[(layout.INVARIANCE, layout.MANIFEST)])

    def ours(self, out: Path, earlier: list[Entry]) -> set[str]:
        return dump_keys(out)  # no image folders of its own: a dump's are no inputs

    def files(self, plan: Plan, key: str) -> list[str]:
        return []

    def done(self, plan: Plan) -> Entry | None:
        return finished(plan, layout.invariance_files(self.transforms, self.options.png))

    def resume(self, plan: Plan) -> dict[int, Entry]:
        self.state = _load_state(plan, plan.shard) or _State()
        return dict(self.state.entries)

    def bytes(self, plan: Plan) -> tuple[int, str, str]:
        n, t, m = len(plan.sources), self.options.steps, len(self.modules)
        return (len(self.transforms) * (4 * n * t * (m + 1) + 200_000), "invariance curves",
                "pick fewer --layers or --transform")

    def start(self, plan: Plan, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.saved = time.monotonic()

    def step(self, plan: Plan, batch: Tensor | None, items: list[Entry]) -> None:
        good = [it for it in items if it["tensor"] is not None]
        rows: dict[int, dict[str, Tensor]] = {}
        for row, it in enumerate(good):
            assert batch is not None
            got = {}
            for t in self.transforms:
                r = invariance(self.model, batch[row], t, self.amounts[t].tolist(), self.modules)
                got[f"distance/{t}"], got[f"probability/{t}"] = r.distance, r.probability
                got["top_class"] = r.top
            rows[it["index"]] = got
        self.state.rows.update(to_host(rows))  # the batch's rows leave the device at once
        self.state.entries.update({it["index"]: plain_entry(plan, it) for it in items})
        if time.monotonic() - self.saved >= self.options.checkpoint_seconds:
            _save_state(plan, self.state, plan.shard)
            self.saved = time.monotonic()

    def end(self, plan: Plan) -> None:
        self.state.finished = True
        _save_state(plan, self.state, plan.shard)

    def finish(self, plan: Plan, manifest: Entry) -> None:
        """Every shard's rows, in input order, into the file and its plots."""
        states = every_state(plan, manifest, self.state, _load_state, "transform")
        if states is None:
            return
        rows = {i: r for s in states for i, r in s.rows.items()}
        usable = [i for i, e in enumerate(manifest["inputs"]) if e["status"] == "ok"]
        missing = [manifest["inputs"][i]["key"] for i in usable if i not in rows]
        if missing:
            raise ConvmapsError(f"no rows for {', '.join(missing[:3])}: run the same command "
                                "with --overwrite")
        tensors = _tensors(self, [rows[i] for i in usable], usable)
        loaded = plan.loaded
        meta = {"convmaps": __version__, "model": loaded.arch, "weights": loaded.weights,
                "run": plan.fingerprint, "modules": json.dumps(self.modules),
                "transforms": json.dumps(list(self.transforms)), "steps": str(self.options.steps),
                "translate": "vertical, in pixels (positive: down)", "scale": "factor",
                "rotate": "degrees, anticlockwise"}
        save_tensors(plan.folder / layout.INVARIANCE_FILE, tensors, meta)
        if self.options.png:
            _plots(plan, tensors)
        remove_states(plan.folder)

    def describe(self, plan: Plan) -> str:
        return (f"{plan.label}{plan.loaded.arch} ({plan.loaded.weights}) · {len(plan.mine)} "
                f"input(s) · {', '.join(self.transforms)} in {self.options.steps} steps · "
                f"{len(self.modules)} module(s)")

    def closing(self, plan: Plan, result: Result) -> str:
        return closing(plan, result, f"invariance of {len(self.modules)} module(s) under "
                       f"{', '.join(self.transforms)}", "transformed")


def run_invariance(o: InvarianceOptions, on_progress: Callable[[int], None] | None = None
                   ) -> Entry:
    """Invariance curves of every input; returns `OUT/invariance/manifest.json` (or this
    shard's until the last one merges them).

    Raises:
        ConvmapsError: an unknown transform or layer, fewer than 2 steps, a model without a
            class output, or an OUT that holds another network's dump.
    """
    from convmaps.jobs.engine import plan_job

    return run_job(plan_job(o, Invariance()), on_progress).manifest


def _invariance(plan: Plan) -> Invariance:
    job = plan.job
    assert isinstance(job, Invariance)
    return job


def _tensors(job: Invariance, rows: list[dict[str, Tensor]], usable: list[int]
             ) -> dict[str, Tensor]:
    """The file's tensors from the usable images' rows (in input order)."""
    tensors = {f"amounts/{t}": job.amounts[t] for t in job.transforms}
    for kind in ("distance", "probability"):
        tensors.update({f"{kind}/{t}": torch.stack([r[f"{kind}/{t}"] for r in rows])
                        for t in job.transforms})
    tensors["images"] = torch.tensor(usable, dtype=torch.int64)
    tensors["top_class"] = torch.stack([r["top_class"] for r in rows])
    return tensors


def _plots(plan: Plan, tensors: dict[str, Tensor]) -> None:
    from convmaps import render

    job = _invariance(plan)
    n = int(tensors["images"].numel())
    for t in job.transforms:
        img = render.invariance_plot(
            tensors[f"amounts/{t}"], tensors[f"distance/{t}"], tensors[f"probability/{t}"],
            job.modules, _AXES[t], f"{plan.loaded.arch} ({plan.loaded.weights}) · {t} · "
            f"{n} image(s)")
        write_bytes(plan.folder / layout.invariance_png(t), render.png_bytes(img), sync=False)


_AXES = {"translate": "vertical translation (pixels, + down)", "scale": "scale (factor)",
         "rotate": "rotation (degrees)"}


def _save_state(plan: Plan, state: _State, shard: tuple[int, int]) -> None:
    """A shard's checkpoint: its rows stacked by input index, and its entries."""
    job = _invariance(plan)
    index = sorted(state.rows)
    tensors = {"rows/index": torch.tensor(index, dtype=torch.int64)}
    keys = [f"{k}/{t}" for k in ("distance", "probability") for t in job.transforms]
    for k in [*keys, "top_class"]:
        tensors[k] = torch.stack([state.rows[i][k] for i in index]) if index else \
            torch.zeros(0)
    tensors.update(entry_tensors(state.entries))
    save_state(plan, shard, tensors, {"finished": str(state.finished)})


def _load_state(plan: Plan, shard: tuple[int, int]) -> _State | None:
    """A shard's saved rows when they belong to this run (see `partial.load_state`)."""
    job = _invariance(plan)

    def parse(got: dict[str, Tensor], meta: dict[str, str]) -> _State:
        index = got["rows/index"].tolist()
        steps, width = job.options.steps, len(job.modules)
        rows: dict[int, dict[str, Tensor]] = {i: {} for i in index}
        for t in job.transforms:
            for kind, shape in (("distance", (steps, width)), ("probability", (steps,))):
                stacked = got[f"{kind}/{t}"]
                if index and tuple(stacked.shape) != (len(index), *shape):
                    raise ValueError(f"{kind}/{t} has shape {tuple(stacked.shape)}")
                for r, i in enumerate(index):
                    rows[i][f"{kind}/{t}"] = stacked[r]
        for r, i in enumerate(index):
            rows[i]["top_class"] = got["top_class"][r]
        entries = read_entries(plan, got)
        if set(rows) - set(entries):
            raise ValueError("rows of images it has no entry for")
        return _State(rows, entries, meta["finished"] == "True")

    return load_state(plan, shard, "invariance", parse)
