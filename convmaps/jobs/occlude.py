"""The `occlude` job (Zeiler & Fergus, Fig. 7): a grey square slid over every input, and what
the network says at each of its positions, into `OUT/<image key>/occlusion.safetensors`:

- `probability` float32 (Py, Px): the target class's softmax probability;
- `top_class` int64 (Py, Px): the most probable class;
- `logit_drop` float32 (H, W): per input pixel, the mean over the patches covering it of
  `logit_target(x) - logit_target(x occluded)` (what `captum.attr.Occlusion` returns; 0 where
  no patch covers a pixel);
- `unit/<module>/<channel>` float32 (Py, Px): that channel's feature map summed over space
  (each `--unit`; by default the channel of the last conv layer with the largest maximum on
  the unoccluded image).

The maps come from `core.occlusion` (exact incremental inference on the traced graph, full
passes for a model that does not trace; the manifest's `method` says which, and the ops
without a rule); `OUT/occlusion.json` lists the images, as a dump's manifest does, and the engine
brings folders, batches, progress, shards and resume. One configuration owns an image's
occlusion files: other options are refused, or replaced with --overwrite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from convmaps import __version__
from convmaps.core.capture import LayerRow, Trace
from convmaps.core.deconv import parse_unit
from convmaps.core.fields import Field
from convmaps.core.models import LoadedModel, normalisation
from convmaps.core.occlusion import Occlusion, corners, method, occlude
from convmaps.errors import ConvmapsError
from convmaps.io import layout
from convmaps.io.store import png_complete, read_metadata, save_tensors, write_bytes
from convmaps.jobs.engine import (
    ListedJob,
    Plan,
    per_image,
    plain_entry,
    plan_job,
    run_job,
    same_bytes,
)
from convmaps.options import OccludeOptions

__all__ = ["Occlude", "logit_drop", "run_occlude"]


class Occlude(ListedJob):
    """Occlusion maps of every image, `--batch-size` patch positions a step."""

    name = "occlude"
    what = "occlusion maps"
    manifest = layout.OCCLUSION_MANIFEST
    bounds = (("patch", 1), ("stride", 1))

    def prepare(self, o: OccludeOptions, loaded: LoadedModel, table: list[LayerRow],
                fields: dict[str, Field], traced: Trace) -> None:
        h, w = loaded.input_size
        corners(min(h, w), o.patch, o.stride)  # a patch that does not fit: one line, now
        shapes = {k: tuple(v.shape[1:]) for k, v in traced.outputs.items()}
        self.options = o
        self.units = [parse_unit(text, loaded.model, shapes) for text in o.units]
        for u, text in zip(self.units, o.units, strict=True):
            if u.position is not None or len(shapes[u.module]) != 3:
                raise ConvmapsError(
                    f"--unit {text}: occlusion maps a channel's feature map summed over space; "
                    "give MODULE:C of a module with feature maps (C, H, W)")
        convs = [r.name for r in table if r.type == "Conv2d" and r.out_shape is not None
                 and f"{r.name}@1" not in shapes]
        self.strongest = None if self.units else (convs[-1] if convs else None)
        outputs = [r.out_shape for r in table if r.out_shape is not None and len(r.out_shape) == 1]
        self.classes = int(outputs[-1][0]) if outputs else 0
        if not self.classes:
            raise ConvmapsError(f"{loaded.arch} has no 1-D output of classes to occlude")
        if o.target != "top" and (not o.target.isdigit() or int(o.target) >= self.classes):
            raise ConvmapsError(f"--target {o.target!r}: give top or a class index below "
                                f"{self.classes}")
        from convmaps.jobs.dump import class_names

        self.names = class_names(loaded)
        # said once, in the manifest and the header line: how the maps are computed
        self.method = method(loaded.model)  # (loaded in eval mode, as it is traced)
        self.mean, self.std = normalisation(loaded.preprocess)

    def modules(self) -> list[str]:
        """The modules whose channel sums are mapped."""
        chosen = {u.module for u in self.units}
        return sorted(chosen | {self.strongest} if self.strongest else chosen)

    def fingerprint(self) -> dict[str, Any]:
        o = self.options
        return {"patch": o.patch, "stride": o.stride, "fill": o.fill, "target": o.target,
                "units": [str(u) for u in self.units], "png": o.png}

    def header(self) -> dict[str, Any]:
        return {"method": self.method}

    def files(self, plan: Plan, key: str) -> list[str]:
        return [layout.OCCLUSION, *([layout.OCCLUSION_PNG] if self.options.png else [])]

    def owns(self, rel: str) -> bool:
        return layout.is_occlusion_output(rel)

    def finished(self, plan: Plan, i: int) -> dict[str, Any] | None:
        return _finished_entry(plan, i)

    def step(self, plan: Plan, batch: Tensor | None, items: list[dict[str, Any]]) -> Any:
        if batch is None:
            return None
        o = self.options
        return batch, [occlude(self.model, x, o.patch, o.stride, o.fill, self.modules(),
                               o.batch_size) for x in batch]

    def write(self, plan: Plan, items: list[dict[str, Any]], stepped: Any
              ) -> list[tuple[int, dict[str, Any]]]:
        def write_one(row: int, it: dict[str, Any]) -> dict[str, Any]:
            x, found = stepped
            files = _write(plan, it, x[row], found[row])
            return plain_entry(plan, it, files)

        return per_image(plan, items, write_one)

    def doing(self, plan: Plan) -> str:
        o = self.options
        h, w = plan.loaded.input_size
        n = len(corners(h, o.patch, o.stride)) * len(corners(w, o.patch, o.stride))
        return (f"{o.patch} px patch, stride {o.stride}: {n} positions an image · target "
                f"{o.target} · {self.method.split(' (')[0]}")


def run_occlude(o: OccludeOptions, on_progress: Callable[[int], None] | None = None
                ) -> dict[str, Any]:
    """Occlusion maps of every image; returns `occlusion.json` (also written to OUT, or this
    shard's until the last shard merges them).

    Raises:
        ConvmapsError: a patch that does not fit, a bad --target or --unit, a bad device, or an
            OUT that holds another network's dump.
    """
    return run_job(plan_job(o, Occlude()), on_progress).manifest


def logit_drop(drops: Tensor, size: tuple[int, int], patch: int, stride: int) -> Tensor:
    """(H, W): per pixel, the mean of `drops` (Py, Px) over the patches that cover it (0 where
    none does), the patches on Captum's grid."""
    h, w = size
    total, count = torch.zeros(h, w, dtype=drops.dtype), torch.zeros(h, w, dtype=drops.dtype)
    for i, y in enumerate(corners(h, patch, stride)):
        for j, x in enumerate(corners(w, patch, stride)):
            total[y:y + patch, x:x + patch] += drops[i, j]
            count[y:y + patch, x:x + patch] += 1
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)


def _occlude(plan: Plan) -> Occlude:
    job = plan.job
    assert isinstance(job, Occlude)
    return job


def _maps(job: Occlude, found: Occlusion, size: tuple[int, int]
          ) -> tuple[dict[str, Tensor], int, list[tuple[str, int]]]:
    """The file's tensors, the target class and the mapped units (module, channel)."""
    o = job.options
    target = int(found.clear.argmax()) if o.target == "top" else int(o.target)
    logits = found.logits.float()
    tensors = {
        "probability": logits.softmax(-1)[..., target].contiguous(),
        "top_class": logits.argmax(-1).to(torch.int64),
        "logit_drop": logit_drop(found.clear[target].float() - logits[..., target], size,
                                 o.patch, o.stride).float(),
    }
    units = [(u.module, u.channel) for u in job.units]
    if job.strongest is not None:
        units = [(job.strongest, int(found.peaks[job.strongest].argmax()))]
    for module, channel in units:
        tensors[f"unit/{module}/{channel}"] = found.sums[module][..., channel].float().contiguous()
    return tensors, target, units


def _write(plan: Plan, it: dict[str, Any], x: Tensor, found: Occlusion) -> list[str]:
    """One image's occlusion file and figure."""
    job = _occlude(plan)
    o, loaded = job.options, plan.loaded
    src = plan.sources[it["index"]]
    folder = plan.out / src.key
    tensors, target, units = _maps(job, found, (int(x.shape[-2]), int(x.shape[-1])))
    name = job.names[target] if job.names and target < len(job.names) else str(target)
    meta = {"convmaps": __version__, "model": loaded.arch, "weights": loaded.weights,
            "source": str(src.path), "key": src.key, "sha256": it["sha256"],
            "run": plan.fingerprint, "patch": str(o.patch), "stride": str(o.stride),
            "fill": f"{o.fill:.9g}", "target": str(target), "target_name": name,
            "clear_logit": f"{float(found.clear[target]):.9g}",
            "clear_probability": f"{float(found.clear.float().softmax(0)[target]):.9g}",
            "units": ",".join(f"{m}:{c}" for m, c in units)}
    previous = plan.listed.get(src.key, set())
    save_tensors(folder / layout.OCCLUSION, tensors, meta, sync=False)
    if o.png:
        from convmaps import render

        module, channel = units[0] if units else ("", 0)
        img = render.occlusion_figure(
            render.picture(x, job.mean, job.std), tensors["probability"], tensors["top_class"],
            tensors.get(f"unit/{module}/{channel}"), job.names or [], o.patch, o.stride,
            f"{loaded.arch} · {src.key} · target {name} ({target}), p = "
            f"{float(meta['clear_probability']):.3g} unoccluded"
            + (f" · unit {module}:{channel}" if units else ""))
        write_bytes(folder / layout.OCCLUSION_PNG, render.png_bytes(img), sync=False)
    return job.settle(plan, src.key, previous)


def _finished_entry(plan: Plan, i: int) -> dict[str, Any] | None:
    """The image's entry when its occlusion file is this run's, made from this very image, and
    its figure is whole; else None."""
    job = _occlude(plan)
    source = plan.sources[i]
    folder = plan.out / source.key
    meta = read_metadata(folder / layout.OCCLUSION)
    files = job.files(plan, source.key)
    if meta is None or meta.get("run") != plan.fingerprint or not all(
            png_complete(folder / f) for f in files if f.endswith(".png")):
        return None
    if not same_bytes(source, meta.get("sha256")):
        return None
    return plain_entry(plan, {"index": i, "tensor": True, "sha256": meta["sha256"]}, files)
