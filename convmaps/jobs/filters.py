"""Filters: every selected conv weight of a model into `OUT/filters/`, with one PNG grid each.

    >>> from convmaps.options import FilterOptions
    >>> import tempfile
    >>> [name for name, _ in run_filters(FilterOptions("lenet", out=tempfile.mkdtemp()))]
    ['C1', 'C3', 'C5']
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from torch import nn

from convmaps import __version__
from convmaps.core.capture import select
from convmaps.core.models import load_model
from convmaps.errors import ConvmapsError
from convmaps.io.store import save_tensors, write_bytes
from convmaps.options import FilterOptions

__all__ = ["FILTERS", "run_filters"]

FILTERS = "filters"  # the folder under OUT


def run_filters(o: FilterOptions) -> list[tuple[str, str | None]]:
    """`convmaps filters`: every selected conv weight into OUT/filters/filters.safetensors and
    one PNG grid per conv. Returns (module name, cap note or None) per conv."""
    from convmaps import render

    if o.png_cap < 1:
        raise ConvmapsError(f"png_cap must be at least 1, not {o.png_cap}")
    loaded = load_model(o.model, o.weights, o.arch)
    convs = select(loaded.model, o.layers or "conv", conv_only=True)
    folder = Path(o.out) / FILTERS
    weights = {x.name: x.module.weight.detach().cpu() for x in convs
               if isinstance(x.module, nn.Conv2d)}
    options = {k: v for k, v in asdict(o).items() if k not in ("out", "config")}
    meta = {"convmaps": __version__, "model": loaded.arch, "weights": loaded.weights,
            "dtype": "float32", "options": json.dumps(options, sort_keys=True)}
    meta.update({f"module.{x.name}": repr(x.module) for x in convs})
    save_tensors(folder / "filters.safetensors", weights, meta)
    notes = []
    for name, w in weights.items():
        note = None
        if o.png:
            img, note = render.filter_grid(w, max_filters=o.png_cap, max_kernels=o.png_cap)
            write_bytes(folder / "png" / f"{name}.png", render.png_bytes(img, note=note))
        notes.append((name, note))
    return notes
