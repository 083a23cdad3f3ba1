"""The composed figures, RGB: input pictures, projections beside their receptive field, and the
top-k of a unit (Zeiler & Fergus) and of a module."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from convmaps.render.grids import _FONT_W, _LINE, _TITLE_H, _glyphs, upscale_factor
from convmaps.render.scales import Scale, colorize

if TYPE_CHECKING:
    from convmaps.core.explain import Node

__all__ = [
    "explain_figure",
    "occlusion_figure",
    "picture",
    "projection_figure",
    "shrink",
    "signed_picture",
    "topk_figure",
    "topk_overview",
    "topk_png_bound",
]


def _as_float(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32)


def _upscale(tiles: Tensor, factor: int) -> Tensor:
    if factor == 1:
        return tiles
    return tiles.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


# --- text and scales -----------------------------------------------------------------------

_INK_RGB = (0, 0, 0)
_PAD = 4


def _text_w(s: str) -> int:
    return len(s) * _FONT_W


def _write(canvas: Image.Image, s: str, x: int, y: int, align: str = "left") -> None:
    """`s` in the grids' bitmap font (crisp, 6 x 11 px cells), black, x its left end, right end
    or middle."""
    mask = _glyphs(s)
    h, w = mask.shape
    x -= w if align == "right" else w // 2 if align == "centre" else 0
    canvas.paste(_INK_RGB, (x, y, x + w, y + h), Image.fromarray(mask))


def _titled(width: int, height: int, title: tuple[str, str] | None, *lines: str
            ) -> tuple[Image.Image, int]:
    """A white RGB canvas with room for `height` px of figure under a two-line title strip
    (where from; what it shows), at least as wide as the title and `lines` of text; returns
    it and the strip's height."""
    head = _TITLE_H if title else 0
    need = max((_text_w(t) for t in (*(title or ()), *lines)), default=0) + 2 * _PAD
    canvas = Image.new("RGB", (max(width, need), height + head), (255, 255, 255))
    for i, line in enumerate(title or ()):
        if line:
            _write(canvas, line, _PAD, 2 + i * _LINE)
    return canvas, head


def _ramp(width: int, rgb: bool) -> Tensor:
    """A scale bar's colours, (3, width) uint8: -limit .. +limit as a projection draws them."""
    t = torch.linspace(-1, 1, width)[None]
    return signed_picture(t.expand(3 if rgb else 1, -1)[:, None], 1.0)[0][:, 0]


def _scale_bar(canvas: Image.Image, x: int, y: int, lim: float, rgb: bool) -> int:
    """The projections' scale at (x, y): a bar from -lim to +lim, 0 in its middle, in the
    colours they are drawn in (each of R, G, B around mid grey for a colour input, the
    diverging colour map for one channel). Returns its width."""
    from PIL import ImageDraw

    w = min(_BAR_PX, canvas.width - x - _PAD)
    bar = _ramp(w, rgb)[:, None].expand(-1, _BAR_H, -1)
    canvas.paste(Image.fromarray(bar.permute(1, 2, 0).contiguous().numpy()), (x, y))
    ImageDraw.Draw(canvas).rectangle([x - 1, y - 1, x + w, y + _BAR_H], outline=_INK_RGB)
    ty = y + _BAR_H + 2
    _write(canvas, f"{-lim:.3g}", x, ty)
    _write(canvas, "0", x + w // 2, ty, "centre")
    _write(canvas, f"{lim:.3g}", x + w, ty, "right")
    if rgb:
        _write(canvas, "R, G, B each", x + w + 8, y)
    return w


# --- projections -----------------------------------------------------------------------------

_BOX_RGB = (255, 210, 0)  # the receptive-field box: amber, apart from grey and the image
_PANEL_PX = 224  # panels are upscaled (nearest) to at least this height
_BAR_PX = 256
_BAR_H = 10
_LEGEND_PX = _BAR_H + 2 + _LINE + 4  # bar, its numbers, a margin
_PANELS = ("input with box", "projection", "input, cropped", "projection, cropped")


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
    """A projection (C, H, W) as uint8 RGB (3, H, W), +-limit (default: the largest
    magnitude, so nothing clips) at the ends of its scale. Three channels stay colour
    channels, as Zeiler & Fergus show them: each is 128 + 127 p / limit, so 0 is mid grey.
    Any other count is summed and drawn on the diverging colour map of every other signed
    map (`scales.colorize`). Returns the picture and the limit.

    >>> signed_picture(torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]], [[-1.0, 0.0]]]))[0][:, 0, 0]
    tensor([255, 128,   1], dtype=torch.uint8)
    """
    p = _as_float(p)
    lim = float(p.abs().max()) if limit is None and p.numel() else (limit or 0.0)
    if p.shape[0] != 3:
        p = p.sum(0)
        lim = float(p.abs().max()) if limit is None and p.numel() else lim
    lim = lim if lim > 0 else 1.0
    if p.dim() == 2:
        return colorize((p / lim + 1) / 2, Scale.DIVERGING), lim
    return (128 + 127 * (p / lim)).clamp(0, 255).round().to(torch.uint8), lim


def _crop(rgb: Tensor, box: tuple[int, int, int, int], fill: int) -> Tensor:
    """The box of an image (3, H, W), `fill` where the box reaches past the edges."""
    top, left, bottom, right = box
    _, h, w = rgb.shape
    out = torch.full((3, bottom - top, right - left), fill, dtype=torch.uint8)
    t, b, lo, r = max(top, 0), min(bottom, h), max(left, 0), min(right, w)
    if t < b and lo < r:
        out[:, t - top:b - top, lo - left:r - left] = rgb[:, t:b, lo:r]
    return out


def _draw_box(canvas: Image.Image, x: int, y: int, box: tuple[int, int, int, int],
              hw: tuple[int, int], factor: int) -> None:
    """A receptive-field box on a picture of size `hw` pasted at (x, y) upscaled by `factor`:
    clipped to the picture, 2 px wide."""
    from PIL import ImageDraw

    top, left, bottom, right = box
    ImageDraw.Draw(canvas).rectangle(
        [x + max(left, 0) * factor, y + max(top, 0) * factor,
         x + min(right, hw[1]) * factor - 1, y + min(bottom, hw[0]) * factor - 1],
        outline=_BOX_RGB, width=2)


def projection_figure(image: Tensor, projection: Tensor, box: tuple[int, int, int, int],
                      title: str = "", caption: str = "") -> Image.Image:
    """A unit's projection beside its receptive field, each panel labelled: the input picture
    (uint8 RGB (3, H, W)) with the unit's box drawn, the projection full size (see
    `signed_picture`), and both cut to the box (left out when the box holds the whole
    input: they would repeat the first two). A title strip says `title` (model, unit, image)
    and what the figure shows; under the panels, the projection's scale and `caption`
    (position, value, class).

    >>> img = projection_figure(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.ones(3, 8, 8),
    ...                         (0, 0, 8, 8), "net · m:0 · a.png")
    >>> img.size, img.info["convmaps-range"]
    ((464, 300), '-1,1')
    """

    signed, lim = signed_picture(projection)
    _, h, w = image.shape
    factor = max(1, math.ceil(_PANEL_PX / max(h, 1)))
    panels = [_upscale(image, factor), _upscale(signed, factor)]
    top, left, bottom, right = box
    if not (top <= 0 and left <= 0 and bottom >= h and right >= w):
        crop_img, crop_proj = _crop(image, box, 128), _crop(signed, box, 128)
        bh = crop_img.shape[1]
        crop_factor = max(1, (h * factor) // max(bh, 1))
        panels += [_upscale(crop_img, crop_factor), _upscale(crop_proj, crop_factor)]
    gap, height = 8, max(p.shape[1] for p in panels)
    width = sum(p.shape[2] for p in panels) + gap * (len(panels) - 1) + 2 * _PAD
    what = "its projection into the input, beside its receptive field (box)"
    below = _LEGEND_PX + (_LINE + 2 if caption else 0)
    canvas, y0 = _titled(width, _LINE + 2 + height + 6 + below, (title, what), caption)
    x = _PAD
    for i, p in enumerate(panels):
        _write(canvas, _PANELS[i], x, y0)
        canvas.paste(Image.fromarray(p.permute(1, 2, 0).contiguous().numpy()),
                     (x, y0 + _LINE + 2))
        if i == 0:
            _draw_box(canvas, _PAD, y0 + _LINE + 2, box, (h, w), factor)
        x += p.shape[2] + gap
    y = y0 + _LINE + 2 + height + 6
    _scale_bar(canvas, _PAD, y, lim, projection.shape[0] == 3)
    if caption:
        _write(canvas, caption, _PAD, y + _LEGEND_PX)
    canvas.info["convmaps-scale"] = "signed"
    canvas.info["convmaps-range"] = f"{-lim:.6g},{lim:.6g}"
    return canvas


# --- top-k figures (convmaps topk) -----------------------------------------------------------
# Self-contained: the Zeiler-Fergus figure of one unit and the overview of a module.

_TOPK_TARGET_PX = 64  # small patches (LeNet's 5x5 fields) are upscaled to about this size
_TOPK_TEXT_PX = 14  # the strip under each column that holds its value
_TOPK_BAR_PX = 32  # the projections' scale bar and its numbers
_TOPK_GUTTER_PX = 2
_OVERVIEW_MIN_PX = 48  # an overview's tiles are at least this big, a channel number above


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


def _topk_grid(tiles: Tensor, ncol: int, band: int = 0) -> Tensor:
    """(N, 3, h, w) uint8 -> (3, H, W): rows of `ncol` tiles, white gutters between them only,
    and `band` white rows above each tile (for its label)."""
    from torchvision.utils import make_grid

    if band:
        tiles = torch.nn.functional.pad(tiles, (0, 0, band, 0), value=255)
    if tiles.shape[0] == 1:
        return tiles[0]
    g = _TOPK_GUTTER_PX
    grid = make_grid(tiles, nrow=ncol, padding=g, pad_value=255)
    return grid[:, g:grid.shape[1] - g, g:grid.shape[2] - g]


def topk_figure(patches: Tensor, projections: Tensor | None, values: list[float],
                title: str | None = None) -> Image.Image:
    """One unit's top-k: the input patches (uint8 RGB `(k, 3, bh, bw)`, as `picture` draws
    them) in the top row, their projections `(k, C_in, bh, bw)` under them (see
    `signed_picture`; one limit for the row so that they compare), and each entry's value
    under its column. With a `title` (model, module, channel), a strip at the top says it
    and what the rows are.

    >>> img = topk_figure(torch.zeros(3, 3, 5, 5, dtype=torch.uint8), torch.randn(3, 3, 5, 5),
    ...                   [3.0, 2.0, 1.0])
    >>> img.size, img.info["convmaps-scale"]
    ((199, 180), 'signed')
    """
    k, _, h, w = patches.shape
    f = upscale_factor(h, w, target=_TOPK_TARGET_PX)
    rows = [patches]
    lim = 0.0
    if projections is not None:
        lim = float(_as_float(projections).abs().max()) if projections.numel() else 0.0
        rows.append(torch.stack([signed_picture(p, lim or 1.0)[0] for p in projections]))
    grids = [_topk_grid(_upscale(r, f), ncol=k) for r in rows]
    height = sum(g.shape[1] + _TOPK_GUTTER_PX for g in grids) + _TOPK_TEXT_PX
    height += _TOPK_BAR_PX if projections is not None else 0
    what = f"its top {k} images: the patches it sees" + \
        (", their projections under them" if projections is not None else "") + \
        ", values under them"
    img, y = _titled(grids[0].shape[2], height, None if title is None else (title, what))
    for g in grids:
        img.paste(Image.fromarray(g.permute(1, 2, 0).contiguous().numpy()), (0, y))
        y += g.shape[1] + _TOPK_GUTTER_PX
    for i, v in enumerate(values[:k]):
        centre = i * (w * f + _TOPK_GUTTER_PX) + (w * f) // 2
        _write(img, f"{v:.4g}", centre, y + 1, "centre")
    if projections is not None:  # what the projections' colours mean, numbers at the ends
        _scale_bar(img, _PAD, y + _TOPK_TEXT_PX + 2, lim or 1.0, projections.shape[1] == 3)
        img.info["convmaps-scale"] = "signed"
        img.info["convmaps-range"] = f"{-lim:.6g},{lim:.6g}"
    return img


def topk_overview(tiles: Tensor, title: str | None = None) -> Image.Image:
    """A module at a glance: each channel's top-1 patch, uint8 RGB `(C, 3, h, w)`, one tile per
    channel in a near-square grid (channel order, row by row), each at least ~48 px with its
    channel number above it. With a `title` (model, module), a strip at the top says it and
    what a tile is."""
    if tiles.shape[0] == 0:
        return Image.new("RGB", (1, 1), (255, 255, 255))
    n, _, h, w = tiles.shape
    f = max(upscale_factor(h, w, target=_TOPK_TARGET_PX),
            math.ceil(_OVERVIEW_MIN_PX / max(h, w)))
    rgb = _upscale(tiles, f)
    cols = math.ceil(math.sqrt(n))
    grid = _topk_grid(rgb, ncol=cols, band=_LINE)
    what = f"{n} channels, a tile each: the patch that excites it most"
    img, y0 = _titled(grid.shape[2], grid.shape[1], None if title is None else (title, what))
    img.paste(Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()), (0, y0))
    pitch_x, pitch_y = w * f + _TOPK_GUTTER_PX, h * f + _LINE + _TOPK_GUTTER_PX
    for c in range(n):
        r, col = divmod(c, cols)
        _write(img, str(c), col * pitch_x, y0 + r * pitch_y)
    return img


def topk_png_bound(n: int, h: int, w: int) -> int:
    """An upper bound of the PNG bytes of a `topk_figure` of `n` patches of `h` x `w` (or of a
    `topk_overview` of n tiles): raw RGB rows, deflate's worst case and the chunks around."""
    f = max(upscale_factor(h, w, target=_TOPK_TARGET_PX),
            math.ceil(_OVERVIEW_MIN_PX / max(h, w, 1)))
    rows = 2 * (h * f + _TOPK_GUTTER_PX + _LINE) + _TOPK_TEXT_PX + _TOPK_BAR_PX + _TITLE_H
    raw = n * rows * (3 * (w * f + _TOPK_GUTTER_PX) + 1) + rows * (3 * 600 + 1)  # title >= 600
    return raw + raw // 1000 + 5 * (raw // 16_000 + 1) + 4096


# --- occlusion (convmaps occlude) ------------------------------------------------------------

# Class colours of the most-probable-class map (Tableau 10); other classes are grey.
_CLASS_RGB = ((78, 121, 167), (242, 142, 43), (225, 87, 89), (118, 183, 178), (89, 161, 79),
              (237, 201, 72), (176, 122, 161), (255, 157, 167), (156, 117, 95))
_OTHER_RGB = (186, 176, 172)


def occlusion_figure(image: Tensor, probability: Tensor, top_class: Tensor, unit: Tensor | None,
                     names: list[str], patch: int, stride: int, title: str | None = None
                     ) -> Image.Image:
    """Zeiler & Fergus's Fig. 7 for one image: the input (uint8 RGB (3, H, W)); the target
    class's probability at each patch position (Py, Px) on a fixed 0-1 scale; the most probable
    class there, the most frequent classes in colour with their names; and the unit's summed
    feature map (Py, Px) on its own range. Each position's cell is drawn centred on its patch's
    centre, over the faded input. With a `title` (model, image, target), a strip says it."""
    from PIL import ImageDraw

    from convmaps.render.scales import Scale, colorize

    _, h, w = image.shape
    factor = max(1, math.ceil(_PANEL_PX / max(h, 1)))
    size = (w * factor, h * factor)

    def panel(rgb: Tensor) -> Image.Image:
        pic = Image.fromarray(rgb.permute(1, 2, 0).contiguous().numpy())
        return pic.resize(size, Image.Resampling.NEAREST)

    faded = panel((image.float() * 0.35 + 255 * 0.65).to(torch.uint8))
    py, px = probability.shape[-2:]
    # cells of side `stride` centred on the patches' centres, clipped to the picture
    box = [max(0, patch / 2 - stride / 2) * factor, max(0, patch / 2 - stride / 2) * factor]
    end = [min(h, (py - 1) * stride + patch / 2 + stride / 2) * factor,
           min(w, (px - 1) * stride + patch / 2 + stride / 2) * factor]

    def over(rgb: Tensor) -> Image.Image:
        out = faded.copy()
        cells = Image.fromarray(rgb.permute(1, 2, 0).contiguous().numpy())
        out.paste(cells.resize((round(end[1] - box[1]), round(end[0] - box[0])),
                               Image.Resampling.NEAREST), (round(box[1]), round(box[0])))
        return out

    prob = colorize(_as_float(probability).clamp(0, 1), Scale.SEQUENTIAL)
    counts = torch.bincount(top_class.flatten(), minlength=1)
    common = [int(c) for c in counts.argsort(descending=True)[:len(_CLASS_RGB)] if counts[c] > 0]
    classes = torch.tensor(_OTHER_RGB, dtype=torch.uint8).view(3, 1, 1).expand(
        3, *top_class.shape).clone()
    for c, rgb in zip(common, _CLASS_RGB, strict=False):
        classes[:, top_class == c] = torch.tensor(rgb, dtype=torch.uint8).view(3, 1)
    panels = [(panel(image), "input"), (over(prob), "probability of the target class"),
              (over(classes), "most probable class")]
    lo = hi = 0.0
    if unit is not None:
        u = _as_float(unit)
        lo, hi = float(u.min()), float(u.max())
        u01 = (u - lo) / (hi - lo) if hi > lo else u * 0
        panels.append((over(colorize(u01, Scale.SEQUENTIAL)), "unit: its feature map summed"))
    others = counts.numel() > len(common) and len(common) == len(_CLASS_RGB)
    legend = (len(common) + others) * _LINE
    gap = 8
    width = len(panels) * (size[0] + gap) - gap
    what = (f"at each position of a {patch} px grey square (every {stride} px, each cell at the "
            "square's centre)")
    canvas, top = _titled(width, _LINE + 2 + size[1] + 4 + max(legend, _LEGEND_PX),
                          None if title is None else (title, what))
    draw = ImageDraw.Draw(canvas)
    for i, (pic, label) in enumerate(panels):
        x = i * (size[0] + gap)
        _write(canvas, label, x, top)
        canvas.paste(pic, (x, top + _LINE + 2))
    y = top + _LINE + 2 + size[1] + 4
    for i, a, b in [(1, 0.0, 1.0)] + ([(3, lo, hi)] if unit is not None else []):
        x, bar_w = i * (size[0] + gap), min(_BAR_PX, size[0])  # viridis, its ends' values
        ramp = colorize(torch.linspace(0, 1, bar_w).view(1, -1).expand(_BAR_H, -1),
                        Scale.SEQUENTIAL)
        canvas.paste(Image.fromarray(ramp.permute(1, 2, 0).contiguous().numpy()), (x, y))
        draw.rectangle([x - 1, y - 1, x + bar_w, y + _BAR_H], outline=_INK_RGB)
        _write(canvas, f"{a:.3g}", x, y + _BAR_H + 2)
        _write(canvas, f"{b:.3g}", x + bar_w, y + _BAR_H + 2, "right")
    x = 2 * (size[0] + gap)
    rows = [(rgb, f"{names[c] if c < len(names) else c} ({c})")
            for c, rgb in zip(common, _CLASS_RGB, strict=False)]
    for row, (rgb, text) in enumerate(rows + ([(_OTHER_RGB, "other classes")] if others else [])):
        draw.rectangle([x, y + row * _LINE + 1, x + 9, y + row * _LINE + 10], fill=rgb)
        _write(canvas, text, x + 14, y + row * _LINE)
    canvas.info["convmaps-scale"] = "occlusion"
    return canvas


# --- explain ---------------------------------------------------------------------------------

# bars on the diverging scale's sides (coolwarm: red positive, blue negative), as the taps are
_POS_RGB, _NEG_RGB, _REST_RGB = (214, 96, 77), (88, 120, 206), (186, 176, 172)
_EXPLAIN_BARS = 6  # a node's largest terms drawn as bars; the others make one "rest" bar
_EXPLAIN_LABEL = 24 * _FONT_W  # the bars' label column (a residual add names its branches)
_EXPLAIN_HALF = 150  # px from the zero line to the largest bar's end
_EXPLAIN_INDENT = 2 * _FONT_W  # per level of the tree
_EXPLAIN_TILE = 48  # px of a kernel-map window, about (taps are whole pixels)
_EXPLAIN_INPUT_PX = 160  # the input panels are upscaled (nearest) to about this height
_EXPLAIN_KEY = ("bars: red positive, blue negative, grey the rest and the bias, each node on "
                "its own scale",
                "tiles: a top channel's kernel-map window, w*x per tap (red +, blue -, to +-the "
                "number under them); outlined: the tap its child is at")


def _at_text(position: tuple[int, int] | None) -> str:
    return "" if position is None else f"@{position[0]},{position[1]}"


_Bar = tuple[str, float, tuple[int, int, int]]


def _explain_rows(node: Node, level: int) -> list[tuple[int, Node, list[_Bar]]]:
    """(indent, node, bars) per node, depth first; bars (label, value, colour) only where
    the sum has more than one term or a bias."""
    terms = node.terms
    bars: list[_Bar] = []
    if len(terms) > 1 or node.bias != 0:
        for t in terms[:_EXPLAIN_BARS]:
            pooled = "avgpool" in node.kind.lower().replace("_", "")
            label = f"at {_at_text(t.position)[1:]}" if pooled \
                else t.source if node.kind == "add" else f"ch {t.channel}"
            bars.append((label, t.value, _POS_RGB if t.value >= 0 else _NEG_RGB))
        if len(terms) > _EXPLAIN_BARS:
            bars.append((f"rest ({len(terms) - _EXPLAIN_BARS})",
                         sum(t.value for t in terms[_EXPLAIN_BARS:]), _REST_RGB))
        bars.append(("bias", node.bias, _REST_RGB))
    rows = [(level * _EXPLAIN_INDENT, node, bars)]
    for child in node.children:
        rows += _explain_rows(child, level + 1)
    return rows


def _head(node: Node) -> str:
    return f"{node.module}:{node.channel}{_at_text(node.position)} = {node.value:.4g}   {node.kind}"


def _tap_px(node: Node) -> int:
    """A tap's side in px: the windows about `_EXPLAIN_TILE` wide, at least 2 px a tap."""
    if not node.windows:
        return 0
    w = node.windows[0]
    return max(2, _EXPLAIN_TILE // max(len(w.rows), len(w.cols)))


def _windows_size(node: Node) -> tuple[int, int]:
    """The px (width, height) of a node's windows: a label line, the tiles, the limit."""
    if not node.windows:
        return 0, 0
    w, px = node.windows[0], _tap_px(node)
    tile_w = max(len(w.cols) * px, _text_w(f"ch {max(v.channel for v in node.windows)}"))
    return len(node.windows) * (tile_w + 8), 2 * _LINE + len(w.rows) * px + 2


def _draw_windows(canvas: Image.Image, node: Node, x: int, y: int) -> None:
    """A node's top channels' kernel-map windows at (x, y), on one symmetric scale, each tap
    `w * x`; the tap its child is at outlined."""
    from PIL import ImageDraw

    px = _tap_px(node)
    lim = max((abs(v) for w in node.windows for row in w.taps for v in row), default=0.0) or 1.0
    at = {t.channel: t.position for t in node.terms}
    tile_w = _windows_size(node)[0] // len(node.windows) - 8
    draw = ImageDraw.Draw(canvas)
    for w in node.windows:
        taps = torch.tensor(w.taps, dtype=torch.float32)
        tile = _upscale(colorize((taps / lim + 1) / 2, Scale.DIVERGING), px)
        _write(canvas, f"ch {w.channel}", x, y)
        canvas.paste(Image.fromarray(tile.permute(1, 2, 0).contiguous().numpy()), (x, y + _LINE))
        draw.rectangle([x - 1, y + _LINE - 1, x + tile.shape[2], y + _LINE + tile.shape[1]],
                       outline=_REST_RGB)
        pos = at.get(w.channel)
        if pos is not None and pos[0] in w.rows and pos[1] in w.cols:
            i, j = w.rows.index(pos[0]), w.cols.index(pos[1])
            draw.rectangle([x + j * px - 1, y + _LINE + i * px - 1, x + (j + 1) * px,
                            y + _LINE + (i + 1) * px], outline=_INK_RGB, width=2)
        x += tile_w + 8
    _write(canvas, f"+-{lim:.3g}", x - tile_w - 8, y + _LINE + len(node.windows[0].rows) * px + 2)


def explain_figure(root: Node, image: Tensor, box: tuple[int, int, int, int],
                   title: str | None = None) -> Image.Image:
    """A unit's explain tree. On top the input picture (uint8 RGB (3, H, W)) with the root's
    receptive-field `box`, and the box cut out; under it one block per node (depth first,
    indented by level): its value; where it is a sum of several terms, a bar chart of the
    largest terms, the rest as one bar, and the bias, on the node's own scale; at a conv node
    its top channels' kernel-map windows, tap by tap. A key says what the colours mean; with
    a `title` (model, unit, image), a strip says it.

    >>> from convmaps.core.explain import Node, Term
    >>> leaf = Node("input", 0, (0, 0), 0.5, 0.0, [Term(0, 0.5, (0, 0))], "input")
    >>> explain_figure(leaf, torch.zeros(3, 4, 4, dtype=torch.uint8), (0, 0, 1, 1)).size[1] > 0
    True
    """
    from PIL import ImageDraw

    rows = _explain_rows(root, 0)
    _, h, w = image.shape
    factor = max(1, math.ceil(_EXPLAIN_INPUT_PX / max(h, 1)))
    panels = [_upscale(image, factor)]
    top, left, bottom, right = box
    if not (top <= 0 and left <= 0 and bottom >= h and right >= w):
        crop = _crop(image, box, 128)
        panels.append(_upscale(crop, max(1, (h * factor) // max(crop.shape[1], 1))))
    panel_h = _LINE + 2 + max(p.shape[1] for p in panels) + 8
    bar_w = 2 * _EXPLAIN_HALF
    column = _PAD + max(i for i, _, _ in rows) + _EXPLAIN_LABEL + bar_w + 12 * _FONT_W
    sizes = [_windows_size(n) for _, n, _ in rows]
    blocks = [max(_LINE + len(bars) * _LINE, wh) + 4 for (_, _, bars), (_, wh) in zip(
        rows, sizes, strict=True)]
    width = max(column + max(ww for ww, _ in sizes) + _PAD,
                sum(p.shape[2] + 8 for p in panels) + 2 * _PAD)
    height = panel_h + sum(blocks) + 2 * _LINE + 2 * _PAD
    what = ("each node: value = bias + its terms (input channels' kernel-map values, w*x, ...); "
            "children: the largest terms")
    canvas, y = _titled(width, height, None if title is None else (title, what),
                        *(_head(n) for _, n, _ in rows), *_EXPLAIN_KEY)
    x = _PAD
    for i, p in enumerate(panels):
        _write(canvas, ("input, receptive field boxed", "receptive field")[i], x, y)
        canvas.paste(Image.fromarray(p.permute(1, 2, 0).contiguous().numpy()), (x, y + _LINE + 2))
        if i == 0:
            _draw_box(canvas, x, y + _LINE + 2, box, (h, w), factor)
        x += p.shape[2] + 8
    y += panel_h
    draw = ImageDraw.Draw(canvas)
    for (indent, node, bars), block in zip(rows, blocks, strict=True):
        x = _PAD + indent
        _write(canvas, _head(node), x, y)
        if node.windows:
            _draw_windows(canvas, node, column, y)
        by = y + _LINE
        lim = max((abs(v) for _, v, _ in bars), default=0.0) or 1.0
        zero = x + _EXPLAIN_LABEL + _EXPLAIN_HALF
        if bars:
            draw.line([zero, by, zero, by + len(bars) * _LINE - 2], fill=_INK_RGB)
        for label, value, rgb in bars:
            _write(canvas, label, x, by)
            end = zero + round(value / lim * _EXPLAIN_HALF)
            if end != zero:
                draw.rectangle([min(zero, end), by + 2, max(zero, end), by + _LINE - 3], fill=rgb)
            _write(canvas, f"{value:.4g}", x + _EXPLAIN_LABEL + bar_w + 4, by)
            by += _LINE
        y += block
    y += _PAD
    for line in _EXPLAIN_KEY:
        _write(canvas, line, _PAD, y)
        y += _LINE
    canvas.info["convmaps-scale"] = "explain"
    return canvas
