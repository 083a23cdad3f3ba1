"""The `filters` job: every selected conv weight of a model into `OUT/filters/`, with one PNG
grid each, and a manifest that makes the folder this run configuration's (the ownership rule:
other options are refused, or replaced with --overwrite, so no stale grid stays behind).

    >>> from convmaps.options import FilterOptions
    >>> import tempfile
    >>> [name for name, _ in run_filters(FilterOptions("lenet", out=tempfile.mkdtemp()))]
    ['C1', 'C3', 'C5']
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from convmaps import __version__
from convmaps.core.capture import select
from convmaps.core.models import load_model
from convmaps.errors import ConvmapsError
from convmaps.io import layout
from convmaps.io import manifest as manifests
from convmaps.io.store import locked, save_tensors, symlink_under, write_bytes, write_json
from convmaps.jobs.engine import check_network, identity, model_identity
from convmaps.jobs.ownership import claim, clear_folder
from convmaps.options import FilterOptions
from convmaps.report import remove_report

__all__ = ["run_filters"]


def run_filters(o: FilterOptions, on_phase: Callable[[str, int, int], None] | None = None
                ) -> list[tuple[str, str | None]]:
    """`convmaps filters`: every selected conv weight into OUT/filters/filters.safetensors and
    one PNG grid per conv. Returns (module name, cap note or None) per conv; `on_phase("grids",
    done, total)` is called as each grid is written (VGG's take a while)."""
    from convmaps import render

    if o.png_cap < 1:
        raise ConvmapsError(f"png_cap must be at least 1, not {o.png_cap}")
    loaded = load_model(o.model, o.weights, o.arch)
    convs = select(loaded.model, o.layers or "conv", conv_only=True)
    weights = {x.name: x.module.weight.detach().cpu() for x in convs
               if isinstance(x.module, nn.Conv2d)}
    options = {k: v for k, v in asdict(o).items() if k not in ("out", "config", "resume")}
    what = {**model_identity(loaded), "modules": list(weights), "png": o.png,
            "png_cap": o.png_cap}
    fingerprint = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(o.out)
    folder = out / layout.FILTERS
    check_network(out, loaded, "filters", own=[(layout.FILTERS, layout.MANIFEST)])
    if (link := symlink_under(folder)) is not None:
        raise ConvmapsError(f"{link} is a symlink: convmaps writes nothing through one inside "
                            "OUT; remove it or choose another --out")
    with locked(folder):  # one filters run at a time: no mixed files
        claim(folder, fingerprint, o.resume, remove=_remove_filters, what="filters")
        files = layout.filters_files(tuple(weights), o.png)
        header = {"convmaps": __version__, "model": loaded.arch, "weights": loaded.weights,
                  "run": fingerprint, "identity": identity(loaded), "options": options,
                  "modules": list(weights), "files": files}
        # the manifest first: a killed run's files are listed, so they can go later
        write_json(folder / layout.MANIFEST, manifests.build(header, []))
        meta = {"convmaps": __version__, "model": loaded.arch, "weights": loaded.weights,
                "dtype": "float32", "run": fingerprint,
                "options": json.dumps(options, sort_keys=True)}
        meta.update({f"module.{x.name}": repr(x.module) for x in convs})
        save_tensors(folder / layout.FILTER_WEIGHTS, weights, meta)
        notes = []
        for name, w in weights.items():
            note = None
            if o.png:
                img, note = render.filter_grid(w, max_filters=o.png_cap, max_kernels=o.png_cap,
                                               title=f"{loaded.arch} · {name}")
                write_bytes(folder / layout.filter_png(name), render.png_bytes(img, note=note))
            notes.append((name, note))
            if on_phase and o.png:
                on_phase("grids", len(notes), len(weights))
        return notes


def _remove_filters(folder: Path, m: dict[str, Any]) -> None:
    """Remove the files a filters manifest lists, never anything else."""
    mine = {f for f in m.get("files", []) if layout.is_filters_output(f)}
    clear_folder(folder.parent, folder.name, set(), lambda rel: rel in mine)
    remove_report(folder.parent)  # it showed the old filters
