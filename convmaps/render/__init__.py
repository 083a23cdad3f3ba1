"""Render: tensors in, pictures out (feature-map grids, filters, vectors, tap mosaics), as PIL
images or, for a dump, as PNG bytes deflated straight from the drawing (`draw`).

Every picture is a palette ("P") image: each value becomes the index of its colour in a
255-entry colour map, so nothing is drawn in RGB and mapped back. Under the grid a colour
bar shows the value range with the numbers at its ends (and 0 on a diverging scale); the
range is also in `img.info` (written to PNG tEXt chunks by `png_bytes`) so that a program
can map colours back to values. Tiles carry their channel number when there is room, long
vectors wrap into a near-square grid with row and column ticks, and small maps and kernels
are upscaled (nearest neighbour) to tiles of at least ~32 px. Nothing here writes files or
keeps mutable state (caches hold read-only arrays), so every function is thread-safe.

    >>> import torch
    >>> from convmaps.render import map_grid, png_bytes
    >>> img = map_grid(torch.randn(16, 5, 5))
    >>> img.size, img.mode
    ((266, 344), 'P')
    >>> png_bytes(img)[:8]
    b'\\x89PNG\\r\\n\\x1a\\n'
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cache, lru_cache

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided
from PIL import Image, ImageFont, PngImagePlugin
from torch import Tensor

from convmaps.options import PngScale

__all__ = [
    "Picture",
    "Scale",
    "barcode",
    "choose_scale",
    "colorize",
    "draw",
    "filter_grid",
    "image_size",
    "map_grid",
    "png_bound",
    "png_bytes",
    "render_activation",
    "robust_limit",
    "tap_mosaic",
    "upscale_factor",
    "vector_grid",
]

# "A few standard deviations": the range shown is k·σ (lovely-tensors summarises with ±3σ).
_K = 3.0
# σ is re-estimated without values beyond _REJECT_K·σ until nothing more is rejected. 4 (not
# 3) rejects a lone outlier (among >= 17 values) but barely trims a genuine heavy tail; with
# 3, sigma clipping shrinks a log-normal map's range until ~9% of it saturates.
_REJECT_K = 4.0
_MAX_PASSES = 5
_ZERO = np.float32(0)  # a Python 0 makes numpy compare float32 arrays through a slow path

# Palette: _LEVELS colour-map entries, then the colours that are not values.
# An odd count gives 0.5 a bin of its own, centred on it, which _lut makes the neutral colour.
_LEVELS = 251
_GUTTER = 251  # mid grey between the patches of a matrix: apart from both maps' ends
_NAN = 252  # black appears in neither colour map
_PAPER = 253  # white: background, tile gutters, legend
_INK = 254  # text, ticks, the bar's frame
_SPECIALS = ((128, 128, 128), (0, 0, 0), (255, 255, 255), (0, 0, 0), (0, 0, 0))
_RGB_GUTTER = 255  # white around RGB filter tiles: mid grey is what a zero weight looks like
_NAN_RGB = (0, 0, 0)

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

# Anchor colours, evenly spaced, linearly interpolated into _LEVELS-entry tables.
# Moreland's "cool to warm" (matplotlib's coolwarm); its middle is a light grey, not white,
# so that zero stays visible on a white page.
_COOLWARM = (
    (59, 76, 192),
    (98, 130, 234),
    (141, 176, 254),
    (184, 208, 249),
    (221, 221, 221),
    (245, 196, 173),
    (244, 154, 123),
    (222, 96, 77),
    (180, 4, 38),
)
# matplotlib's viridis sampled at ninths: perceptually uniform, dark to bright.
_VIRIDIS = (
    (68, 1, 84),
    (72, 36, 117),
    (59, 82, 139),
    (44, 114, 142),
    (33, 145, 140),
    (40, 174, 128),
    (94, 201, 98),
    (173, 220, 48),
    (253, 231, 37),
)
_GREYS = ((0, 0, 0), (255, 255, 255))  # the bar of an RGB filter grid: -s black, +s white


class Scale(StrEnum):
    """How values become colours."""

    DIVERGING = "diverging"  # signed: symmetric around zero, zero is the neutral middle colour
    SEQUENTIAL = "sequential"  # non-negative: zero is the darkest colour


def choose_scale(t: Tensor) -> Scale:
    """Sequential when no value is negative (NaN ignored), else diverging.

    >>> choose_scale(torch.tensor([0.0, 2.0])), choose_scale(torch.tensor([-1.0, 2.0]))
    (<Scale.SEQUENTIAL: 'sequential'>, <Scale.DIVERGING: 'diverging'>)
    """
    return _choose(_flat(_values(t)))


def robust_limit(t: Tensor, scale: Scale) -> tuple[float, float]:
    """The value range a picture of `t` shows: a few σ, never stretched by one outlier.

    Statistics use the finite, non-zero values only: exact zeros (ReLU's silent units,
    padding) say nothing about the spread of the values that are there, and counting them
    would saturate a sparse map's few active values. Then σ is estimated, values beyond
    4σ are set aside, and σ is estimated again, until nothing more is set aside.

    - diverging: (-s, s), s = min(max|t|, 3·σ₀) where σ₀ is the spread about zero (RMS):
      the scale is centred on zero, so a map offset to one side keeps its extent there.
    - sequential: (0, hi), hi = min(max t, mean + 3·std) of the positive values.

    Empty, all-zero or non-finite tensors give (-1, 1) or (0, 1): zero then maps to the
    neutral (or darkest) colour.

    >>> t = torch.cat([torch.linspace(-1, 1, 101), torch.tensor([1e6])])
    >>> robust_limit(t, Scale.DIVERGING)[1] < 2
    True
    """
    lo, hi = _limits(_flat(_values(t))[None], Scale(scale))
    return float(lo[0]), float(hi[0])


def colorize(t01: Tensor, scale: Scale) -> Tensor:
    """Colour values in [0, 1]: (..., H, W) -> uint8 (..., 3, H, W); clipped, NaN drawn black.

    >>> colorize(torch.tensor([[0.5]]), Scale.DIVERGING).flatten().tolist()
    [221, 221, 221]
    """
    if t01.dim() < 2:
        raise ValueError(f"colorize wants (..., H, W), got shape {tuple(t01.shape)}")
    idx = _indices(_values(t01), np.zeros(1), np.ones(1))
    rgb = _palette_array(Scale(scale))[idx]  # (..., H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(rgb, -1, -3)))


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
) -> Image.Image:
    """One tile per channel of a (C, H, W) map, near-square grid, numbered tiles, colour bar.

    With `png_scale="layer"` one value range serves every tile, so that tiles compare; with
    "channel" each tile has its own (the bar then says "per channel" and `convmaps-range`
    lists every channel's range, `;`-separated). Ranges (and the scale, when not given) come
    from all C channels, even when `max_tiles` draws only the first few.

    >>> map_grid(torch.rand(6, 28, 28)).size  # 3x2 numbered tiles of 84 px, a colour bar
    (256, 224)
    """
    return _map_grid(maps, scale, max_tiles, png_scale).image()


def _map_grid(maps: Tensor, scale: Scale | None = None, max_tiles: int | None = None,
              png_scale: PngScale | str = PngScale.layer) -> Picture:
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
    geom = _grid_layout(c, h, w, per_channel)
    if geom is None:
        return _empty(info)
    if per_channel:
        lo, hi = lo[:c, None, None], hi[:c, None, None]
    rows, canvas = _canvas(geom, scale, per_channel)
    cells = _pad(_indices(x, lo, hi), geom.rows * geom.cols, _PAPER)
    _blit(canvas, cells.reshape(geom.rows, geom.cols, h, w), geom)
    if not per_channel:
        _bar_numbers(canvas, geom, float(lo[0]), float(hi[0]))
    return Picture(rows, _palette_array(scale), info)


def vector_grid(
    vec: Tensor, scale: Scale | None = None, classes: Sequence[str] | None = None
) -> Image.Image:
    """A 1-D output (a Linear layer's N values) wrapped row by row into a near-square grid,
    with row ticks (the index each row starts at) and column ticks, a colour bar, and the
    five largest values listed under it, named by `classes` when it has N names.

    >>> vector_grid(torch.randn(1000)).size  # 32 x 32 cells of 8 px, ticks, bar, top 5
    (278, 362)
    """
    return _vector_grid(vec, scale, classes).image()


def _vector_grid(vec: Tensor, scale: Scale | None = None,
                 classes: Sequence[str] | None = None) -> Picture:
    x = _flat(_values(vec))
    scale = _choose(x) if scale is None else Scale(scale)
    lo, hi = _limits(x[None], scale)
    info = _info(scale, lo, hi, False)
    n = x.size
    geom = _vector_layout(n)
    if geom is None:
        return _empty(info)
    rows, canvas = _canvas(geom, scale, False)
    cells = _pad(_indices(x, lo, hi), geom.rows * geom.cols, _PAPER)
    _blit(canvas, cells.reshape(geom.rows, geom.cols, 1, 1), geom)
    _bar_numbers(canvas, geom, float(lo[0]), float(hi[0]))
    names = list(classes) if classes is not None and len(classes) == n else None
    _lines(canvas, geom, _strongest(x, names))
    return Picture(rows, _palette_array(scale), info)


def barcode(vec: Tensor, scale: Scale | None = None) -> Image.Image:
    """Old name of `vector_grid` (a 1-D output is no longer a one-pixel strip)."""
    return vector_grid(vec, scale)


def render_activation(
    t: Tensor,
    max_tiles: int | None = None,
    classes: Sequence[str] | None = None,
    png_scale: PngScale | str = PngScale.layer,
) -> Image.Image:
    """A module's output for one image, drawn by its shape.

    (C, H, W) -> `map_grid` (or `vector_grid` when H = W = 1); (H, W) -> a one-tile
    `map_grid`; anything else is flattened to a `vector_grid`, whose largest entries are
    named by `classes` when it has one name per value (a classifier's output).

    >>> render_activation(torch.rand(10), classes=[str(i) for i in range(10)]).size
    (200, 202)
    """
    return _activation(t, max_tiles, classes, png_scale).image()


def _activation(t: Tensor, max_tiles: int | None = None, classes: Sequence[str] | None = None,
                png_scale: PngScale | str = PngScale.layer) -> Picture:
    if t.dim() == 3 and t.shape[1] * t.shape[2] != 1:
        return _map_grid(t, max_tiles=max_tiles, png_scale=png_scale)
    if t.dim() == 2:
        return _map_grid(t[None], png_scale=png_scale)
    return _vector_grid(t.flatten(), classes=classes)


def draw(kind: str, t: Tensor, classes: Sequence[str] | None = None,
         png_scale: PngScale | str = PngScale.layer) -> Picture:
    """The picture of `t` that a dump writes, as `image_size(kind, t.shape)` measures it:
    `activation` (`render_activation`), `kernels` (`map_grid` of one filter's kernel maps)
    or `taps` (`tap_mosaic` of one filter's tap maps, its note inside).

    >>> draw("kernels", torch.rand(3, 5, 5)).png()[:8]
    b'\\x89PNG\\r\\n\\x1a\\n'
    """
    if kind == "taps":
        return _tap_mosaic(t)
    if kind == "kernels":
        return _map_grid(t, png_scale=png_scale)
    return _activation(t, classes=classes, png_scale=png_scale)


def filter_grid(
    weight: Tensor, max_filters: int = 64, max_kernels: int = 64
) -> tuple[Image.Image, str | None]:
    """A conv layer's filters, on one diverging range s for the whole layer.

    `weight` is (C_out, C_in/groups, kh, kw). With 3 input channels each filter is one RGB
    tile whose R, G, B are its three kernels, each value v shown as 0.5 + v/(2s); with one,
    each filter is one numbered tile; otherwise row i holds filter i's kernels, one column
    per input channel, with ticks. Kernels are upscaled to tiles of ~32 px. Returns the
    image and, when a cap cut something off, a note saying what was drawn (also written
    under the colour bar).

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
    note = None
    if c_in in (1, 3) and rows < c_out:
        note = f"drew {rows} of {c_out} filters (cap: {_CAP_HINT})"
    elif c_in not in (1, 3) and (rows < c_out or cols < c_in):
        note = f"drew {rows} of {c_out} filters x {cols} of {c_in} kernels (cap: {_CAP_HINT})"
    if c_in in (1, 3):
        geom = _noted(_tiles(rows, kh, kw, _tile_factor(rows, kh, kw)), note)
        kind = "rgb" if c_in == 3 else Scale.DIVERGING
        buf, canvas = _canvas(geom, kind, False)
        if c_in == 1:
            cells = _pad(_indices(x[:rows, 0], lo, hi), geom.rows * geom.cols, _PAPER)
            _blit(canvas, cells.reshape(geom.rows, geom.cols, kh, kw), geom)
    else:
        geom = _noted(_matrix(rows, cols, kh, kw, upscale_factor(kh, kw), 1, 1), note)
        kind = Scale.DIVERGING
        buf, canvas = _canvas(geom, kind, False)
        _blit(canvas, _indices(x[:rows, :cols], lo, hi), geom)
    _bar_numbers(canvas, geom, float(lo[0]), float(hi[0]))
    _lines(canvas, geom, _wrap(note, geom))
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


def tap_mosaic(taps: Tensor, max_side: int = _MAX_SIDE) -> tuple[Image.Image, str | None]:
    """One filter's tap maps (H_out, W_out, kh, kw) as a mosaic: window (i, j)'s patch at (i, j).

    Patches are upscaled to ~32 px with a 1 px grey gutter between windows (1x1 kernels:
    no gutter, the whole map upscaled), with window ticks and a colour bar, on the
    diverging scale. Windows that would push a side past `max_side` px are left out (the
    top-left ones are kept) and the note says so.

    >>> img, note = tap_mosaic(torch.randn(13, 13, 5, 5))
    >>> img.size, note
    ((418, 446), None)
    """
    pic = _tap_mosaic(taps, max_side)
    return pic.image(), pic.note


def _tap_mosaic(taps: Tensor, max_side: int = _MAX_SIDE) -> Picture:
    if taps.dim() != 4:
        raise ValueError(f"tap_mosaic wants (H_out, W_out, kh, kw), got {tuple(taps.shape)}")
    x = _values(taps)
    lo, hi = _limits(_flat(x)[None], Scale.DIVERGING)
    info = _info(Scale.DIVERGING, lo, hi, False)
    layout = _tap_layout(tuple(x.shape), max_side)
    if layout is None:
        return _empty(info)
    geom, note = layout
    rows, canvas = _canvas(geom, Scale.DIVERGING, False)
    _blit(canvas, _indices(x[: geom.rows, : geom.cols], lo, hi), geom)
    _bar_numbers(canvas, geom, float(lo[0]), float(hi[0]))
    _lines(canvas, geom, _wrap(note, geom))
    return Picture(rows, _palette_array(Scale.DIVERGING), info, note)


def png_bytes(img: Image.Image, compress_level: int = 1, note: str | None = None) -> bytes:
    """Encode `img` as PNG, with its `convmaps-*` info (value range, scale) and `note` as text.

    Grids are palette images already (a byte per pixel, no adaptive row filters); an RGB
    image of at most 256 colours is stored as one too, losslessly; any other is stored by
    Pillow as it is. Palette images are deflated by ISA-L (`isal`) rather than zlib: on
    AlexNet's 64x55x55 grid, ISA-L's level 1 took 0.6 ms for 137 KB where zlib's took 3.9 ms
    for 145 KB (zlib level 0: 0.1 ms for 264 KB), and zlib was most of a dump's PNG cost
    (`benchmarks/bench_png.py`). The chunks are in a fixed order and carry no timestamp, so
    the same image gives the same bytes.

    >>> from PIL import Image as I
    >>> import io
    >>> I.open(io.BytesIO(png_bytes(I.new("RGB", (2, 2)), note="hi"))).info["convmaps-note"]
    'hi'
    """
    text: dict[str, str] = {
        k: str(v) for k, v in img.info.items() if isinstance(k, str) and k.startswith("convmaps-")
    }
    if note is not None:
        text["convmaps-note"] = note
    img = _lossless_palette(img)
    if img.mode == "P" and img.width * img.height:
        rows = np.zeros((img.height, img.width + 1), dtype=np.uint8)  # filter byte 0: none
        rows[:, 1:] = np.asarray(img, dtype=np.uint8)
        palette = np.frombuffer(bytes(img.getpalette() or [0, 0, 0]), np.uint8)
        return _palette_png(rows, palette, dict(sorted(text.items())), compress_level)
    info = PngImagePlugin.PngInfo()
    for key in sorted(text):  # a fixed chunk order keeps the bytes deterministic
        info.add_text(key, text[key])  # Pillow falls back to iTXt for non-Latin-1 text
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level, pnginfo=info)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def _text_chunk(key: str, value: str) -> bytes:
    try:  # tEXt is Latin-1; anything else goes in an uncompressed iTXt, as Pillow does
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode())


def _palette_png(rows: np.ndarray, palette: np.ndarray, text: dict[str, str], level: int
                 ) -> bytes:
    """A palette picture as PNG: IHDR, PLTE, text chunks, one IDAT of its rows (each led by
    its filter byte) deflated by ISA-L, IEND (the format's own layout; Pillow reads every
    file back in the tests). `palette` holds the RGB triples."""
    from isal import isal_zlib

    height, width = rows.shape[0], rows.shape[1] - 1
    head = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    parts = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", head), _chunk(b"PLTE", palette.tobytes())]
    parts += [_text_chunk(k, v) for k, v in text.items()]
    level = min(max(level, 0), isal_zlib.ISAL_BEST_COMPRESSION)  # ISA-L has levels 0-3
    deflated = isal_zlib.compress(np.ascontiguousarray(rows).data, level)
    parts += [_chunk(b"IDAT", deflated), _chunk(b"IEND", b"")]
    return b"".join(parts)


def image_size(kind: str, shape: tuple[int, ...],
               png_scale: PngScale | str = PngScale.layer) -> tuple[int, int]:
    """(width, height) in pixels of the picture drawn for a tensor of `shape`, without drawing
    it: `activation` (render_activation), `kernels` (map_grid of one filter's (C_in, H, W)
    kernel maps) or `taps` (tap_mosaic of one filter's (H, W, kh, kw) tap maps).

    >>> image_size("activation", (6, 28, 28)), image_size("activation", (6, 28, 28), "channel")
    ((256, 224), (256, 238))
    """
    geom: _Geom | None
    per_channel = PngScale(png_scale) is PngScale.channel
    if kind == "taps":
        layout = _tap_layout(tuple(shape), _MAX_SIDE)
        geom = layout[0] if layout else None
    elif len(shape) == 3 and shape[1] * shape[2] != 1:
        geom = _grid_layout(*shape, per_channel)
    elif len(shape) == 2:
        geom = _grid_layout(1, *shape, per_channel)
    else:
        geom = _vector_layout(math.prod(shape))
    return (geom.width, geom.height) if geom else (1, 1)


def grid_geometry(shape: tuple[int, ...], png_scale: PngScale | str = PngScale.layer
                  ) -> dict[str, int] | None:
    """Where each channel's tile lies in the activation picture of a tensor of `shape`
    (None for vectors and empty tensors): tile i's values start at (left + (i % cols) * px,
    top + (i // cols) * py + band) and span w x h pixels. The report uses it to name the
    channel under the mouse."""
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or shape[1] * shape[2] == 1:
        return None
    geom = _grid_layout(*shape, PngScale(png_scale) is PngScale.channel)
    if geom is None:
        return None
    return {"left": geom.left, "top": geom.top, "px": geom.pitch_x, "py": geom.pitch_y,
            "band": geom.band, "w": geom.w * geom.f, "h": geom.h * geom.f, "cols": geom.cols,
            "n": geom.n, "width": geom.width, "height": geom.height}


def png_bound(kind: str, shape: tuple[int, ...], png_scale: PngScale | str = PngScale.layer
              ) -> int:
    """An upper bound of the PNG bytes `png_bytes` writes for that picture: its raw palette
    rows plus deflate's worst-case overhead and the chunks around the pixels (palette, text:
    a per-channel range list is ~30 bytes a channel)."""
    w, h = image_size(kind, shape, png_scale)
    raw = h * (w + 1)
    text = 32 * shape[0] if PngScale(png_scale) is PngScale.channel and shape else 0
    return raw + raw // 1000 + 5 * (raw // 16_000 + 1) + 4096 + text


# --- statistics ------------------------------------------------------------------------------


def _values(t: Tensor) -> np.ndarray:
    """float32 values on the CPU as a numpy view, in the tensor's own memory order (a
    channels-last map is not copied to make it contiguous)."""
    t = t.detach()
    if t.device.type != "cpu" or t.dtype != torch.float32:
        # Half and bfloat16 are too coarse for statistics; hooks may hand over CUDA tensors.
        t = t.to(device="cpu", dtype=torch.float32)
    return t.numpy()


def _as_float(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32)


def _flat(x: np.ndarray) -> np.ndarray:
    """All values of `x` in one dimension, in memory order: a view whenever the strides
    allow (statistics do not care about the order)."""
    if x.flags.c_contiguous:
        return x.reshape(-1)
    order = sorted(range(x.ndim), key=lambda d: -abs(x.strides[d]))
    return x.transpose(order).reshape(-1)


def _choose(x: np.ndarray) -> Scale:
    # fmin skips NaN (all NaN gives NaN, which is not < 0); no temporary array, unlike x < 0
    return Scale.DIVERGING if x.size and np.fmin.reduce(x, axis=None) < 0 else Scale.SEQUENTIAL


def _limits(x: np.ndarray, scale: Scale) -> tuple[np.ndarray, np.ndarray]:
    """`robust_limit` of each row of `x` (G, N) at once: (lo, hi), float64 arrays of G.

    The kept values of a row always lie in one interval (each pass keeps those within 4σ
    of the last centre), so a pass need not look at all of them again: it finds the few
    values it sets aside (one comparison over the row) and takes their sums out of the
    kept values' sums. Those are about a reference point, the mean of the last pass over
    every kept value; a pass over them all is made again only where taking the tail out
    would leave too few digits (an outlier that held most of Σ(v - a)²).
    """
    centred = scale is Scale.SEQUENTIAL
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.maximum(x, _ZERO) if centred else np.abs(x)
        top = v.max(axis=1, initial=_ZERO).astype(np.float64)
        if not np.isfinite(top).all():  # NaN or ±inf somewhere: they count as absent
            v = np.where(v < np.inf, v, _ZERO)  # NaN fails the comparison too
            top = v.max(axis=1, initial=_ZERO).astype(np.float64)
        rows = v.shape[0]
        low = np.zeros(rows, np.float32)  # kept: low <= v <= high, and v > 0
        high = np.full(rows, np.inf, np.float32)
        kept = _Kept.of(v, low, high, centred)
        for _ in range(_MAX_PASSES):
            centre, sigma = kept.stats()
            new_low = (centre - _REJECT_K * sigma).astype(np.float32)
            new_high = (centre + _REJECT_K * sigma).astype(np.float32)
            # Bounds no tighter than a row's last, or beyond its largest value, set nothing
            # aside there (the comparison of a whole row is skipped when no row needs it).
            upper = (new_high < high) & (new_high < top)
            out = _Tail.of(v, np.where(upper, new_high, np.inf), low, high, True) \
                if upper.any() else _Tail.none(rows)
            if centred and (new_low > low).any():
                out = out + _Tail.of(v, np.where(new_low > low, new_low, 0), low, high, False)
            # The rule: a row that would set nothing aside, or everything, is done.
            trim = (out.n > 0) & (out.n < kept.n)
            if not trim.any():
                break
            low = np.where(trim, np.maximum(low, new_low), low)
            high = np.where(trim, np.minimum(high, new_high), high)
            kept = kept.without(out, trim)
            if kept.inexact().any():
                kept = _Kept.of(v, low, high, centred)
        centre, sigma = kept.stats()
    if centred:
        hi = np.minimum(top, centre + _K * sigma)
        return np.zeros_like(hi), np.where(hi > 0, hi, 1.0)
    s = np.minimum(top, _K * sigma)
    s = np.where(s > 0, s, 1.0)
    return -s, s


@dataclass(frozen=True)
class _Kept:
    """Each row's kept values as sums about a reference point `a`: their count `n`,
    Σ(v - a) and Σ(v - a)² (float64), and Σ(v - a)² when last summed in full."""

    n: np.ndarray
    a: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    full: np.ndarray
    centred: bool

    @staticmethod
    def of(v: np.ndarray, low: np.ndarray, high: np.ndarray, centred: bool) -> _Kept:
        """A pass over every kept value (low <= v <= high, v > 0) of each row. About the mean
        when `centred`, else about 0 (σ is then the RMS)."""
        keep = v > _ZERO
        bounded = np.isfinite(high).any() or (low > 0).any()
        if bounded:
            keep &= (v >= low[:, None]) & (v <= high[:, None])
        n = _count(keep)
        m = np.maximum(n, 1)
        kv = v * keep if bounded else v  # unbounded, v is zero where nothing is kept
        if not centred:
            s2 = _row_dot(kv, kv)
            return _Kept(n, np.zeros(len(n)), np.zeros(len(n)), s2, s2, centred)
        a = (kv.sum(axis=1) / m).astype(np.float32)  # the point d is taken about, exactly
        d = v - a[:, None]
        d *= keep
        s2 = _row_dot(d, d)
        return _Kept(n, a.astype(np.float64), d.sum(axis=1).astype(np.float64), s2, s2, centred)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(centre, σ): the mean and standard deviation, or 0 and the RMS."""
        m = np.maximum(self.n, 1)
        if not self.centred:
            return self.a, np.sqrt(self.s2 / m)
        shift = self.s1 / m
        return self.a + shift, np.sqrt(np.maximum(self.s2 / m - shift * shift, 0.0))

    def without(self, out: _Tail, rows: np.ndarray) -> _Kept:
        """These sums less the values `out` sets aside, in `rows`."""
        a = self.a
        s1 = out.s - out.n * a  # Σ(v - a) of the tail, from its Σv, Σv², count
        s2 = out.ss - 2 * a * out.s + out.n * a * a
        return _Kept(np.where(rows, self.n - out.n, self.n), a,
                     np.where(rows, self.s1 - s1, self.s1), np.where(rows, self.s2 - s2, self.s2),
                     self.full, self.centred)

    def inexact(self) -> np.ndarray:
        """Rows whose sums lost too many digits: under a tenth of Σ(v - a)² is left of the
        last full pass, whose float32 sums carry ~1e-7 of it. While a tenth is left, the
        centre cannot have moved from `a` by more than ~1.3σ (each value set aside lay 4σ
        out), so σ² = Σ(v - a)²/n - shift² cancels little."""
        return self.s2 < self.full / 10


@dataclass(frozen=True)
class _Tail:
    """The values a pass sets aside in each row: count, Σv and Σv² (float64)."""

    n: np.ndarray
    s: np.ndarray
    ss: np.ndarray

    @staticmethod
    def of(v: np.ndarray, bound: np.ndarray, low: np.ndarray, high: np.ndarray, upper: bool
           ) -> _Tail:
        """The kept values (low <= v <= high, v > 0) above each row's `bound` (`upper`; then
        it is above `low`), or below it (then it is below `high`)."""
        g, width = v.shape
        b = bound.astype(np.float32)[:, None]
        found = np.flatnonzero(v > b if upper else v < b)  # 2-D nonzero is ten times slower
        r = found // width
        vals = v.reshape(-1)[found]
        kept = vals <= high[r] if upper else (vals >= low[r]) & (vals > _ZERO)
        r, vals = r[kept], vals[kept].astype(np.float64)
        return _Tail(np.bincount(r, minlength=g), np.bincount(r, vals, minlength=g),
                     np.bincount(r, vals * vals, minlength=g))

    @staticmethod
    def none(g: int) -> _Tail:
        zero = np.zeros(g)
        return _Tail(zero.astype(np.int64), zero, zero)

    def __add__(self, other: _Tail) -> _Tail:
        return _Tail(self.n + other.n, self.s + other.s, self.ss + other.ss)


def _count(mask: np.ndarray) -> np.ndarray:
    """True values of each row (count_nonzero with an axis casts every bool to an integer;
    without one it is a fast byte count)."""
    if mask.shape[0] == 1:
        return np.array([np.count_nonzero(mask)])
    return np.count_nonzero(mask, axis=1)


def _row_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Σ a·b of each row, as float64: float32 BLAS (accurate to ~1e-7 on sums of like-signed
    terms, and no float64 copy of the values), redone in float64 where float32 overflows."""
    if a.shape[0] == 1:
        out = np.array([np.dot(a[0], b[0])], dtype=np.float64)
    else:
        out = np.einsum("ij,ij->i", a, b).astype(np.float64)
    over = ~np.isfinite(out)
    if over.any():
        out[over] = np.einsum("ij,ij->i", a[over], b[over], dtype=np.float64)
    return out


def _indices(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Palette indices of values (any shape; lo/hi broadcast against it): equal-width bins of
    [lo, hi] -> 0 .. _LEVELS-1, clipped at the ends, NaN -> _NAN."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        k = (_LEVELS / (hi - lo)).astype(np.float32)
        u = x - lo.astype(np.float32)
        u *= k
        np.clip(u, 0, _LEVELS - 1, out=u)
        idx = u.astype(np.uint8)
        if np.isnan(u.sum()):  # a sum of values in [0, 250] is NaN only if one of them is
            idx[np.isnan(u)] = _NAN
    return idx


def _info(scale: Scale | str, lo: np.ndarray, hi: np.ndarray, per_channel: bool
          ) -> dict[str, str]:
    ranges = ";".join(f"{a:.6g},{b:.6g}" for a, b in zip(lo.tolist(), hi.tolist(), strict=True))
    info = {"convmaps-scale": str(scale), "convmaps-range": ranges}
    if per_channel:
        info["convmaps-png-scale"] = str(PngScale.channel)
    return info


def _strongest(x: np.ndarray, names: list[str] | None) -> list[str]:
    """The largest values (NaN last, ties to the smaller index), one line each."""
    key = -np.nan_to_num(x, nan=-np.inf)
    if key.size > _TOP_K:  # a partial sort: a full one of 9216 values costs more than drawing
        # ties at the k-th value: every tied index joins, and the stable sort keeps the smallest
        cut = np.partition(key, _TOP_K - 1)[_TOP_K - 1]
        near = np.flatnonzero(key <= cut)
        order = near[np.argsort(key[near], kind="stable")][:_TOP_K]
    else:
        order = np.argsort(key, kind="stable")
    lines = []
    for rank, i in enumerate(order.tolist(), 1):
        what = f"{i} {names[i]}" if names else f"{i}"
        lines.append(f"{rank}. {what}: {x[i]:.4g}")
    return lines


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
           gap_colour: int, row_unit: int, lines: int) -> _Geom:
    grid_w = cols * (w * f + gap) - gap
    grid_h = rows * (band + h * f + gap) - gap
    left = top = 0
    if row_unit:
        left = len(str((rows - 1) * row_unit)) * _FONT_W + 4  # numbers, a gap, a 2 px tick
        top = _LINE + 2
    content = left + grid_w
    width = max(content, _MIN_W)
    left += (width - content) // 2  # a narrow grid sits in the middle, above the bar
    height = top + grid_h + _LEGEND_H + (lines * _LINE + 2 if lines else 0)
    return _Geom(rows, cols, n, h, w, f, band, gap, gap_colour, row_unit, left, top, width,
                 height, lines)


def _tiles(n: int, h: int, w: int, f: int, lines: int = 0) -> _Geom:
    """n numbered tiles of h x w values in a near-square grid."""
    cols = 1 if n == 1 else math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    room = w * f >= _LABEL_MIN_PX and len(str(n - 1)) * _FONT_W <= w * f
    return _place(rows, cols, n, h, w, f, _LINE if room else 0, _TILE_GAP, _PAPER, 0, lines)


def _matrix(rows: int, cols: int, h: int, w: int, f: int, gap: int, row_unit: int,
            lines: int = 0) -> _Geom:
    """rows x cols cells of h x w values with row and column ticks."""
    return _place(rows, cols, rows * cols, h, w, f, 0, gap, _GUTTER, row_unit, lines)


def _grid_layout(c: int, h: int, w: int, per_channel: bool = False) -> _Geom | None:
    if c * h * w == 0:
        return None
    return _tiles(c, h, w, _tile_factor(c, h, w), 1 if per_channel else 0)  # a caption line


def _tile_factor(n: int, h: int, w: int) -> int:
    """Tiles of ~32 px, and a grid of few tiles ~256 px wide: LeNet's six 28x28 maps are
    drawn at 84 px, while AlexNet's 384 maps of 13x13 stay at 26 px (pixels cost encoding
    time, and a wide grid is legible already)."""
    cols = 1 if n == 1 else math.ceil(math.sqrt(n))
    wide = round(_GRID_PX / max(cols * w, 1))
    return max(upscale_factor(h, w), min(16, wide))


def _vector_layout(n: int) -> _Geom | None:
    if n == 0:
        return None
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    px = max(2, min(_TARGET_PX, math.ceil(_VECTOR_PX / cols)))
    geom = _matrix(rows, cols, 1, 1, px, 0, cols, min(n, _TOP_K))
    return geom


def _tap_layout(shape: tuple[int, ...], max_side: int) -> tuple[_Geom, str | None] | None:
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
    return _noted(_matrix(rows, cols, kh, kw, f, gap, 1), note), note


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
                  geom.gap_colour, geom.row_unit, geom.lines + extra)


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
        _text(canvas, str(c), 0, x, align="centre")


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
    mask = _glyphs(s)
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


@cache
def _palette_array(kind: str) -> np.ndarray:
    """256 x 3 uint8: the colour map's _LEVELS entries, then the colours that are not values."""
    anchors = {Scale.DIVERGING: _COOLWARM, Scale.SEQUENTIAL: _VIRIDIS, "rgb": _GREYS}[kind]
    out = np.concatenate([_lut(np.asarray(anchors, np.float64), kind == Scale.DIVERGING),
                          np.asarray(_SPECIALS, np.uint8)])
    out.setflags(write=False)
    return out


def _lut(anchors: np.ndarray, centred: bool) -> np.ndarray:
    """_LEVELS x 3 uint8 colours; when `centred`, the middle entry (where 0.5 lands) is the
    exact middle anchor."""
    if centred:
        half = _LEVELS // 2
        pos = np.concatenate([np.arange(half) / (2 * half), 0.5 + np.arange(half + 1) / (2 * half)])
    else:
        pos = np.linspace(0, 1, _LEVELS)
    x = pos * (len(anchors) - 1)
    i = np.minimum(np.floor(x).astype(int), len(anchors) - 2)
    frac = (x - i)[:, None]
    rgb = anchors[i] * (1 - frac) + anchors[i + 1] * frac
    return np.round(rgb).astype(np.uint8)


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


def _lossless_palette(img: Image.Image) -> Image.Image:
    """An RGB image of at most 256 colours as the same pixels in a palette image (a byte per
    pixel instead of three); any other image as it is. Exact: each pixel keeps its colour."""
    if img.mode != "RGB" or img.getcolors(256) is None:
        return img
    rgb = np.asarray(img, dtype=np.uint32)
    keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    table, inverse = np.unique(keys, return_inverse=True)
    indexed = Image.fromarray(inverse.reshape(keys.shape).astype(np.uint8), "L")
    palette = np.stack([table >> 16, (table >> 8) & 255, table & 255], axis=1).astype(np.uint8)
    indexed.putpalette(palette.tobytes())
    return indexed


def _upscale(tiles: Tensor, factor: int) -> Tensor:
    if factor == 1:
        return tiles
    return tiles.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


# --- projections -----------------------------------------------------------------------------

_BOX_RGB = (255, 210, 0)  # the receptive-field box: amber, apart from grey and the image
_PANEL_PX = 224  # panels are upscaled (nearest) to at least this height
_CAPTION_PX = 16


def picture(x: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """A preprocessed input (C, H, W) as the uint8 RGB picture (3, H, W) it came from: the
    normalisation undone, clamped to [0, 1]; one channel is drawn grey."""
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    rgb = (_as_float(x) * s + m).clamp(0, 1)
    if rgb.shape[0] != 3:
        rgb = rgb.mean(0, keepdim=True).expand(3, -1, -1)
    return (rgb * 255).round().to(torch.uint8)


def signed_picture(p: Tensor, limit: float | None = None) -> tuple[Tensor, float]:
    """A projection (C, H, W) as uint8 RGB centred on grey: 0 is mid grey, +-limit (default:
    the largest magnitude, so nothing clips) are the channel's full brightness or black.
    Three channels stay colour channels; any other count is summed to grey. Returns the
    picture and the limit."""
    p = _as_float(p)
    if p.shape[0] != 3:
        p = p.sum(0, keepdim=True)
    lim = float(p.abs().max()) if limit is None else limit
    lim = lim if lim > 0 else 1.0
    rgb = (128 + 127 * (p / lim)).clamp(0, 255).round().to(torch.uint8)
    return rgb.expand(3, -1, -1), lim


def _crop(rgb: Tensor, box: tuple[int, int, int, int], fill: int) -> Tensor:
    """The box of an image (3, H, W), `fill` where the box reaches past the edges."""
    top, left, bottom, right = box
    _, h, w = rgb.shape
    out = torch.full((3, bottom - top, right - left), fill, dtype=torch.uint8)
    t, b, lo, r = max(top, 0), min(bottom, h), max(left, 0), min(right, w)
    if t < b and lo < r:
        out[:, t - top:b - top, lo - left:r - left] = rgb[:, t:b, lo:r]
    return out


def projection_figure(image: Tensor, projection: Tensor, box: tuple[int, int, int, int],
                      title: str = "") -> Image.Image:
    """Three panels: the input picture (uint8 RGB (3, H, W)) with the unit's receptive-field
    box drawn, the projection full size (signed, centred on grey), and both cut to the box;
    a grey scale bar with the projection's limits under them."""
    from PIL import ImageDraw

    signed, lim = signed_picture(projection)
    _, h, w = image.shape
    factor = max(1, math.ceil(_PANEL_PX / max(h, 1)))
    crop_img, crop_proj = _crop(image, box, 128), _crop(signed, box, 128)
    bh, bw = crop_img.shape[1:]
    crop_factor = max(1, (h * factor) // max(bh, 1))
    panels = [_upscale(image, factor), _upscale(signed, factor),
              _upscale(crop_img, crop_factor), _upscale(crop_proj, crop_factor)]
    gap, height = 8, max(p.shape[1] for p in panels)
    width = sum(p.shape[2] for p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, height + 3 * _CAPTION_PX + 10), (255, 255, 255))
    x = 0
    for i, p in enumerate(panels):
        canvas.paste(Image.fromarray(p.permute(1, 2, 0).contiguous().numpy()), (x, 0))
        if i == 0:  # the box, clipped to the picture, 2 px wide
            top, left, bottom, right = box
            draw = ImageDraw.Draw(canvas)
            draw.rectangle([max(left, 0) * factor, max(top, 0) * factor,
                            min(right, w) * factor - 1, min(bottom, h) * factor - 1],
                           outline=_BOX_RGB, width=2)
        x += p.shape[2] + gap
    _scale_bar(canvas, height + 4, -lim, lim, title)
    canvas.info["convmaps-scale"] = "signed"
    canvas.info["convmaps-range"] = f"{-lim:.6g},{lim:.6g}"
    return canvas


def _scale_bar(canvas: Image.Image, y: int, lo: float, hi: float, title: str) -> None:
    """A black-grey-white bar from `lo` to `hi` with the numbers at its ends and 0 between."""
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    bar_w = min(256, canvas.width - 8)
    ramp = torch.linspace(0, 255, bar_w).round().to(torch.uint8)
    bar = ramp.view(1, -1, 1).expand(_CAPTION_PX - 4, -1, 3).contiguous().numpy()
    canvas.paste(Image.fromarray(bar, "RGB"), (4, y))
    draw.rectangle([3, y - 1, 4 + bar_w, y + _CAPTION_PX - 4], outline=(0, 0, 0))
    ty = y + _CAPTION_PX - 2
    draw.text((4, ty), f"{lo:.3g}", fill=(0, 0, 0), font=font)
    draw.text((4 + bar_w // 2, ty), "0", fill=(0, 0, 0), font=font, anchor="ma")
    draw.text((4 + bar_w, ty), f"{hi:.3g}", fill=(0, 0, 0), font=font, anchor="ra")
    if title:
        draw.text((bar_w + 16, y), title, fill=(0, 0, 0), font=font)


# --- top-k figures (convmaps topk) -----------------------------------------------------------
# Self-contained: the Zeiler-Fergus figure of one unit and the overview of a module.

__all__ += ["shrink", "topk_figure", "topk_overview", "topk_png_bound"]

_TOPK_TARGET_PX = 64  # small patches (LeNet's 5x5 fields) are upscaled to about this size
_TOPK_TEXT_PX = 14  # the strip under each column that holds its value
_TOPK_BAR_PX = 32  # the projections' scale bar and its numbers
_TOPK_GUTTER_PX = 2


def shrink(rgb: Tensor, max_px: int) -> Tensor:
    """A uint8 picture `(3, H, W)` scaled down (area average) so that its longer side is at
    most `max_px`; smaller pictures are returned as they are."""
    h, w = rgb.shape[-2:]
    if max(h, w) <= max_px:
        return rgb
    f = max_px / max(h, w)
    size = (max(1, round(h * f)), max(1, round(w * f)))
    small = torch.nn.functional.interpolate(rgb[None].float(), size=size, mode="area")[0]
    return small.round().clamp(0, 255).to(torch.uint8)


def _topk_grid(tiles: Tensor, ncol: int) -> Tensor:
    """(N, 3, h, w) uint8 -> (3, H, W): rows of `ncol` tiles, white gutters between them only."""
    from torchvision.utils import make_grid

    if tiles.shape[0] == 1:
        return tiles[0]
    g = _TOPK_GUTTER_PX
    grid = make_grid(tiles, nrow=ncol, padding=g, pad_value=255)
    return grid[:, g:grid.shape[1] - g, g:grid.shape[2] - g]


def topk_figure(patches: Tensor, projections: Tensor | None, values: list[float]) -> Image.Image:
    """One unit's top-k: the input patches (uint8 RGB `(k, 3, bh, bw)`, as `picture` draws
    them) in the top row, their projections `(k, C_in, bh, bw)` under them (signed, centred
    on grey, one limit for the row so that they compare), and each entry's value under its
    column.

    >>> img = topk_figure(torch.zeros(3, 3, 5, 5, dtype=torch.uint8), torch.randn(3, 3, 5, 5),
    ...                   [3.0, 2.0, 1.0])
    >>> img.size, img.info["convmaps-scale"]
    ((199, 180), 'signed')
    """
    from PIL import ImageDraw, ImageFont

    k, _, h, w = patches.shape
    f = upscale_factor(h, w, target=_TOPK_TARGET_PX)
    rows = [patches]
    lim = 0.0
    if projections is not None:
        lim = float(_as_float(projections).abs().max()) if projections.numel() else 0.0
        rows.append(torch.stack([signed_picture(p, lim or 1.0)[0] for p in projections]))
    grids = [_topk_grid(_upscale(r, f), ncol=k) for r in rows]
    width = grids[0].shape[2]
    height = sum(g.shape[1] + _TOPK_GUTTER_PX for g in grids) + _TOPK_TEXT_PX
    height += _TOPK_BAR_PX if projections is not None else 0
    img = Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    for g in grids:
        img.paste(Image.fromarray(g.permute(1, 2, 0).contiguous().numpy()), (0, y))
        y += g.shape[1] + _TOPK_GUTTER_PX
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for i, v in enumerate(values[:k]):
        centre = i * (w * f + _TOPK_GUTTER_PX) + (w * f) // 2
        draw.text((centre, y), f"{v:.4g}", fill=(0, 0, 0), font=font, anchor="ma")
    if projections is not None:  # what the projections' greys mean, numbers at the ends
        _scale_bar(img, y + _TOPK_TEXT_PX + 2, -(lim or 1.0), lim or 1.0,
                   "projections" if width >= 360 else "")
        img.info["convmaps-scale"] = "signed"
        img.info["convmaps-range"] = f"{-lim:.6g},{lim:.6g}"
    return img


def topk_overview(tiles: Tensor) -> Image.Image:
    """A module at a glance: each channel's top-1 patch, uint8 RGB `(C, 3, h, w)`, one tile per
    channel in a near-square grid (channel order, row by row)."""
    if tiles.shape[0] == 0:
        return Image.new("RGB", (1, 1), (255, 255, 255))
    h, w = tiles.shape[-2:]
    rgb = _upscale(tiles, upscale_factor(h, w, target=_TOPK_TARGET_PX // 2))
    grid = _topk_grid(rgb, ncol=math.ceil(math.sqrt(tiles.shape[0])))
    return Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy())


def topk_png_bound(n: int, h: int, w: int) -> int:
    """An upper bound of the PNG bytes of a `topk_figure` of `n` patches of `h` x `w` (or of a
    `topk_overview` of n tiles): raw RGB rows, deflate's worst case and the chunks around."""
    f = upscale_factor(h, w, target=_TOPK_TARGET_PX)
    rows = 2 * (h * f + _TOPK_GUTTER_PX) + _TOPK_TEXT_PX + _TOPK_BAR_PX
    raw = n * rows * (3 * (w * f + _TOPK_GUTTER_PX) + 1) + rows * (3 * 264 + 1)  # bar >= 264
    return raw + raw // 1000 + 5 * (raw // 16_000 + 1) + 4096
