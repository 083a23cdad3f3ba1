"""The `project` job: units of each image projected to pixel space, written beside its dump.

For every image: `OUT/<image key>/projections.safetensors` (key `<mode>/<module>/<channel>`,
float32 `(C_in, H, W)` in the input tensor's space, the unit's position, value and
receptive-field box in the metadata) and one PNG per unit under `png/projections/`. The
folder's `projections.json` lists them, as a dump's manifest lists its files.

Projections accumulate: a later run with other units or another mode adds its keys to an
image's file (the same key is replaced). They belong to one model and weights: projections of
another model into a folder that holds a dump or projections of the first are refused (a
dump's maps and the projections beside them must come from the same network).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from convmaps import __version__
from convmaps.core.models import LoadedModel, load_model, normalisation
from convmaps.errors import ConvmapsError
from convmaps.io import layout
from convmaps.io import manifest as manifests
from convmaps.io.images import ImageSource
from convmaps.io.store import read_metadata, save_tensors, write_bytes, write_json
from convmaps.jobs.engine import (
    DecodedImages,
    check_device,
    clear_folder,
    find_sources,
    identity,
    owner,
)
from convmaps.options import ProjectOptions

__all__ = ["run_project"]


def _claim(out: Path, loaded: LoadedModel, run: str, resume: bool
           ) -> tuple[list[dict[str, Any]], dict[str, set[str]]]:
    """Earlier projection entries of the same network, and the files every entry lists (a
    killed run's pending ones too); refuses a folder whose dump or projections come from
    another network (with --overwrite: removes those projections first)."""
    try:
        dump = manifests.read(out)
        earlier = manifests.read(out, layout.PROJECTIONS_MANIFEST)
    except ConvmapsError as e:
        raise ConvmapsError(f"{e}; convmaps will not replace it: choose another --out") from e
    if dump is not None and dump.get("identity", run) != run:
        raise ConvmapsError(
            f"{out} holds a dump of {dump.get('model')} (weights {dump.get('weights')}); "
            f"projections of {loaded.arch} ({loaded.weights}) would not match its maps: "
            "choose another --out"
        )
    if earlier is None:
        return [], {}
    if earlier["run"] != run or not resume:
        if resume:
            raise ConvmapsError(
                f"{out} holds projections of {earlier.get('model')} (weights "
                f"{earlier.get('weights')}); add --overwrite to replace them, or choose "
                "another --out"
            )
        remove_projections(out, earlier)
        return [], {}
    files = {e["key"]: {f for f in e["files"] if layout.is_projection_output(f)}
             for e in earlier["inputs"]}
    return [e for e in earlier["inputs"] if e["status"] == "ok"], files


def remove_projections(out: Path, m: dict[str, Any]) -> None:
    """Remove the projection files a `projections.json` lists, then the list itself."""
    for e in m["inputs"]:
        mine = {f for f in e["files"] if layout.is_projection_output(f)}
        clear_folder(out, e["key"], set(), owner(mine))
    (out / layout.PROJECTIONS_MANIFEST).unlink(missing_ok=True)


def _kept(folder: Path, run: str, sha: str) -> dict[str, torch.Tensor]:
    """The projections an image already has from this network, if they were made from this
    very image; else none."""
    path = folder / layout.PROJECTIONS
    meta = read_metadata(path)
    if meta is None or meta.get("run") != run or meta.get("sha256") != sha:
        return {}
    from safetensors.torch import load_file

    return load_file(str(path))


def run_project(o: ProjectOptions, on_image: Callable[[str], None] | None = None
                ) -> dict[str, Any]:
    """Project every unit of every image; returns `projections.json` (also written to OUT).

    Raises:
        ConvmapsError: no units, a unit that does not fit its module, a bad device, or an OUT
            that holds another network's dump or projections.
    """
    from convmaps import render
    from convmaps.core import deconv as project
    from convmaps.core import fields as rf

    if not o.units:
        raise ConvmapsError("give at least one --unit MODULE:C (e.g. --unit features.10:5)")
    if o.batch_size < 1:
        raise ConvmapsError(f"batch_size must be at least 1, not {o.batch_size}")
    device = check_device(o.device)
    loaded = load_model(o.model, o.weights, o.arch)
    model = loaded.model.to(device)
    input_shape = (loaded.in_channels, *loaded.input_size)
    shapes = project.output_shapes(model, input_shape)
    units = [project.parse_unit(text, model, shapes) for text in o.units]
    fields = rf.fields(model, input_shape)
    mean, std = normalisation(loaded.preprocess)
    out = Path(o.out)
    run = identity(loaded)
    earlier, previous = _claim(out, loaded, run, o.resume)
    dump = manifests.read(out)
    ours = {e["key"] for e in earlier} | {e["key"] for e in (dump or {}).get("inputs", [])}
    sources, skips = find_sources(o.inputs, loaded.arch, out, ours)
    decoded = DecodedImages(sources, loaded.preprocess, skips)
    header = {"convmaps": __version__, "model": loaded.arch, "weights": loaded.weights,
              "preprocessing": repr(loaded.preprocess), "input_size": list(loaded.input_size),
              "run": run}
    by_key = {e["key"]: e for e in earlier}
    planned = {layout.PROJECTIONS, *(layout.projection_png(layout.projection_key(
        str(o.mode), u.module, u.channel, u.position)) for u in units)} if o.png else \
        {layout.PROJECTIONS}
    pending = {s.key: manifests.entry(s.key, str(s.path), None, "pending",
                                      sorted(planned | previous.get(s.key, set())))
               for s in sources}
    # claims OUT before the first file: a killed run's files are listed, so they can go later
    write_json(out / layout.PROJECTIONS_MANIFEST,
               manifests.build(header, manifests.ordered({**by_key, **pending},
                                                         (s.key for s in sources))))
    for i, src in enumerate(sources):
        item = decoded[i]
        if item["tensor"] is None:
            if i not in skips:  # an image that became unreadable loses its projections
                clear_folder(out, src.key, set(), owner(previous.get(src.key, set())))
            by_key[src.key] = manifests.entry(src.key, str(src.path), None,
                                              f"skipped: {item['reason']}", [])
        else:
            x = item["tensor"].to(device)
            found = project.project(model, x, units, o.mode, batch_size=o.batch_size)
            files = _write(out, src, item["sha256"], run, loaded, x, found, fields, o,
                           render.picture(x.cpu(), mean, std), previous.get(src.key, set()))
            by_key[src.key] = manifests.entry(src.key, str(src.path), item["sha256"], "ok",
                                              files)
        if on_image:
            on_image(src.key)
    m = manifests.build(header, manifests.ordered(by_key, (s.key for s in sources)))
    write_json(out / layout.PROJECTIONS_MANIFEST, m)
    return m


def _write(out: Path, src: ImageSource, sha: str, run: str, loaded: LoadedModel,
           x: torch.Tensor, found: list[Any], fields: dict[str, Any], o: ProjectOptions,
           picture: torch.Tensor, previous: set[str]) -> list[str]:
    """One image's projections file (this run's units added to what it had) and PNGs."""
    from convmaps import render

    folder = out / src.key
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
        field = fields.get(u.module)
        box = field.box(*p.position) if field is not None and p.position is not None \
            else (0, 0, int(h), int(w))
        tensors[key] = p.map.detach().float().cpu().contiguous()
        meta[f"{key}.value"] = f"{p.value:.9g}"
        meta[f"{key}.position"] = "" if p.position is None else f"{p.position[0]},{p.position[1]}"
        meta[f"{key}.box"] = ",".join(str(int(v)) for v in box)
        if o.png:
            title = f"{u.module}:{u.channel} at {meta[f'{key}.position'] or '-'}  {o.mode}  " \
                    f"value {p.value:.4g}"
            img = render.projection_figure(picture, tensors[key], tuple(box), title)
            write_bytes(folder / layout.projection_png(key), render.png_bytes(img), sync=False)
    tensors = dict(sorted(tensors.items()))
    save_tensors(folder / layout.PROJECTIONS, tensors, meta, sync=False)
    keep = {layout.PROJECTIONS, *(layout.projection_png(k) for k in tensors)}
    clear_folder(out, src.key, keep, owner(previous))  # PNGs of keys it no longer has
    return sorted(f for f in keep if (folder / f).is_file())
