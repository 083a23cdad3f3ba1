"""The composed figures, RGB: input pictures, projections beside their receptive field, and the
top-k of a unit (Zeiler & Fergus) and of a module."""

from __future__ import annotations

import math

import torch
from PIL import Image
from torch import Tensor

from convmaps.render.grids import upscale_factor

__all__ = [
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


# --- occlusion (convmaps occlude) ------------------------------------------------------------

# Class colours of the most-probable-class map (Tableau 10); other classes are grey.
_CLASS_RGB = ((78, 121, 167), (242, 142, 43), (225, 87, 89), (118, 183, 178), (89, 161, 79),
              (237, 201, 72), (176, 122, 161), (255, 157, 167), (156, 117, 95))
_OTHER_RGB = (186, 176, 172)


def occlusion_figure(image: Tensor, probability: Tensor, top_class: Tensor, unit: Tensor | None,
                     names: list[str], patch: int, stride: int, title: str = "") -> Image.Image:
    """Zeiler & Fergus's Fig. 7 for one image: the input (uint8 RGB (3, H, W)); the target
    class's probability at each patch position (Py, Px) on a fixed 0-1 scale; the most probable
    class there, the most frequent classes in colour with their names; and the unit's summed
    feature map (Py, Px) on its own range. Each position's cell is drawn centred on its patch's
    centre, over the faded input."""
    from PIL import ImageDraw, ImageFont

    from convmaps.render.scales import Scale, colorize

    _, h, w = image.shape
    factor = max(1, math.ceil(_PANEL_PX / max(h, 1)))
    size = (w * factor, h * factor)
    font = ImageFont.load_default()

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
        panels.append((over(colorize(u01, Scale.SEQUENTIAL)), "unit: summed feature map"))
    gap, head = 8, _CAPTION_PX + 4
    legend = 4 + _CAPTION_PX * (len(common) + (1 if counts.numel() > len(common) else 0))
    width = len(panels) * (size[0] + gap) - gap
    canvas = Image.new("RGB", (width, head + size[1] + 4 + max(legend, 2 * _CAPTION_PX) + head),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((0, 2), title, fill=(0, 0, 0), font=font)
    top = head + 2
    for i, (pic, label) in enumerate(panels):
        x = i * (size[0] + gap)
        canvas.paste(pic, (x, top + head - 2))
        draw.text((x, top), label, fill=(0, 0, 0), font=font)
    y = top + head + size[1] + 2
    bars = [(1, 0.0, 1.0)] + ([(3, lo, hi)] if unit is not None else [])
    for i, a, b in bars:  # a viridis bar with its ends' values
        x = i * (size[0] + gap)
        ramp = colorize(torch.linspace(0, 1, size[0] // 2).view(1, -1).expand(10, -1),
                        Scale.SEQUENTIAL)
        canvas.paste(Image.fromarray(ramp.permute(1, 2, 0).contiguous().numpy()), (x, y))
        draw.text((x, y + 12), f"{a:.3g}", fill=(0, 0, 0), font=font)
        draw.text((x + size[0] // 2, y + 12), f"{b:.3g}", fill=(0, 0, 0), font=font, anchor="ra")
    x = 2 * (size[0] + gap)
    for row, (c, rgb) in enumerate(zip(common, _CLASS_RGB, strict=False)):
        draw.rectangle([x, y + row * _CAPTION_PX, x + 10, y + row * _CAPTION_PX + 10], fill=rgb)
        name = names[c] if c < len(names) else str(c)
        draw.text((x + 14, y + row * _CAPTION_PX), f"{name} ({c})", fill=(0, 0, 0), font=font)
    if counts.numel() > len(common) and len(common) == len(_CLASS_RGB):
        row = len(common)
        draw.rectangle([x, y + row * _CAPTION_PX, x + 10, y + row * _CAPTION_PX + 10],
                       fill=_OTHER_RGB)
        draw.text((x + 14, y + row * _CAPTION_PX), "other classes", fill=(0, 0, 0), font=font)
    canvas.info["convmaps-scale"] = "occlusion"
    return canvas
