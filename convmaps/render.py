"""Render: tensors in, PIL images out (feature-map grids, filters, barcodes, tap mosaics).

Every picture uses one robust value range for all of its tiles, so that tiles compare, and
carries that range in `img.info` (written to PNG tEXt chunks by `png_bytes`) so that a
reader can map colours back to values. Nothing here writes files; `store` does that.

    >>> import torch
    >>> from convmaps.render import map_grid, png_bytes
    >>> img = map_grid(torch.randn(16, 5, 5))
    >>> img.size, img.mode
    ((143, 143), 'RGB')
    >>> png_bytes(img)[:8]
    b'\\x89PNG\\r\\n\\x1a\\n'
"""

from __future__ import annotations

import io
import math
import threading
from enum import StrEnum
from functools import cache

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import Tensor
from torchvision.utils import make_grid

__all__ = [
    "Scale",
    "barcode",
    "choose_scale",
    "colorize",
    "filter_grid",
    "map_grid",
    "png_bytes",
    "render_activation",
    "robust_limit",
    "tap_mosaic",
    "upscale_factor",
]

# "A few standard deviations": the range shown is k·σ (lovely-tensors summarises with ±3σ).
_K = 3.0
# σ is re-estimated without values beyond _REJECT_K·σ until nothing more is rejected. 4 (not
# 3) rejects a lone outlier (among >= 17 values) but barely trims a genuine heavy tail; with
# 3, sigma clipping shrinks a log-normal map's range until ~9% of it saturates.
_REJECT_K = 4.0
_MAX_PASSES = 5

_GUTTER = 128  # mid grey: distinct from both colour maps' ends and from coolwarm's light middle
_RGB_GUTTER = 255  # white: mid grey is what a zero weight looks like in an RGB filter tile
_NAN_RGB = (0, 0, 0)  # black appears in neither colour map
_GUTTER_PX = 1
# 255 colours, not 256: the gutter makes 256, so every colour-mapped grid fits a palette PNG.
_LEVELS = 255
_MIN_STRIP_PX = 256  # a barcode of 10 logits should still be wide enough to read
_CAP_HINT = "--png-cap"

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


class Scale(StrEnum):
    """How values become colours."""

    DIVERGING = "diverging"  # signed: symmetric around zero, zero is the neutral middle colour
    SEQUENTIAL = "sequential"  # non-negative: zero is the darkest colour


def choose_scale(t: Tensor) -> Scale:
    """Sequential when no value is negative (NaN ignored), else diverging.

    >>> choose_scale(torch.tensor([0.0, 2.0])), choose_scale(torch.tensor([-1.0, 2.0]))
    (<Scale.SEQUENTIAL: 'sequential'>, <Scale.DIVERGING: 'diverging'>)
    """
    t = _as_float(t)
    t = t[~torch.isnan(t)]
    return Scale.SEQUENTIAL if t.numel() == 0 or float(t.min()) >= 0 else Scale.DIVERGING


def robust_limit(t: Tensor, scale: Scale) -> tuple[float, float]:
    """The value range a picture of `t` shows: a few σ, never stretched by one outlier.

    Statistics use the finite, non-zero values only: exact zeros (ReLU's silent units,
    padding) say nothing about the spread of the values that are there, and counting them
    would saturate a sparse map's few active values. Then σ is estimated, values beyond
    4σ are set aside, and σ is estimated again, until nothing more is set aside.

    - diverging: (-s, s), s = min(max|t|, 3·σ₀) where σ₀ is the spread about zero (RMS):
      the scale is centred on zero, so a map offset to one side keeps its extent there.
    - sequential: (0, hi), hi = min(max t, mean + 3·std).

    Empty, all-zero or non-finite tensors give (-1, 1) or (0, 1): zero then maps to the
    neutral (or darkest) colour.

    >>> t = torch.cat([torch.linspace(-1, 1, 101), torch.tensor([1e6])])
    >>> robust_limit(t, Scale.DIVERGING)[1] < 2
    True
    """
    scale = Scale(scale)
    x = _as_float(t).flatten().double()
    x = x[torch.isfinite(x) & (x != 0)]
    if scale is Scale.DIVERGING:
        a = x.abs()
        s = min(float(a.max()), _K * _clipped_stats(a, centred=False)[1]) if a.numel() else 0.0
        return (-s, s) if s > 0 else (-1.0, 1.0)
    x = x[x > 0]
    hi = 0.0
    if x.numel():
        mean, std = _clipped_stats(x, centred=True)
        hi = min(float(x.max()), mean + _K * std)
    return (0.0, hi) if hi > 0 else (0.0, 1.0)


def colorize(t01: Tensor, scale: Scale) -> Tensor:
    """Colour values in [0, 1]: (..., H, W) -> uint8 (..., 3, H, W); clipped, NaN drawn black.

    >>> colorize(torch.tensor([[0.5]]), Scale.DIVERGING).flatten().tolist()
    [221, 221, 221]
    """
    if t01.dim() < 2:
        raise ValueError(f"colorize wants (..., H, W), got shape {tuple(t01.shape)}")
    t01 = _as_float(t01)
    nan = torch.isnan(t01)
    # Equal-width bins: an odd count gives 0.5 a bin of its own, centred on it, which _lut
    # makes the neutral colour.
    idx = (t01.nan_to_num(0.0).clamp(0, 1) * _LEVELS).long().clamp_(max=_LEVELS - 1)
    rgb = _lut(scale)[idx]  # (..., H, W, 3)
    rgb[nan] = torch.tensor(_NAN_RGB, dtype=torch.uint8)
    return rgb.movedim(-1, -3).contiguous()


def upscale_factor(h: int, w: int, target: int = 32, max_factor: int = 16) -> int:
    """Integer nearest-neighbour factor bringing the longer side of a tile to >= `target` px.

    >>> upscale_factor(5, 5), upscale_factor(6, 6), upscale_factor(55, 55), upscale_factor(1, 1)
    (7, 6, 1, 16)
    """
    side = max(h, w)
    if side <= 0:
        return 1
    return max(1, min(max_factor, math.ceil(target / side)))


def map_grid(maps: Tensor, scale: Scale | None = None, max_tiles: int | None = None) -> Image.Image:
    """One tile per channel of a (C, H, W) map, near-square grid, one value range for all.

    The range (and the scale, when not given) comes from all C channels, even when
    `max_tiles` draws only the first few.

    >>> map_grid(torch.rand(6, 28, 28)).size  # 3x2 tiles of 56 px, 1 px gutters
    (170, 113)
    """
    if maps.dim() != 3:
        raise ValueError(f"map_grid wants (C, H, W), got shape {tuple(maps.shape)}")
    maps = _as_float(maps)
    scale = choose_scale(maps) if scale is None else Scale(scale)
    lo, hi = robust_limit(maps, scale)
    if max_tiles is not None:
        maps = maps[: max(max_tiles, 0)]
    c, h, w = maps.shape
    if c * h * w == 0:
        return _empty_image(scale, lo, hi)
    tiles = _upscale(colorize(_to_unit(maps, lo, hi), scale), upscale_factor(h, w))
    grid = _tile(tiles, ncol=math.ceil(math.sqrt(c)), gutter=_GUTTER_PX, pad=_GUTTER)
    return _to_image(grid, scale, lo, hi)


def barcode(vec: Tensor, scale: Scale | None = None, height: int = 24) -> Image.Image:
    """A 1-D output (a Linear layer's N values) as a strip of N coloured columns.

    >>> barcode(torch.randn(10)).size, barcode(torch.randn(4096)).size
    ((260, 24), (4096, 24))
    """
    vec = _as_float(vec).flatten()
    scale = choose_scale(vec) if scale is None else Scale(scale)
    lo, hi = robust_limit(vec, scale)
    n = vec.numel()
    if n == 0:
        return _empty_image(scale, lo, hi)
    column_px = max(1, math.ceil(_MIN_STRIP_PX / n))
    strip = colorize(_to_unit(vec, lo, hi)[None, :], scale)  # (3, 1, N)
    strip = strip.repeat_interleave(column_px, dim=-1).expand(3, max(height, 1), -1)
    return _to_image(strip, scale, lo, hi)


def render_activation(t: Tensor, max_tiles: int | None = None) -> Image.Image:
    """A module's output for one image, drawn by its shape: maps as a grid, vectors as a barcode.

    (C, H, W) -> `map_grid`; (H, W) -> a one-tile `map_grid`; (N,) -> `barcode`; any other
    shape is flattened to a barcode. The scale follows `choose_scale`.

    >>> render_activation(torch.rand(10)).size
    (260, 24)
    """
    if t.dim() == 3:
        return map_grid(t, max_tiles=max_tiles)
    if t.dim() == 2:
        return map_grid(t[None])
    return barcode(t.flatten())


def filter_grid(
    weight: Tensor, max_filters: int = 64, max_kernels: int = 64
) -> tuple[Image.Image, str | None]:
    """A conv layer's filters: RGB tiles when they meet 3 channels, else one row per filter.

    `weight` is (C_out, C_in/groups, kh, kw). With 3 input channels each filter is one tile
    whose R, G, B are its three kernels, each value v shown as 0.5 + v/(2s); otherwise row i
    holds filter i's kernels on the diverging scale. s is one robust limit for the layer.
    Returns the image and, when a cap cut something off, a note saying what was drawn.

    >>> img, note = filter_grid(torch.randn(96, 3, 11, 11))
    >>> img.size, note
    ((271, 271), 'drew 64 of 96 filters (cap: --png-cap)')
    """
    if weight.dim() != 4:
        raise ValueError(f"filter_grid wants (C_out, C_in, kh, kw), got {tuple(weight.shape)}")
    if max_filters < 1 or max_kernels < 1:
        raise ValueError(f"caps must be >= 1, got {max_filters=} {max_kernels=}")
    weight = _as_float(weight)
    lo, hi = robust_limit(weight, Scale.DIVERGING)
    c_out, c_in, kh, kw = weight.shape
    factor = upscale_factor(kh, kw)
    if c_out * c_in * kh * kw == 0:
        return _empty_image(Scale.DIVERGING, lo, hi), None
    if c_in == 3:
        n = min(c_out, max_filters)
        tiles = _upscale(_rgb_bytes(_to_unit(weight[:n], lo, hi)), factor)
        grid = _tile(tiles, ncol=math.ceil(math.sqrt(n)), gutter=_GUTTER_PX, pad=_RGB_GUTTER)
        note = f"drew {n} of {c_out} filters (cap: {_CAP_HINT})" if n < c_out else None
        return _to_image(grid, "rgb", lo, hi), note
    rows, cols = min(c_out, max_filters), min(c_in, max_kernels)
    kernels = weight[:rows, :cols].reshape(rows * cols, kh, kw)
    tiles = _upscale(colorize(_to_unit(kernels, lo, hi), Scale.DIVERGING), factor)
    grid = _tile(tiles, ncol=cols, gutter=_GUTTER_PX, pad=_GUTTER)
    note = None
    if rows < c_out or cols < c_in:
        note = f"drew {rows} of {c_out} filters x {cols} of {c_in} kernels (cap: {_CAP_HINT})"
    return _to_image(grid, Scale.DIVERGING, lo, hi), note


def tap_mosaic(taps: Tensor, max_side: int = 4096) -> tuple[Image.Image, str | None]:
    """One filter's tap maps (H_out, W_out, kh, kw) as a mosaic: window (i, j)'s patch at (i, j).

    The mosaic is H_out·kh x W_out·kw px plus a 1 px gutter between windows (none for 1x1
    kernels), on the diverging scale. Windows that would push a side past `max_side` px are
    left out (the top-left ones are kept) and the note says so.

    >>> img, note = tap_mosaic(torch.randn(27, 27, 5, 5))
    >>> img.size, note
    ((161, 161), None)
    """
    if taps.dim() != 4:
        raise ValueError(f"tap_mosaic wants (H_out, W_out, kh, kw), got {tuple(taps.shape)}")
    taps = _as_float(taps)
    lo, hi = robust_limit(taps, Scale.DIVERGING)
    h_out, w_out, kh, kw = taps.shape
    if h_out * w_out * kh * kw == 0:
        return _empty_image(Scale.DIVERGING, lo, hi), None
    gutter = _GUTTER_PX if kh * kw > 1 else 0
    rows = _windows_that_fit(h_out, kh, gutter, max_side)
    cols = _windows_that_fit(w_out, kw, gutter, max_side)
    patches = taps[:rows, :cols].reshape(rows * cols, kh, kw)
    tiles = colorize(_to_unit(patches, lo, hi), Scale.DIVERGING)
    grid = _tile(tiles, ncol=cols, gutter=gutter, pad=_GUTTER)
    note = None
    if rows < h_out or cols < w_out:
        note = f"drew the top-left {rows}x{cols} of {h_out}x{w_out} windows (cap: {max_side} px)"
    return _to_image(grid, Scale.DIVERGING, lo, hi), note


def png_bytes(img: Image.Image, compress_level: int = 1, note: str | None = None) -> bytes:
    """Encode `img` as PNG, with its `convmaps-*` info (value range, scale) and `note` as text.

    Level 1 is the default. Measured on AlexNet conv1's 64x55x55 output drawn as a 447x447
    grid (random-init weights, a smooth synthetic image; best of 15 on a busy 2-core box),
    levels 0/1/3/6 took 25/61/73/128 ms for 586/380/373/367 KiB (diverging), and
    33/66/74/84 ms for 586/280/271/263 KiB after the ReLU (sequential). Level 1 stores a
    third to half less than level 0; levels 3 and 6 save only 2-6% more for 1.2-2x the time,
    and a dump writes one PNG per module per image.
    Pillow writes no timestamp, so the same image gives the same bytes.

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
    info = PngImagePlugin.PngInfo()
    for key in sorted(text):  # a fixed chunk order keeps the bytes deterministic
        info.add_text(key, text[key])  # Pillow falls back to iTXt for non-Latin-1 text
    buf = io.BytesIO()
    _lossless_palette(img).save(buf, format="PNG", compress_level=compress_level, pnginfo=info)
    return buf.getvalue()


@cache
def _colour_lookup() -> np.ndarray:
    # One byte per 24-bit colour (16 MiB, once per process): a gather maps pixels to palette
    # indices far faster than a search (a 447x447 grid: 0.3 ms, searchsorted 7 ms). Only the
    # entries of the current colours are read. Shared, so written and read under _LOOKUP_LOCK.
    return np.zeros(1 << 24, dtype=np.uint8)


# The dump encodes PNGs on its writer thread while another thread may render too: filling the
# shared table and gathering from it must not interleave. One lock, held for the gather only
# (well under a millisecond), costs less than a 16 MiB table per thread would.
_LOOKUP_LOCK = threading.Lock()


def _lossless_palette(img: Image.Image) -> Image.Image:
    """The same pixels as a palette image when they use at most 256 colours (every colour-
    mapped grid: a 255-colour table plus the gutter), else `img` itself.

    A palette PNG holds a byte per pixel instead of three and skips Pillow's adaptive row
    filters: AlexNet's 21 activation grids per image encode several times faster and ~4x
    smaller than as RGB. The mapping is exact (searchsorted on the image's own colours) and
    checked, so no picture ever loses a colour.
    """
    colours = img.getcolors(256) if img.mode == "RGB" else None
    if colours is None:
        return img
    rgb = np.asarray(img, dtype=np.uint32)
    keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    rgbs = [c for _, c in colours if isinstance(c, tuple)]
    table = np.array(sorted((r << 16) | (g << 8) | b for r, g, b in rgbs), np.uint32)
    with _LOOKUP_LOCK:
        lookup = _colour_lookup()
        lookup[table] = np.arange(len(table), dtype=np.uint8)
        indices = lookup[keys]
    indexed = Image.fromarray(indices, "P")
    palette = np.stack([table >> 16, (table >> 8) & 255, table & 255], axis=1).astype(np.uint8)
    indexed.putpalette(palette.tobytes())
    return indexed if indexed.convert("RGB").tobytes() == img.tobytes() else img


# --- helpers -------------------------------------------------------------------------------


def _as_float(t: Tensor) -> Tensor:
    # Half and bfloat16 are too coarse for statistics; hooks may hand over CUDA tensors.
    return t.detach().to(device="cpu", dtype=torch.float32)


def _clipped_stats(x: Tensor, *, centred: bool) -> tuple[float, float]:
    """(centre, σ) of `x` after sigma clipping at _REJECT_K·σ.

    `centred=False` pins the centre at zero, so σ is the spread about zero (RMS).
    """
    keep = x
    for _ in range(_MAX_PASSES):
        centre, sigma = _centre_sigma(keep, centred)
        kept = keep[(keep - centre).abs() <= _REJECT_K * sigma]
        # Empty only through rounding (a constant whose float mean differs from it): stop.
        if kept.numel() in (0, keep.numel()):
            break
        keep = kept
    return _centre_sigma(keep, centred)


def _centre_sigma(x: Tensor, centred: bool) -> tuple[float, float]:
    if not centred:
        return 0.0, float(x.square().mean().sqrt())
    return float(x.mean()), float(x.std(correction=0))


def _to_unit(t: Tensor, lo: float, hi: float) -> Tensor:
    # ±inf land outside [0, 1] and are clipped by the colouring; NaN stays NaN.
    return (t - lo) / (hi - lo)


@cache
def _lut(scale: Scale) -> Tensor:
    """_LEVELS x 3 uint8 colours; for diverging, the middle entry (where 0.5 lands) is the
    exact neutral colour."""
    anchors = torch.tensor(_COOLWARM if scale is Scale.DIVERGING else _VIRIDIS, dtype=torch.float64)
    if scale is Scale.DIVERGING:
        half = _LEVELS // 2
        below, above = torch.arange(half) / (2 * half), torch.arange(half + 1) / (2 * half)
        pos = torch.cat([below, 0.5 + above])
    else:
        pos = torch.linspace(0, 1, _LEVELS, dtype=torch.float64)
    x = pos.double() * (len(anchors) - 1)
    i = x.floor().long().clamp(max=len(anchors) - 2)
    frac = (x - i)[:, None]
    rgb = anchors[i] * (1 - frac) + anchors[i + 1] * frac
    return rgb.round().to(torch.uint8)


def _rgb_bytes(t01: Tensor) -> Tensor:
    # Same equal-width bins as `colorize`, so a zero weight is exactly mid grey (128).
    return (t01.nan_to_num(0.0).clamp(0, 1) * 256).clamp(max=255).to(torch.uint8)


def _upscale(tiles: Tensor, factor: int) -> Tensor:
    if factor == 1:
        return tiles
    return tiles.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def _tile(tiles: Tensor, ncol: int, gutter: int, pad: int) -> Tensor:
    """(N, 3, h, w) uint8 -> (3, H, W) grid with gutters between tiles only, not around."""
    if tiles.shape[0] == 1:
        return tiles[0]
    grid = make_grid(tiles, nrow=ncol, padding=gutter, pad_value=pad)
    # make_grid also pads the outer border; the picture's own edge is border enough.
    return grid[:, gutter : grid.shape[1] - gutter, gutter : grid.shape[2] - gutter]


def _windows_that_fit(n: int, k: int, gutter: int, max_side: int) -> int:
    return max(1, min(n, (max_side + gutter) // (k + gutter)))


def _to_image(rgb: Tensor, scale: Scale | str, lo: float, hi: float) -> Image.Image:
    img = Image.fromarray(rgb.permute(1, 2, 0).contiguous().numpy())  # H x W x 3 uint8: RGB
    img.info["convmaps-scale"] = str(scale)
    img.info["convmaps-range"] = f"{lo:.6g},{hi:.6g}"
    return img


def _empty_image(scale: Scale, lo: float, hi: float) -> Image.Image:
    # Nothing to draw (a zero-size tensor): one gutter-coloured pixel, still a valid PNG.
    return _to_image(torch.full((3, 1, 1), _GUTTER, dtype=torch.uint8), scale, lo, hi)


def image_size(kind: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(width, height) in pixels of the picture drawn for a tensor of `shape`, without drawing
    it: `activation` (render_activation), `kernels` (map_grid of one filter's (C_in, H, W)
    kernel maps) or `taps` (tap_mosaic of one filter's (H, W, kh, kw) tap maps)."""
    if kind == "taps":
        h_out, w_out, kh, kw = shape
        gutter = _GUTTER_PX if kh * kw > 1 else 0
        rows = _windows_that_fit(h_out, kh, gutter, 4096)
        cols = _windows_that_fit(w_out, kw, gutter, 4096)
        return cols * kw + (cols - 1) * gutter, rows * kh + (rows - 1) * gutter
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        n = math.prod(shape)
        return max(n * max(1, math.ceil(_MIN_STRIP_PX / max(n, 1))), 1), 24
    c, h, w = shape
    if c * h * w == 0:
        return 1, 1
    f = upscale_factor(h, w)
    ncol = 1 if c == 1 else math.ceil(math.sqrt(c))
    nrow = math.ceil(c / ncol)
    return ncol * w * f + (ncol - 1) * _GUTTER_PX, nrow * h * f + (nrow - 1) * _GUTTER_PX


def png_bound(kind: str, shape: tuple[int, ...]) -> int:
    """An upper bound of the PNG bytes `png_bytes` writes for that picture: its raw RGB rows
    (a palette PNG is about a third of that, a grid with more than 256 colours stays RGB) plus
    deflate's worst-case overhead and the chunks around the pixels."""
    w, h = image_size(kind, shape)
    raw = h * (3 * w + 1)
    return raw + raw // 1000 + 5 * (raw // 16_000 + 1) + 4096


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
