"""Render: tensors in, pictures out (feature-map grids, filters, vectors, tap mosaics), as PIL
images or, for a dump, as PNG bytes deflated straight from the drawing (`draw`).

Every picture is a palette ("P") image: each value becomes the index of its colour in a
255-entry colour map, so nothing is drawn in RGB and mapped back. Under the grid a colour
bar shows the value range with the numbers at its ends (and 0 on a diverging scale); the
range is also in `img.info` (written to PNG tEXt chunks by `png_bytes`) so that a program
can map colours back to values. Tiles carry their channel number when there is room, long
vectors wrap into a near-square grid with row and column ticks (a classifier's output, named
by its classes, is a bar chart of its top ten), and small maps and kernels are upscaled
(nearest neighbour) to tiles of at least ~32 px. A standalone picture has a title strip at
its top: where it comes from (model, module, image) and what a tile is. Nothing here writes files or
keeps mutable state (caches hold read-only arrays), so every function is thread-safe.

Split by what it draws, imports flowing one way: `png` (PNG encoding) <- `scales` (value
ranges, colour maps) <- `grids` (tensors to tile grids) <- `figures` (composed RGB figures:
projections, top-k) <- `plots` (line plots: invariance). This module only gathers their
public names.

    >>> import torch
    >>> from convmaps.render import map_grid, png_bytes
    >>> img = map_grid(torch.randn(16, 5, 5))
    >>> img.size, img.mode
    ((266, 344), 'P')
    >>> png_bytes(img)[:8]
    b'\\x89PNG\\r\\n\\x1a\\n'
"""

from __future__ import annotations

from convmaps.render.figures import (
    explain_figure,
    occlusion_figure,
    picture,
    projection_figure,
    shrink,
    signed_picture,
    topk_figure,
    topk_overview,
    topk_png_bound,
)
from convmaps.render.grids import (
    Picture,
    chart_size,
    draw,
    filter_grid,
    grid_geometry,
    image_size,
    map_grid,
    png_bound,
    render_activation,
    tap_mosaic,
    upscale_factor,
    vector_grid,
)
from convmaps.render.plots import invariance_plot
from convmaps.render.png import png_bytes
from convmaps.render.scales import Scale, choose_scale, colorize, robust_limit

__all__ = [
    "explain_figure",
    "Picture",
    "Scale",
    "chart_size",
    "choose_scale",
    "colorize",
    "draw",
    "filter_grid",
    "grid_geometry",
    "image_size",
    "invariance_plot",
    "map_grid",
    "occlusion_figure",
    "picture",
    "png_bound",
    "png_bytes",
    "projection_figure",
    "render_activation",
    "robust_limit",
    "shrink",
    "signed_picture",
    "tap_mosaic",
    "topk_figure",
    "topk_overview",
    "topk_png_bound",
    "upscale_factor",
    "vector_grid",
]
