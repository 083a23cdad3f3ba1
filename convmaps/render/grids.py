"""Tensors to tile grids: feature maps, vectors, filters and tap mosaics as palette pictures.

Tiles carry their channel number when there is room, long vectors wrap into a near-square
grid with row and column ticks, and small maps and kernels are upscaled (nearest neighbour)
to tiles of at least ~32 px. Under the grid a colour bar shows the value range with the
numbers at its ends (and 0 on a diverging scale). The geometry of a picture (`_Geom`) is pure
arithmetic on shapes, so that `image_size`, `grid_geometry` and `png_bound` know a picture
without drawing it. Caches hold read-only arrays only, so every function is thread-safe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
from numpy.lib.stride_tricks import as_strided
from PIL import Image, ImageFont
from torch import Tensor

from convmaps.options import PngScale
from convmaps.render.png import _palette_png
from convmaps.render.scales import (
    _GUTTER,
    _INK,
    _LEVELS,
    _PAPER,
    _SPECIALS,
    Scale,
    _choose,
    _flat,
    _indices,
    _info,
    _limits,
    _palette_array,
    _values,
)

__all__ = [
    "Picture",
    "draw",
    "filter_grid",
    "chart_size",
    "grid_geometry",
    "image_size",
    "map_grid",
    "png_bound",
    "render_activation",
    "tap_mosaic",
    "upscale_factor",
    "vector_grid",
]


_RGB_GUTTER = 255  # white around RGB filter tiles: mid grey is what a zero weight looks like

_TARGET_PX = 32  # small maps and kernels are upscaled to tiles of about this side
_GRID_PX = 256  # a grid of few tiles (LeNet's) is upscaled further, to about this width
_LABEL_MIN_PX = 24  # tiles at least this wide carry their channel number
_TILE_GAP = 2  # white between labelled tiles
_FONT_W, _FONT_H = 6, 11  # Pillow's bitmap font: every glyph is a 6 x 11 cell
_LINE = _FONT_H + 1
_PAD = 4
_BAR_H = 10
_LEGEND_H = _PAD + _BAR_H + 3 + _FONT_H + 2  # margin, bar, tick marks, numbers, margin
_MIN_W = 200  # room for the bar's three numbers however narrow the grid
_VECTOR_PX = 256  # a long vector's grid is about this wide
_TOP_K = 5  # a vector lists its strongest entries (classes, when named)
_CAP_HINT = "--png-cap"
_MAX_SIDE = 4096
# A standalone PNG says what it shows in two lines at its top: where it comes from (model,
# module, image) and what a tile is. A fixed height, so that a picture's geometry stays
# arithmetic on its shape (`image_size`, `grid_geometry`) whatever the words.
_TITLE_H = 2 * _LINE + 4
_CHART_TOP = 10  # a classifier's output: a bar chart of its ten largest scores
_CHART_NAME = 24  # characters of a class name in the chart
_CHART_BAR_PX = 160
_CHART_ROW = _LINE + 3
_CHART_VALUE = 18  # characters of "12.34  p 0.9876"


def upscale_factor(h: int, w: int, target: int = _TARGET_PX, max_factor: int = 16) -> int:
    """Integer nearest-neighbour factor bringing the longer side of a tile nearest to `target`
    px (13 -> 26 rather than 39: every pixel is paid for in encoding time), at least 1.

    >>> upscale_factor(5, 5), upscale_factor(6, 6), upscale_factor(13, 13), upscale_factor(1, 1)
    (6, 5, 2, 16)
    """
    side = max(h, w)
    if side <= 0:
        return 1
    return max(1, min(max_factor, round(target / side)))


def map_grid(
    maps: Tensor,
    scale: Scale | None = None,
    max_tiles: int | None = None,
    png_scale: PngScale | str = PngScale.layer,
    title: str | None = None,
) -> Image.Image:
    """One tile per channel of a (C, H, W) map, near-square grid, numbered tiles, colour bar;
    with a `title` (model, module, image), a strip at the top says it and what a tile is.

    With `png_scale="layer"` one value range serves every tile, so that tiles compare; with
    "channel" each tile has its own (the bar then says "per channel" and `convmaps-range`
    lists every channel's range, `;`-separated). Ranges (and the scale, when not given) come
    from all C channels, even when `max_tiles` draws only the first few.

    >>> import torch
    >>> map_grid(torch.rand(6, 28, 28)).size  # 3x2 numbered tiles of 84 px, a colour bar
    (256, 224)
    """
    head = None if title is None else (title, _what("maps", tuple(maps.shape)))
    return _map_grid(maps, scale, max_tiles, png_scale, head).image()


_Head = tuple[str, str]  # a title strip's two lines: where from, and what a tile is


def _map_grid(maps: Tensor, scale: Scale | None = None, max_tiles: int | None = None,
              png_scale: PngScale | str = PngScale.layer, head: _Head | None = None
              ) -> Picture:
    if maps.dim() != 3:
        raise ValueError(f"map_grid wants (C, H, W), got shape {tuple(maps.shape)}")
    x = _values(maps)
    scale = _choose(_flat(x)) if scale is None else Scale(scale)
    per_channel = PngScale(png_scale) is PngScale.channel
    groups = x.reshape(x.shape[0], x.shape[1] * x.shape[2]) if per_channel else _flat(x)[None]
    lo, hi = _limits(groups, scale)
    info = _info(scale, lo, hi, per_channel)
    if max_tiles is not None:
        x = x[: max(max_tiles, 0)]
    c, h, w = x.shape
    geom = _grid_layout(c, h, w, per_channel, _TITLE_H if head else 0)
    if geom is None:
        return _empty(info)
    if per_channel:
        lo, hi = lo[:c, None, None], hi[:c, None, None]
    rows, canvas = _canvas(geom, scale, per_channel)
    cells = _pad(_indices(x, lo, hi), geom.rows * geom.cols, _PAPER)
    _blit(canvas, cells.reshape(geom.rows, geom.cols, h, w), geom)
    if not per_channel:
        _bar_numbers(canvas, geom, float(lo[0]), float(hi[0]))
    _title(canvas, head)
    return Picture(rows, _palette_array(scale), info)


def vector_grid(
    vec: Tensor, scale: Scale | None = None, classes: Sequence[str] | None = None,
    title: str | None = None,
) -> Image.Image:
    """A 1-D output (a Linear layer's N values) wrapped row by row into a near-square grid,
    with row ticks (the index each row starts at) and column ticks, a colour bar, and the
    five largest values listed under it, named by `classes` when it has N names.

    >>> import torch
    >>> vector_grid(torch.randn(1000)).size  # 32 x 32 cells of 8 px, ticks, bar, top 5
    (278, 362)
    """
    head = None if title is None else (title, _what("vector", (vec.numel(),)))
    return _vector_grid(vec, scale, classes, head).image()


def _vector_grid(vec: Tensor, scale: Scale | None = None,
                 classes: Sequence[str] | None = None, head: _Head | None = None) -> Picture:
    x = _flat(_values(vec))
    scale = _choose(x) if scale is None else Scale(scale)
    lo, hi = _limits(x[None], scale)
    info = _info(scale, lo, hi, False)
    n = x.size
    geom = _vector_layout(n, _TITLE_H if head else 0)
    if geom is None:
        return _empty(info)
    rows, canvas = _canvas(geom, scale, False)
    cells = _pad(_indices(x, lo, hi), geom.rows * geom.cols, _PAPER)
    _blit(canvas, cells.reshape(geom.rows, geom.cols, 1, 1), geom)
    _bar_numbers(canvas, geom, float(lo[0]), float(hi[0]))
    names = list(classes) if classes is not None and len(classes) == n else None
    _lines(canvas, geom, _strongest(x, names))
    _title(canvas, head)
    return Picture(rows, _palette_array(scale), info)


def render_activation(
    t: Tensor,
    max_tiles: int | None = None,
    classes: Sequence[str] | None = None,
    png_scale: PngScale | str = PngScale.layer,
    title: str | None = None,
) -> Image.Image:
    """A module's output for one image, drawn by its shape.

    (C, H, W) -> `map_grid` (or `vector_grid` when H = W = 1); (H, W) -> a one-tile
    `map_grid`; anything else is flattened: with one name in `classes` per value (a
    classifier's output), a bar chart of the ten largest values and their classes, else a
    `vector_grid`. With a `title`, a strip at the top says it and what a tile is.

    >>> import torch
    >>> render_activation(torch.rand(10), classes=[str(i) for i in range(10)]).size
    (462, 158)
    """
    return _activation(t, max_tiles, classes, png_scale, title).image()


def _activation(t: Tensor, max_tiles: int | None = None, classes: Sequence[str] | None = None,
                png_scale: PngScale | str = PngScale.layer, title: str | None = None
                ) -> Picture:
    named = classes is not None and len(classes) == t.numel() > 0
    kind = "maps" if t.dim() == 3 and t.shape[1] * t.shape[2] != 1 else \
        "map" if t.dim() == 2 else "chart" if named else "vector"
    head = None if title is None else (title, _what(kind, tuple(t.shape)))
    if kind == "maps":
        return _map_grid(t, max_tiles=max_tiles, png_scale=png_scale, head=head)
    if kind == "map":
        return _map_grid(t[None], png_scale=png_scale, head=head)
    if kind == "chart":
        assert classes is not None
        return _chart(t.flatten(), list(classes), head)
    return _vector_grid(t.flatten(), classes=classes, head=head)


def draw(kind: str, t: Tensor, classes: Sequence[str] | None = None,
         png_scale: PngScale | str = PngScale.layer, title: str = "") -> Picture:
    """The picture of `t` that a dump writes, as `image_size(kind, t.shape)` measures it:
    `activation` (`render_activation`), `kernels` (`map_grid` of one filter's kernel maps)
    or `taps` (`tap_mosaic` of one filter's tap maps, its note inside). Each is a standalone
    file, so each has a title strip: `title` (model, module, image) and what a tile is.

    >>> import torch
    >>> draw("kernels", torch.rand(3, 5, 5), title="lenet · C3 · a.png · filter 0").png()[:8]
    b'\\x89PNG\\r\\n\\x1a\\n'
    """
    if kind == "taps":
        return _tap_mosaic(t, head=(title, _what("taps", tuple(t.shape))))
    if kind == "kernels":
        return _map_grid(t, png_scale=png_scale, head=(title, _what("kernels", tuple(t.shape))))
    return _activation(t, classes=classes, png_scale=png_scale, title=title)


def filter_grid(
    weight: Tensor, max_filters: int = 64, max_kernels: int = 64, title: str | None = None
) -> tuple[Image.Image, str | None]:
    """A conv layer's filters, on one diverging range s for the whole layer.

    `weight` is (C_out, C_in/groups, kh, kw). With 3 input channels each filter is one RGB
    tile whose R, G, B are its three kernels, each value v shown as 0.5 + v/(2s); with one,
    each filter is one numbered tile; otherwise row i holds filter i's kernels, one column
    per input channel, with ticks. Kernels are upscaled to tiles of ~32 px. Returns the
    image and, when a cap cut something off, a note saying what was drawn (also written
    under the colour bar). With a `title` (model, module), a strip at the top says it and
    what a tile is.

    >>> import torch
    >>> img, note = filter_grid(torch.randn(96, 3, 11, 11))
    >>> img.size, note
    ((278, 418), 'drew 64 of 96 filters (cap: --png-cap)')
    """
    if weight.dim() != 4:
        raise ValueError(f"filter_grid wants (C_out, C_in, kh, kw), got {tuple(weight.shape)}")
    if max_filters < 1 or max_kernels < 1:
        raise ValueError(f"caps must be >= 1, got {max_filters=} {max_kernels=}")
    x = _values(weight)
    lo, hi = _limits(_flat(x)[None], Scale.DIVERGING)
    info = _info(Scale.DIVERGING, lo, hi, False)
    c_out, c_in, kh, kw = x.shape
    if c_out * c_in * kh * kw == 0:
        return _empty(info).image(), None
    rows, cols = min(c_out, max_filters), min(c_in, max_kernels)
    head = None if title is None else (title, _what("filters", tuple(x.shape)))
    top = _TITLE_H if head else 0
    note = None
    if c_in in (1, 3) and rows < c_out:
        note = f"drew {rows} of {c_out} filters (cap: {_CAP_HINT})"
    elif c_in not in (1, 3) and (rows < c_out or cols < c_in):
        note = f"drew {rows} of {c_out} filters x {cols} of {c_in} kernels (cap: {_CAP_HINT})"
    if c_in in (1, 3):
        geom = _noted(_tiles(rows, kh, kw, _tile_factor(rows, kh, kw), head=top), note)
        kind = "rgb" if c_in == 3 else Scale.DIVERGING
        buf, canvas = _canvas(geom, kind, False)
        if c_in == 1:
            cells = _pad(_indices(x[:rows, 0], lo, hi), geom.rows * geom.cols, _PAPER)
            _blit(canvas, cells.reshape(geom.rows, geom.cols, kh, kw), geom)
    else:
        geom = _noted(_matrix(rows, cols, kh, kw, upscale_factor(kh, kw), 1, 1, head=top), note)
        kind = Scale.DIVERGING
        buf, canvas = _canvas(geom, kind, False)
        _blit(canvas, _indices(x[:rows, :cols], lo, hi), geom)
    _bar_numbers(canvas, geom, float(lo[0]), float(hi[0]))
    _lines(canvas, geom, _wrap(note, geom))
    _title(canvas, head)
    if c_in != 3:
        return Picture(buf, _palette_array(kind), info).image(), note
    rgb = np.ascontiguousarray(_palette_array("rgb")[canvas])  # (H, W, 3)
    with np.errstate(invalid="ignore"):
        t01 = np.nan_to_num((x[:rows] - lo[0]) / (hi[0] - lo[0]), nan=0.0)
    # Same equal-width bins as the colour maps, so a zero weight is exactly mid grey (128).
    tiles = np.minimum(np.clip(t01, 0, 1) * 256, 255).astype(np.uint8)  # (rows, 3, kh, kw)
    for k in range(3):
        cells = _pad(tiles[:, k], geom.rows * geom.cols, _RGB_GUTTER)
        _blit(rgb[..., k], cells.reshape(geom.rows, geom.cols, kh, kw), geom)
    img = Image.fromarray(rgb, "RGB")
    img.info.update(info)
    img.info["convmaps-scale"] = "rgb"
    return img, note


def tap_mosaic(taps: Tensor, max_side: int = _MAX_SIDE, title: str | None = None
               ) -> tuple[Image.Image, str | None]:
    """One filter's tap maps (H_out, W_out, kh, kw) as a mosaic: window (i, j)'s patch at (i, j).

    Patches are upscaled to ~32 px with a 1 px grey gutter between windows (1x1 kernels:
    no gutter, the whole map upscaled), with window ticks and a colour bar, on the
    diverging scale. Windows that would push a side past `max_side` px are left out (the
    top-left ones are kept) and the note says so.

    >>> import torch
    >>> img, note = tap_mosaic(torch.randn(13, 13, 5, 5))
    >>> img.size, note
    ((418, 446), None)
    """
    head = None if title is None else (title, _what("taps", tuple(taps.shape)))
    pic = _tap_mosaic(taps, max_side, head)
    return pic.image(), pic.note


def _tap_mosaic(taps: Tensor, max_side: int = _MAX_SIDE, head: _Head | None = None) -> Picture:
    if taps.dim() != 4:
        raise ValueError(f"tap_mosaic wants (H_out, W_out, kh, kw), got {tuple(taps.shape)}")
    x = _values(taps)
    lo, hi = _limits(_flat(x)[None], Scale.DIVERGING)
    info = _info(Scale.DIVERGING, lo, hi, False)
    layout = _tap_layout(tuple(x.shape), max_side, _TITLE_H if head else 0)
    if layout is None:
        return _empty(info)
    geom, note = layout
    rows, canvas = _canvas(geom, Scale.DIVERGING, False)
    _blit(canvas, _indices(x[: geom.rows, : geom.cols], lo, hi), geom)
    _bar_numbers(canvas, geom, float(lo[0]), float(hi[0]))
    _lines(canvas, geom, _wrap(note, geom))
    _title(canvas, head)
    return Picture(rows, _palette_array(Scale.DIVERGING), info, note)


def image_size(kind: str, shape: tuple[int, ...],
               png_scale: PngScale | str = PngScale.layer, titled: bool = True
               ) -> tuple[int, int]:
    """(width, height) in pixels of the picture drawn for a tensor of `shape`, without drawing
    it: `activation` (render_activation), `kernels` (map_grid of one filter's (C_in, H, W)
    kernel maps) or `taps` (tap_mosaic of one filter's (H, W, kh, kw) tap maps); `titled`:
    with a title strip, as `draw` makes them. A classifier's chart is `chart_size()`.

    >>> image_size("activation", (6, 28, 28)), image_size("activation", (6, 28, 28), "channel")
    ((256, 252), (256, 266))
    """
    geom: _Geom | None
    per_channel = PngScale(png_scale) is PngScale.channel
    head = _TITLE_H if titled else 0
    if kind == "taps":
        layout = _tap_layout(tuple(shape), _MAX_SIDE, head)
        geom = layout[0] if layout else None
    elif len(shape) == 3 and shape[1] * shape[2] != 1:
        geom = _grid_layout(*shape, per_channel, head)
    elif len(shape) == 2:
        geom = _grid_layout(1, *shape, per_channel, head)
    else:
        geom = _vector_layout(math.prod(shape), head)
    return (geom.width, geom.height) if geom else (1, 1)


def grid_geometry(shape: tuple[int, ...], png_scale: PngScale | str = PngScale.layer,
                  titled: bool = True) -> dict[str, int] | None:
    """Where each channel's tile lies in the activation picture of a tensor of `shape`
    (None for vectors and empty tensors): tile i's values start at (left + (i % cols) * px,
    top + (i // cols) * py + band) and span w x h pixels; `titled` as for `image_size`. The
    report uses it to name the channel under the mouse."""
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or shape[1] * shape[2] == 1:
        return None
    geom = _grid_layout(*shape, PngScale(png_scale) is PngScale.channel,
                        _TITLE_H if titled else 0)
    if geom is None:
        return None
    return {"left": geom.left, "top": geom.top, "px": geom.pitch_x, "py": geom.pitch_y,
            "band": geom.band, "w": geom.w * geom.f, "h": geom.h * geom.f, "cols": geom.cols,
            "n": geom.n, "width": geom.width, "height": geom.height}


def png_bound(kind: str, shape: tuple[int, ...], png_scale: PngScale | str = PngScale.layer,
              titled: bool = True) -> int:
    """An upper bound of the PNG bytes `png_bytes` writes for that picture (a 1-D output's
    classifier chart included): its raw palette rows plus deflate's worst-case overhead and
    the chunks around the pixels (palette, text: a per-channel range list is ~30 bytes a
    channel)."""
    w, h = image_size(kind, shape, png_scale, titled)
    raw = h * (w + 1)
    if kind == "activation" and not (len(shape) in (2, 3) and math.prod(shape[-2:]) != 1):
        cw, ch = chart_size(titled)
        raw = max(raw, ch * (cw + 1))
    text = 32 * shape[0] if PngScale(png_scale) is PngScale.channel and shape else 0
    return raw + raw // 1000 + 5 * (raw // 16_000 + 1) + 4096 + text


def _largest(x: np.ndarray, k: int) -> list[int]:
    """The indices of the k largest values (NaN last, ties to the smaller index)."""
    key = -np.nan_to_num(x, nan=-np.inf)
    if key.size > k:  # a partial sort: a full one of 9216 values costs more than drawing
        # ties at the k-th value: every tied index joins, and the stable sort keeps the smallest
        cut = np.partition(key, k - 1)[k - 1]
        near = np.flatnonzero(key <= cut)
        order = near[np.argsort(key[near], kind="stable")][:k]
    else:
        order = np.argsort(key, kind="stable")
    return [int(i) for i in order.tolist()]


def _strongest(x: np.ndarray, names: list[str] | None) -> list[str]:
    """The largest values (NaN last, ties to the smaller index), one line each."""
    lines = []
    for rank, i in enumerate(_largest(x, _TOP_K), 1):
        what = f"{i} {names[i]}" if names else f"{i}"
        lines.append(f"{rank}. {what}: {x[i]:.4g}")
    return lines


def _what(kind: str, shape: tuple[int, ...]) -> str:
    """A title strip's second line: what the picture's tiles (cells, bars) are."""
    if kind == "maps":  # one tile is the narrowest grid: 200 px, 32 characters
        return f"{shape[0]} feature maps, one tile per channel" if shape[0] > 1 else \
            f"one {shape[1]}x{shape[2]} feature map"
    if kind == "map":
        return f"one {shape[0]}x{shape[1]} map"
    if kind == "chart":
        n = math.prod(shape)
        return f"top {min(n, _CHART_TOP)} of {n} class scores (p: softmax)"
    if kind == "vector":
        return f"{math.prod(shape)} values, row by row"
    if kind == "kernels":
        return f"{shape[0]} kernel maps, one per input channel"
    if kind == "taps":
        return f"{shape[0]}x{shape[1]} windows, each its {shape[2]}x{shape[3]} input*weight"
    c_out, c_in = shape[0], shape[1]  # filters
    if c_in == 3:
        return f"{c_out} filters, one RGB tile each"
    if c_in == 1:
        return f"{c_out} filters, one tile each"
    return f"{c_out} filters (rows) x {c_in} kernels"


def _title(canvas: np.ndarray, head: _Head | None) -> None:
    """Ink a title strip's two lines (cut to the picture's width) at the top of `canvas`."""
    if head is None:
        return
    room = (canvas.shape[1] - 2 * _PAD) // _FONT_W
    for i, line in enumerate(head):
        if len(line) > room:
            line = line[: room - 3] + "..."
        if line:  # piece by piece: a dump repeats each module and image name, not the line
            mask = np.hstack([_glyphs(p) for p in _interleave(line.split(_SEP), _SEP) if p])
            _ink(canvas, mask, 2 + i * _LINE, _PAD)


_SEP = " · "


def _interleave(parts: list[str], sep: str) -> list[str]:
    out = [sep] * (2 * len(parts) - 1)
    out[::2] = parts
    return out


def chart_size(titled: bool = True) -> tuple[int, int]:
    """(width, height) of a classifier's bar chart: fixed, whatever its classes."""
    width = 2 * _PAD + (_CHART_NAME + 6) * _FONT_W + _CHART_BAR_PX + 6 + _CHART_VALUE * _FONT_W
    return width, (_TITLE_H if titled else 0) + 2 * _PAD + _CHART_TOP * _CHART_ROW


def _chart(vec: Tensor, names: list[str], head: _Head | None) -> Picture:
    """A classifier's output as a horizontal bar chart of its ten largest scores: rank and
    class on the left, a bar from zero (warm: positive, cool: negative), the score and its
    softmax probability on the right. The text chunks keep the vector's robust range."""
    x = _flat(_values(vec))
    scale = _choose(x)
    lo, hi = _limits(x[None], scale)
    info = _info(scale, lo, hi, False)
    width, height = chart_size(head is not None)
    canvas = np.full((height, width + 1), _PAPER, dtype=np.uint8)
    canvas[:, 0] = 0  # PNG's filter byte
    pix = canvas[:, 1:]
    order = _largest(x, _CHART_TOP)
    with np.errstate(over="ignore", invalid="ignore"):
        finite = x[np.isfinite(x)].astype(np.float64)
        e = np.exp(finite - finite.max()) if finite.size else finite
        total = float(e.sum()) if e.size else 1.0
        top = float(finite.max()) if finite.size else 0.0
    shown = [float(x[i]) for i in order if np.isfinite(x[i])]
    a, b = min([0.0, *shown]), max([0.0, *shown])
    span = (b - a) or 1.0
    bar_x = _PAD + (_CHART_NAME + 6) * _FONT_W
    zero = bar_x + round(-a / span * _CHART_BAR_PX)
    y0 = (_TITLE_H if head else 0) + _PAD
    for rank, i in enumerate(order, 1):
        y = y0 + (rank - 1) * _CHART_ROW
        name = names[i] if len(names[i]) <= _CHART_NAME else names[i][: _CHART_NAME - 3] + "..."
        _text(pix, f"{rank:>2}. {name}", y + 1, bar_x - 4, align="right")
        v = float(x[i])
        if math.isfinite(v):
            end = bar_x + round((v - a) / span * _CHART_BAR_PX)
            left, right = min(zero, end), max(zero, end)
            pix[y + 1 : y + _LINE, left : max(right, left + 1)] = \
                _LEVELS - 1 - 20 if v >= 0 else 20
            p = math.exp(v - top) / total
            label = f"{v:.4g}  p {p:.3f}"
        else:
            label = f"{v}"
        _text(pix, label, y + 1, bar_x + _CHART_BAR_PX + 6)
    pix[y0 - 2 : y0 + len(order) * _CHART_ROW, zero] = _INK  # the zero line
    _title(pix, head)
    return Picture(canvas, _palette_array(Scale.DIVERGING), info)


# --- layout ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geom:
    """Where everything of one picture goes; pure arithmetic on shapes, shared by the drawing
    functions and `image_size`."""

    rows: int
    cols: int
    n: int  # cells that hold values (tile grids number these)
    h: int  # values per cell, before upscaling
    w: int
    f: int  # nearest-neighbour factor
    band: int  # label band above each cell (tile grids); 0: none
    gap: int  # between cells
    gap_colour: int
    row_unit: int  # matrices: a row tick says row * row_unit; 0: tile grid, no ticks
    left: int  # the grid's top-left corner
    top: int
    width: int
    height: int
    lines: int  # text lines under the colour bar
    head: int = 0  # the title strip above everything (0: none)

    @property
    def pitch_y(self) -> int:
        return self.band + self.h * self.f + self.gap

    @property
    def pitch_x(self) -> int:
        return self.w * self.f + self.gap

    @property
    def grid_w(self) -> int:
        return self.cols * self.pitch_x - self.gap

    @property
    def grid_h(self) -> int:
        return self.rows * self.pitch_y - self.gap

    @property
    def legend(self) -> int:
        return self.top + self.grid_h


def _place(rows: int, cols: int, n: int, h: int, w: int, f: int, band: int, gap: int,
           gap_colour: int, row_unit: int, lines: int, head: int = 0) -> _Geom:
    grid_w = cols * (w * f + gap) - gap
    grid_h = rows * (band + h * f + gap) - gap
    left, top = 0, head
    if row_unit:
        left = len(str((rows - 1) * row_unit)) * _FONT_W + 4  # numbers, a gap, a 2 px tick
        top += _LINE + 2
    content = left + grid_w
    width = max(content, _MIN_W)
    left += (width - content) // 2  # a narrow grid sits in the middle, above the bar
    height = top + grid_h + _LEGEND_H + (lines * _LINE + 2 if lines else 0)
    return _Geom(rows, cols, n, h, w, f, band, gap, gap_colour, row_unit, left, top, width,
                 height, lines, head)


def _tiles(n: int, h: int, w: int, f: int, lines: int = 0, head: int = 0) -> _Geom:
    """n numbered tiles of h x w values in a near-square grid."""
    cols = 1 if n == 1 else math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    room = w * f >= _LABEL_MIN_PX and len(str(n - 1)) * _FONT_W <= w * f
    return _place(rows, cols, n, h, w, f, _LINE if room else 0, _TILE_GAP, _PAPER, 0, lines,
                  head)


def _matrix(rows: int, cols: int, h: int, w: int, f: int, gap: int, row_unit: int,
            lines: int = 0, head: int = 0) -> _Geom:
    """rows x cols cells of h x w values with row and column ticks."""
    return _place(rows, cols, rows * cols, h, w, f, 0, gap, _GUTTER, row_unit, lines, head)


def _grid_layout(c: int, h: int, w: int, per_channel: bool = False, head: int = 0
                 ) -> _Geom | None:
    if c * h * w == 0:
        return None
    return _tiles(c, h, w, _tile_factor(c, h, w), 1 if per_channel else 0, head)  # a caption


def _tile_factor(n: int, h: int, w: int) -> int:
    """Tiles of ~32 px, and a grid of few tiles ~256 px wide: LeNet's six 28x28 maps are
    drawn at 84 px, while AlexNet's 384 maps of 13x13 stay at 26 px (pixels cost encoding
    time, and a wide grid is legible already)."""
    cols = 1 if n == 1 else math.ceil(math.sqrt(n))
    wide = round(_GRID_PX / max(cols * w, 1))
    return max(upscale_factor(h, w), min(16, wide))


def _vector_layout(n: int, head: int = 0) -> _Geom | None:
    if n == 0:
        return None
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    px = max(2, min(_TARGET_PX, math.ceil(_VECTOR_PX / cols)))
    return _matrix(rows, cols, 1, 1, px, 0, cols, min(n, _TOP_K), head)


def _tap_layout(shape: tuple[int, ...], max_side: int, head: int = 0
                ) -> tuple[_Geom, str | None] | None:
    h_out, w_out, kh, kw = shape
    if h_out * w_out * kh * kw == 0:
        return None
    # 1x1 kernels: each window is one value, so the mosaic is the map itself, no gutter.
    gap, f = (1, upscale_factor(kh, kw)) if kh * kw > 1 else (0, upscale_factor(h_out, w_out))
    rows = max(1, min(h_out, (max_side + gap) // (kh * f + gap)))
    cols = max(1, min(w_out, (max_side + gap) // (kw * f + gap)))
    note = None
    if rows < h_out or cols < w_out:
        note = f"drew the top-left {rows}x{cols} of {h_out}x{w_out} windows (cap: {max_side} px)"
    return _noted(_matrix(rows, cols, kh, kw, f, gap, 1, 0, head), note), note


def _wrap(note: str | None, geom: _Geom) -> list[str]:
    """A note as lines that fit the picture's width, broken at spaces."""
    room = (geom.width - 2 * _PAD) // _FONT_W
    lines: list[str] = []
    for word in (note or "").split():
        if lines and len(lines[-1]) + 1 + len(word) <= room:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _noted(geom: _Geom, note: str | None) -> _Geom:
    """`geom` with room for `note` under the colour bar."""
    extra = len(_wrap(note, geom))
    if not extra:
        return geom
    return _place(geom.rows, geom.cols, geom.n, geom.h, geom.w, geom.f, geom.band, geom.gap,
                  geom.gap_colour, geom.row_unit, geom.lines + extra, geom.head)


def _nice_step(pitch: int, room: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50 … whose ticks are at least `room` px apart."""
    step = 1
    while step * pitch < room:
        step = step * 5 // 2 if str(step)[0] == "2" else step * 2
    return step


# --- drawing ---------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _frame(geom: _Geom, kind: str, per_channel: bool) -> np.ndarray:
    """Everything of a picture that does not depend on the values: background, gutters,
    tile numbers, ticks, the colour bar and its fixed labels. Read-only; callers copy it."""
    canvas = np.full((geom.height, geom.width), _PAPER, dtype=np.uint8)
    if geom.gap_colour != _PAPER:
        canvas[geom.top : geom.legend, geom.left : geom.left + geom.grid_w] = geom.gap_colour
    if geom.band:
        for i in range(geom.n):
            r, c = divmod(i, geom.cols)
            _text(canvas, str(i), geom.top + r * geom.pitch_y, geom.left + c * geom.pitch_x)
    if geom.row_unit:
        _ticks(canvas, geom)
    _bar(canvas, geom, kind, per_channel)
    canvas.setflags(write=False)
    return canvas


def _ticks(canvas: np.ndarray, geom: _Geom) -> None:
    cell_h, cell_w = geom.h * geom.f, geom.w * geom.f
    for r in range(0, geom.rows, _nice_step(geom.pitch_y, _LINE)):
        y = geom.top + r * geom.pitch_y + cell_h // 2
        canvas[y, geom.left - 3 : geom.left - 1] = _INK
        _text(canvas, str(r * geom.row_unit), y - _FONT_H // 2, geom.left - 4, align="right")
    room = len(str(geom.cols - 1)) * _FONT_W + 4
    for c in range(0, geom.cols, _nice_step(geom.pitch_x, room)):
        x = geom.left + c * geom.pitch_x + cell_w // 2
        canvas[geom.top - 3 : geom.top - 1, x] = _INK
        _text(canvas, str(c), geom.head, x, align="centre")


def _bar_box(geom: _Geom) -> tuple[int, int, int]:
    """(top, left, width) of the colour bar; an odd width, so that the middle column is the
    middle colour (zero on a diverging scale)."""
    w = geom.width - 2 * _PAD
    return geom.legend + _PAD, _PAD, w - 1 + w % 2


def _bar(canvas: np.ndarray, geom: _Geom, kind: str, per_channel: bool) -> None:
    y, x, w = _bar_box(geom)
    canvas[y - 1 : y + _BAR_H + 1, x - 1 : x + w + 1] = _INK  # a frame: coolwarm's middle
    # is light grey, which needs an edge on white paper
    ramp = np.minimum((np.arange(w) + 0.5) * _LEVELS / w, _LEVELS - 1).astype(np.uint8)
    canvas[y : y + _BAR_H, x : x + w] = ramp
    marks = [x, x + w - 1]
    text_y = y + _BAR_H + 3
    signed = kind != Scale.SEQUENTIAL
    if signed:
        marks.append(x + w // 2)
        _text(canvas, "0", text_y, x + w // 2, align="centre")
    for m in marks:
        canvas[y + _BAR_H + 1 : y + _BAR_H + 3, m] = _INK
    if per_channel:
        _text(canvas, "-max" if signed else "0", text_y, x)
        _text(canvas, "max", text_y, x + w, align="right")
        _text(canvas, "each channel has its own range", geom.legend + _LEGEND_H, x)


def _bar_numbers(canvas: np.ndarray, geom: _Geom, lo: float, hi: float) -> None:
    y, x, w = _bar_box(geom)
    _text(canvas, f"{lo:.3g}", y + _BAR_H + 3, x)
    _text(canvas, f"{hi:.3g}", y + _BAR_H + 3, x + w, align="right")


def _lines(canvas: np.ndarray, geom: _Geom, lines: list[str]) -> None:
    room = (geom.width - 2 * _PAD) // _FONT_W
    for i, line in enumerate(lines[: geom.lines]):
        if len(line) > room:
            line = line[: room - 3] + "..."
        _text(canvas, line, geom.legend + _LEGEND_H + i * _LINE, _PAD)


def _text(canvas: np.ndarray, s: str, y: int, x: int, align: str = "left") -> None:
    """Ink `s` at (y, x) (x is its left end, right end or middle), clipped to the canvas."""
    _ink(canvas, _glyphs(s), y, x, align)


def _ink(canvas: np.ndarray, mask: np.ndarray, y: int, x: int, align: str = "left") -> None:
    h, w = mask.shape
    x -= w if align == "right" else w // 2 if align == "centre" else 0
    x = min(max(x, 0), max(canvas.shape[1] - w, 0))
    y = min(max(y, 0), max(canvas.shape[0] - h, 0))
    region = canvas[y : y + h, x : x + w]
    region[mask[: region.shape[0], : region.shape[1]]] = _INK


@cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's own bitmap font (6 x 11 px cells, 1 bit): crisp in a palette image, no file
    # from the system. Pillow >= 10.1 calls it load_default_imagefont.
    loader = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)
    return loader()


@lru_cache(maxsize=4096)
def _glyphs(s: str) -> np.ndarray:
    """The pixels of `s` in the bitmap font, as a read-only bool mask (_FONT_H rows)."""
    from PIL import ImageDraw

    s = s.encode("latin-1", "replace").decode("latin-1")  # the font has Latin-1 glyphs only
    img = Image.new("1", (max(len(s), 1) * _FONT_W, _FONT_H), 0)
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"
    draw.text((0, 0), s, fill=1, font=_font())
    mask = np.array(img, dtype=bool)
    mask.setflags(write=False)
    return mask


def _pad(cells: np.ndarray, count: int, fill: int) -> np.ndarray:
    """`cells` (n, ...) with blank cells appended up to `count`."""
    if cells.shape[0] == count:
        return cells
    blank = np.full((count - cells.shape[0], *cells.shape[1:]), fill, dtype=cells.dtype)
    return np.concatenate([cells, blank])


def _blit(canvas: np.ndarray, cells: np.ndarray, geom: _Geom) -> None:
    """Write cells (rows, cols, h, w) into their places, each value a f x f block, through a
    strided view of the canvas: one assignment, no per-tile loop."""
    rows, cols, h, w = cells.shape
    f = geom.f
    if f > 1:
        cells = np.repeat(cells, f, axis=3)  # (rows, cols, h, w*f)
    sy, sx = canvas.strides
    base = canvas[geom.top + geom.band :, geom.left :]
    view = as_strided(base, shape=(rows, h, f, cols, w * f),
                      strides=(geom.pitch_y * sy, f * sy, sy, geom.pitch_x * sx, sx),
                      writeable=True)
    view[...] = cells.transpose(0, 2, 1, 3)[:, :, None]


@dataclass(frozen=True)
class Picture:
    """A drawn palette picture, before it becomes a PIL image or a PNG file. Its rows carry
    PNG's filter byte in front, so that the PNG is deflated straight from the drawing,
    with no copy of the pixels (a dump of every AlexNet module draws 5 MB of them per
    image)."""

    rows: np.ndarray  # (H, W + 1) uint8: filter byte 0 (none), then the palette indices
    palette: np.ndarray  # (colours, 3) uint8
    info: dict[str, str]  # convmaps-* text: scale, range
    note: str | None = None  # what a cap left out, when one did

    def image(self) -> Image.Image:
        img = Image.fromarray(np.ascontiguousarray(self.rows[:, 1:]), "L")
        img.putpalette(self.palette.tobytes())  # "L" + a palette: a "P" image
        img.info.update(self.info)
        return img

    def png(self, compress_level: int = 1) -> bytes:
        """The same bytes as `png_bytes(self.image(), compress_level, self.note)`."""
        text = dict(self.info)
        if self.note is not None:
            text["convmaps-note"] = self.note
        return _palette_png(self.rows, self.palette, dict(sorted(text.items())), compress_level)


def _canvas(geom: _Geom, kind: str, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """A picture's rows (its frame after a filter-byte column) and the view of its pixels
    that drawing writes into."""
    frame = _frame(geom, kind, per_channel)
    rows = np.empty((frame.shape[0], frame.shape[1] + 1), dtype=np.uint8)
    rows[:, 0] = 0
    rows[:, 1:] = frame
    return rows, rows[:, 1:]


def _empty(info: dict[str, str]) -> Picture:
    # Nothing to draw (a zero-size tensor): one white pixel, still a valid PNG.
    return Picture(np.zeros((1, 2), np.uint8), np.array([_SPECIALS[2]], np.uint8), info)
