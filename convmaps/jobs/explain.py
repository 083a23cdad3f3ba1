"""The `explain` job: each `--unit` of every input as an exact sum, followed down its largest
terms (`core.explain`), into `OUT/<image key>/explain/<unit>.json` (the tree) and
`png/explain/<unit>.png` (its figure). `<unit>` is `MODULE:C` or `MODULE:C@Y,X` as resolved
(a SPEC index becomes the module's name); without a position the tree's root says where the
channel was strongest.

A tree file: `tree` (the root node) beside what made it (`model`, `weights`, `unit`, `key`,
`source`, `sha256`, `run`, `depth`, `top`) and `box`, the root's receptive field in the
input (`[top, left, bottom, right]`, the whole input for a 1-D unit). A node: `module`,
`kind`, `channel`, `position` (`[y, x]`, or null for a 1-D output), `value`, `bias`,
`contributions` (the largest `_LISTED` terms `{"channel", "value"[, "position"], "source"}`
sorted by |value|: `source` the input's module or operation, `position` where in it the
term's child would be), `rest` (the sum of the others, 0 when all are listed), `windows` (a
conv node's largest terms tap by tap, `{"channel", "rows", "cols", "taps"}`: `taps[i][j]` is
`w * x` at input row `rows[i]`, column `cols[j]`, and they sum to the term's value) and
`children`.

`OUT/explain.json` lists the images, as a dump's manifest does; the engine brings folders,
batches, progress, shards and resume. One configuration owns an image's trees: other options
are refused, or replaced with --overwrite.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from convmaps import __version__
from convmaps.core.capture import LayerRow, Trace
from convmaps.core.deconv import parse_unit
from convmaps.core.explain import Node, explain, explainable
from convmaps.core.fields import Field
from convmaps.core.models import LoadedModel, normalisation
from convmaps.errors import ConvmapsError
from convmaps.io import layout
from convmaps.io.store import png_complete, write_bytes
from convmaps.jobs.engine import (
    ListedJob,
    Plan,
    per_image,
    plain_entry,
    plan_job,
    run_job,
    same_bytes,
)
from convmaps.options import ExplainOptions

__all__ = ["Explain", "node_record", "run_explain"]

_LISTED = 64  # terms listed per node in a tree file; the others are summed into `rest`


class Explain(ListedJob):
    """Explain trees of every image, one forward pass per image and unit."""

    name = "explain"
    what = "explain trees"
    manifest = layout.EXPLAIN_MANIFEST
    bounds = (("depth", 1), ("top", 1))

    def prepare(self, o: ExplainOptions, loaded: LoadedModel, table: list[LayerRow],
                fields: dict[str, Field], traced: Trace) -> None:
        if not o.units:
            raise ConvmapsError("explain needs a unit: give --unit MODULE:C or MODULE:C@Y,X")
        shapes = {k: tuple(v.shape[1:]) for k, v in traced.outputs.items()}
        self.options = o
        self.units = [parse_unit(text, loaded.model, shapes) for text in o.units]
        for u in self.units:
            explainable(loaded.model, u)
        self.by_name = {str(u): u for u in self.units}
        self.names = list(self.by_name)
        self.fields = fields  # the root's receptive-field box in the figure
        self.mean, self.std = normalisation(loaded.preprocess)

    def fingerprint(self) -> dict[str, Any]:
        o = self.options
        return {"units": self.names, "depth": o.depth, "top": o.top, "png": o.png}

    def files(self, plan: Plan, key: str) -> list[str]:
        png = [layout.explain_png(u) for u in self.names] if self.options.png else []
        return sorted([layout.explain_json(u) for u in self.names] + png)

    def owns(self, rel: str) -> bool:
        return layout.is_explain_output(rel)

    def finished(self, plan: Plan, i: int) -> dict[str, Any] | None:
        return _finished_entry(plan, i)

    def start(self, plan: Plan, model: torch.nn.Module, device: torch.device) -> None:
        super().start(plan, model, device)
        # traced once, from the model the steps run (its own modules)
        self.traced = {name: explainable(model, u) for name, u in self.by_name.items()}

    def step(self, plan: Plan, batch: Tensor | None, items: list[dict[str, Any]]) -> Any:
        if batch is None:
            return None
        o = self.options
        trees = [[explain(self.model, x, u, o.depth, o.top, self.traced[name])
                  for name, u in self.by_name.items()] for x in batch]
        return (batch if o.png else None), trees  # the engine brings both to the host at once

    def write(self, plan: Plan, items: list[dict[str, Any]], stepped: Any
              ) -> list[tuple[int, dict[str, Any]]]:
        from convmaps import render

        batch, trees = stepped

        def write_one(row: int, it: dict[str, Any]) -> dict[str, Any]:
            picture = None if batch is None else render.picture(batch[row], self.mean, self.std)
            return plain_entry(plan, it, _write(plan, it, trees[row], picture))

        return per_image(plan, items, write_one)

    def doing(self, plan: Plan) -> str:
        return f"{len(self.names)} unit(s), depth {self.options.depth}, top {self.options.top}"


def run_explain(o: ExplainOptions, on_progress: Callable[[int], None] | None = None
                ) -> dict[str, Any]:
    """Explain trees of every image; returns `explain.json` (also written to OUT, or this
    shard's until the last shard merges them).

    Raises:
        ConvmapsError: no unit or a bad one, a model torch.fx cannot trace or an operation
            explain cannot take apart, a bad device, or an OUT that holds another network's
            dump.
    """
    return run_job(plan_job(o, Explain()), on_progress).manifest


def node_record(node: Node, listed_terms: int = _LISTED) -> dict[str, Any]:
    """A node and its children as the tree file holds them: the `listed_terms` largest terms,
    the others summed into `rest`."""
    listed = node.terms[:listed_terms]
    return {
        "module": node.module, "kind": node.kind, "channel": node.channel,
        "position": None if node.position is None else list(node.position),
        "value": node.value, "bias": node.bias,
        "contributions": [{"channel": t.channel, "value": t.value}
                          | ({} if t.position is None else {"position": list(t.position)})
                          | {"source": t.source} for t in listed],
        "rest": sum(t.value for t in node.terms[listed_terms:]),
        "windows": [{"channel": w.channel, "rows": w.rows, "cols": w.cols, "taps": w.taps}
                    for w in node.windows],
        "children": [node_record(c, listed_terms) for c in node.children],
    }


def _explain(plan: Plan) -> Explain:
    job = plan.job
    assert isinstance(job, Explain)
    return job


def _write(plan: Plan, it: dict[str, Any], trees: list[Node], picture: Tensor | None
           ) -> list[str]:
    """One image's tree files and figures (`picture`: the input as uint8 RGB)."""
    job = _explain(plan)
    o, loaded = job.options, plan.loaded
    src = plan.sources[it["index"]]
    folder = plan.out / src.key
    previous = plan.listed.get(src.key, set())
    for unit, root in zip(job.names, trees, strict=True):
        field = job.fields.get(job.by_name[unit].module)  # (the root may be a function's)
        h, w = loaded.input_size
        box = field.box(*root.position) if field is not None and root.position else \
            (0, 0, int(h), int(w))
        record = {"convmaps": __version__, "model": loaded.arch, "weights": loaded.weights,
                  "unit": unit, "key": src.key, "source": str(src.path),
                  "sha256": it["sha256"], "run": plan.fingerprint, "depth": o.depth,
                  "top": o.top, "box": [int(v) for v in box], "tree": node_record(root)}
        data = json.dumps(record, indent=1, ensure_ascii=False).encode() + b"\n"
        write_bytes(folder / layout.explain_json(unit), data, sync=False)
        if o.png:
            from convmaps import render

            assert picture is not None
            at = "" if root.position is None else f" (at {root.position[0]},{root.position[1]})"
            img = render.explain_figure(
                root, picture, box, f"{loaded.arch} · unit {unit}{at} · {src.key} · "
                f"depth {o.depth}, top {o.top}")
            write_bytes(folder / layout.explain_png(unit), render.png_bytes(img), sync=False)
    return job.settle(plan, src.key, previous)


def _finished_entry(plan: Plan, i: int) -> dict[str, Any] | None:
    """The image's entry when its tree files are this run's, made from this very image, and
    its figures are whole; else None."""
    job = _explain(plan)
    source = plan.sources[i]
    folder = plan.out / source.key
    files = job.files(plan, source.key)
    shas = set()
    for f in files:
        if f.endswith(".png"):
            if not png_complete(folder / f):
                return None
            continue
        try:
            record = json.loads((folder / f).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("run") != plan.fingerprint:
            return None
        shas.add(record.get("sha256"))
    if len(shas) != 1 or not same_bytes(source, next(iter(shas))):
        return None
    return plain_entry(plan, {"index": i, "tensor": True, "sha256": shas.pop()}, files)
