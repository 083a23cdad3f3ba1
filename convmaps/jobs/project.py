"""The `project` job: units of each image projected to pixel space, written beside its dump.

For every image: `OUT/<image key>/projections.safetensors` (key `<mode>/<module>/<channel>`,
float32 `(C_in, H, W)` in the input tensor's space, the unit's position, value and
receptive-field box in the metadata) and one PNG per unit under `png/projections/`. The
folder's `projections.json` lists them, as a dump's manifest lists its files.

Projections accumulate: a later run with other units or another mode adds its keys to an
image's file (the same key is replaced). They belong to one model and weights: projections of
another model into a folder that holds a dump or projections of the first are refused (a
dump's maps and the projections beside them must come from the same network). The engine
(`jobs.engine`) brings folders, batches, progress, shards and resume.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from convmaps import __version__
from convmaps.core.capture import LayerRow, Trace
from convmaps.core.deconv import Unit, parse_unit, project_batch
from convmaps.core.fields import Field
from convmaps.core.models import LoadedModel, normalisation
from convmaps.errors import ConvmapsError
from convmaps.io import layout
from convmaps.io.images import ImageSource
from convmaps.io.store import png_complete, read_metadata, save_tensors, write_bytes
from convmaps.jobs.engine import (
    Job,
    Plan,
    Result,
    check_network,
    per_image,
    plain_entry,
    plan_job,
    remove_listed,
    run_job,
    same_bytes,
)
from convmaps.jobs.ownership import clear_folder, owner
from convmaps.options import ProjectOptions

__all__ = ["Project", "remove_projections", "run_project"]


class Project(Job):
    """Projections of the chosen units of every image (one forward and one batched backward
    pass per `--batch-size` units)."""

    name = "project"
    what = "projections"
    manifest = layout.PROJECTIONS_MANIFEST

    def prepare(self, o: ProjectOptions, loaded: LoadedModel, table: list[LayerRow],
                fields: dict[str, Field], traced: Trace) -> None:
        model = loaded.model
        if not o.units:
            example = next((r.name for r in reversed(table) if r.type == "Conv2d"), "MODULE")
            raise ConvmapsError(f"give at least one --unit MODULE:C (e.g. --unit {example}:0)")
        shapes = {k: tuple(v.shape[1:]) for k, v in traced.outputs.items()}
        self.options = o
        self.units: list[Unit] = [parse_unit(text, model, shapes) for text in o.units]
        self.fields = fields
        self.mean, self.std = normalisation(loaded.preprocess)
        from convmaps.jobs.dump import class_names

        classes = class_names(loaded)  # names a classifier unit in its figure's caption
        self.classes: dict[str, list[str]] = {
            u.module: classes for u in self.units
            if classes and shapes.get(u.module) == (len(classes),)}

    def planned(self) -> set[str]:
        """The files this run's units give each image."""
        keys = [layout.projection_key(str(self.options.mode), u.module, u.channel, u.position)
                for u in self.units]
        pngs = {layout.projection_png(k) for k in keys} if self.options.png else set()
        return {layout.PROJECTIONS, *pngs}

    def files(self, plan: Plan, key: str) -> list[str]:
        return sorted(self.planned() | plan.listed.get(key, set()))

    def remove(self, folder: Path, m: dict[str, Any]) -> None:
        remove_projections(folder, m)

    def neighbours(self, out: Path, loaded: LoadedModel, resume: bool) -> None:
        check_network(out, loaded, "projections", own=[(".", layout.PROJECTIONS_MANIFEST)])

    def ours(self, out: Path, earlier: list[dict[str, Any]]) -> set[str]:
        from convmaps.io import manifest as manifests

        dump = manifests.read(out)
        return {e["key"] for e in earlier} | {e["key"] for e in (dump or {}).get("inputs", [])}

    def resume(self, plan: Plan) -> dict[int, dict[str, Any]]:
        return {i: e for i in plan.mine if i not in plan.skips
                and (e := _finished_entry(plan, i)) is not None}

    def start(self, plan: Plan, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model

    def step(self, plan: Plan, batch: torch.Tensor | None, items: list[dict[str, Any]]) -> Any:
        if batch is None:
            return None
        found = project_batch(self.model, batch, self.units, self.options.mode,
                              batch_size=self.options.batch_size)
        return batch, found  # the engine brings both to the host, in one copy

    def write(self, plan: Plan, items: list[dict[str, Any]], stepped: Any
              ) -> list[tuple[int, dict[str, Any]]]:
        from convmaps import render

        def write_one(row: int, it: dict[str, Any]) -> dict[str, Any]:
            x, found = stepped
            files = _write(plan, plan.sources[it["index"]], it["sha256"], x[row], found[row],
                           render.picture(x[row], self.mean, self.std))
            return plain_entry(plan, it, files)

        return per_image(plan, items, write_one)

    def describe(self, plan: Plan) -> str:
        return (f"{plan.label}{plan.loaded.arch} ({plan.loaded.weights}) · {len(plan.mine)} "
                f"input(s), {len(plan.finished)} already done · {len(self.units)} unit(s) · "
                f"{self.options.mode}")

    def closing(self, plan: Plan, result: Result) -> str:
        ok = len(plan.mine) - len(result.skipped)
        return (f"{plan.label}{len(self.units)} unit(s) of {ok} image(s) projected "
                f"({self.options.mode}): {result.written} written, {result.already} already "
                f"done, {len(result.skipped)} skipped; list: {result.path}")


def run_project(o: ProjectOptions, on_progress: Callable[[int], None] | None = None
                ) -> dict[str, Any]:
    """Project every unit of every image; returns `projections.json` (also written to OUT,
    or this shard's until the last shard merges them).

    Raises:
        ConvmapsError: no units, a unit that does not fit its module, a bad device, or an OUT
            that holds another network's dump or projections.
    """
    return run_job(plan_job(o, Project()), on_progress).manifest


def _project(plan: Plan) -> Project:
    job = plan.job
    assert isinstance(job, Project)
    return job


def _finished_entry(plan: Plan, i: int) -> dict[str, Any] | None:
    """The image's entry when its projections file holds every unit of this run, made by this
    network from this very image, and its PNGs are whole; else None."""
    job = _project(plan)
    source = plan.sources[i]
    folder = plan.out / source.key
    meta = read_metadata(folder / layout.PROJECTIONS)
    wanted = job.planned()
    if meta is None or meta.get("run") != plan.fingerprint or not all(
            png_complete(folder / f) for f in wanted if f.endswith(".png")):
        return None
    keys = {k.rsplit(".", 1)[0] for k in meta}
    if not all(layout.projection_key(str(job.options.mode), u.module, u.channel, u.position)
               in keys for u in job.units):
        return None
    if not same_bytes(source, meta.get("sha256")):
        return None
    files = sorted(f for f in job.files(plan, source.key) if (folder / f).is_file())
    return plain_entry(plan, {"index": i, "tensor": True,
                              "sha256": meta["sha256"]}, files)


def remove_projections(out: Path, m: dict[str, Any]) -> None:
    """Remove the projection files a `projections.json` lists, then the list itself."""
    remove_listed(out, m, layout.is_projection_output, layout.PROJECTIONS_MANIFEST)


def _kept(folder: Path, run: str, sha: str) -> dict[str, torch.Tensor]:
    """The projections an image already has from this network, if they were made from this
    very image; else none."""
    path = folder / layout.PROJECTIONS
    meta = read_metadata(path)
    if meta is None or meta.get("run") != run or meta.get("sha256") != sha:
        return {}
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        kept = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return {}
    # what this job writes, or the file is not ours to extend: (C_in, H, W) float32 maps
    shape = next(iter(kept.values())).shape if kept else None
    if not all(t.dtype == torch.float32 and t.dim() == 3 and t.shape == shape
               for t in kept.values()):
        return {}
    return kept


def _write(plan: Plan, src: ImageSource, sha: str, x: torch.Tensor, found: list[Any],
           picture: torch.Tensor) -> list[str]:
    """One image's projections file (this run's units added to what it had) and PNGs."""
    from convmaps import render

    job = _project(plan)
    o, loaded, run = job.options, plan.loaded, plan.fingerprint
    previous = plan.listed.get(src.key, set())
    folder = plan.out / src.key
    tensors = _kept(folder, run, sha)
    old_meta = (read_metadata(folder / layout.PROJECTIONS) or {}) if tensors else {}
    meta = {k: v for k, v in old_meta.items() if k.rsplit(".", 1)[0] in tensors}
    meta.update({"convmaps": __version__, "model": loaded.arch, "weights": loaded.weights,
                 "source": str(src.path), "key": src.key, "sha256": sha, "run": run,
                 "dtype": "float32"})
    h, w = x.shape[-2:]
    for p in found:
        u = p.unit
        key = layout.projection_key(str(o.mode), u.module, u.channel, u.position)
        field = job.fields.get(u.module)
        box: tuple[int, int, int, int] = field.box(*p.position) \
            if field is not None and p.position is not None else (0, 0, int(h), int(w))
        tensors[key] = p.map.detach().float().contiguous()
        meta[f"{key}.value"] = f"{p.value:.9g}"
        meta[f"{key}.position"] = "" if p.position is None else f"{p.position[0]},{p.position[1]}"
        meta[f"{key}.box"] = ",".join(str(int(v)) for v in box)
        if o.png:
            title = f"{loaded.arch} · {u.module}:{u.channel} · {src.key}"
            where = f"at y,x {meta[f'{key}.position']}" if p.position is not None else \
                f"class '{job.classes[u.module][u.channel]}'" if u.module in job.classes else ""
            caption = " · ".join(x for x in (str(o.mode), where, f"value {p.value:.4g}") if x)
            img = render.projection_figure(picture, tensors[key], box, title, caption)
            write_bytes(folder / layout.projection_png(key), render.png_bytes(img), sync=False)
    tensors = dict(sorted(tensors.items()))
    save_tensors(folder / layout.PROJECTIONS, tensors, meta, sync=False)
    keep = {layout.PROJECTIONS, *(layout.projection_png(k) for k in tensors)}
    clear_folder(plan.out, src.key, keep, owner(previous))  # PNGs of keys it no longer has
    return sorted(f for f in keep if (folder / f).is_file())
