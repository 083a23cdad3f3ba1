"""Line plots, RGB: the invariance curves of Zeiler & Fergus's Fig. 5, drawn with PIL in the
grids' bitmap font (no plotting library: the same pixels everywhere)."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from convmaps.render.figures import _CLASS_RGB, _INK_RGB, _PAD, _as_float, _text_w, _titled, _write
from convmaps.render.grids import _FONT_W, _LINE
from convmaps.render.scales import Scale, colorize

__all__ = ["invariance_plot"]

_PLOT_W, _PLOT_H = 360, 220  # each panel's plotting area
_LEFT = 48  # room for the y tick labels
_GAP = 40  # between the two panels
_GRID_RGB = (225, 225, 225)
_IMAGE_RGB = (190, 190, 190)  # one image's probability
_IMAGES_DRAWN = 50  # images whose own probability line is drawn


def _nice(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi], about `count` of them."""
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    if ticks[-1] < hi - step * 1e-9:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _colours(n: int) -> list[tuple[int, int, int]]:
    """A colour per line: Tableau's up to nine, else the sequential map from shallow (dark) to
    deep (its yellow end left out, too faint on white)."""
    if n <= len(_CLASS_RGB):
        return list(_CLASS_RGB[:n])
    ramp = colorize(torch.linspace(0, 0.85, n).view(1, -1), Scale.SEQUENTIAL)[:, 0]
    return [(int(c[0]), int(c[1]), int(c[2])) for c in ramp.T]


def _panel(canvas: Image.Image, x0: int, y0: int, xs: list[float], ys: Tensor,
           colours: list[tuple[int, int, int]], widths: list[int], xlabel: str, ylabel: str,
           ylim: tuple[float, float] | None = None) -> None:
    """Axes at (x0, y0) (the plotting area's top left) with `ys` (lines, points) over `xs`."""
    draw = ImageDraw.Draw(canvas)
    finite = ys[torch.isfinite(ys)]
    lo, hi = ylim or (min(0.0, float(finite.min())) if finite.numel() else 0.0,
                      float(finite.max()) if finite.numel() else 1.0)
    yt = _nice(lo, hi)
    lo, hi = yt[0], yt[-1]
    xt = _nice(min(xs), max(xs), 6)
    span = (max(xs) - min(xs)) or 1.0
    near = 1e-6 * span  # float32 amounts: 1.8 is 1.79999995
    xt = [v for v in xt if min(xs) - near <= v <= max(xs) + near] or [min(xs), max(xs)]

    def px(x: float, y: float) -> tuple[float, float]:
        return (x0 + (x - min(xs)) / span * _PLOT_W,
                y0 + _PLOT_H - (y - lo) / ((hi - lo) or 1.0) * _PLOT_H)

    for v in yt:
        _, y = px(min(xs), v)
        draw.line([(x0, y), (x0 + _PLOT_W, y)], fill=_GRID_RGB)
        draw.line([(x0 - 4, y), (x0, y)], fill=_INK_RGB)
        _write(canvas, f"{v:.3g}", x0 - 6, round(y) - _LINE // 2, "right")
    for v in xt:
        x, _ = px(v, lo)
        draw.line([(x, y0), (x, y0 + _PLOT_H)], fill=_GRID_RGB)
        draw.line([(x, y0 + _PLOT_H), (x, y0 + _PLOT_H + 4)], fill=_INK_RGB)
        _write(canvas, f"{v:.3g}", round(x), y0 + _PLOT_H + 6, "centre")
    draw.rectangle([x0, y0, x0 + _PLOT_W, y0 + _PLOT_H], outline=_INK_RGB)
    for line, rgb, width in zip(ys, colours, widths, strict=True):
        points = [px(x, float(y)) for x, y in zip(xs, line.tolist(), strict=True)
                  if math.isfinite(float(y))]
        if len(points) > 1:
            draw.line(points, fill=rgb, width=width, joint="curve")
        for x, y in points if width > 1 else []:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=rgb)
    _write(canvas, xlabel, x0 + _PLOT_W // 2, y0 + _PLOT_H + 6 + _LINE, "centre")
    _write(canvas, ylabel, x0 - _LEFT + _PAD, y0 - _LINE - 4)


def invariance_plot(amounts: Tensor, distance: Tensor, probability: Tensor,
                    modules: list[str], xlabel: str, title: str | None = None) -> Image.Image:
    """Zeiler & Fergus's Fig. 5 for one transform: on the left, per module (one line each, with
    a legend), the distance between its output for the original and the transformed image,
    divided by that distance at the largest amount and averaged over the images; on the right,
    the original top class's probability, each image thin and grey, their mean black.

    Args:
        amounts: (T,) the transform's amounts, the x axis.
        distance: (N, T, L) per image, amount and module.
        probability: (N, T) per image and amount.
        xlabel: what the amounts are, with their unit.
    """
    xs = [float(a) for a in _as_float(amounts)]
    d = _as_float(distance)
    last = d[:, -1:, :]
    # an image whose output does not move at the largest amount has no scale: left out
    normalised = torch.where(last > 0, d / last.clamp(min=1e-30), torch.nan)
    counted = torch.isfinite(normalised).sum(0)
    mean = torch.where(counted > 0, torch.nan_to_num(normalised).sum(0) / counted.clamp(min=1),
                       torch.nan).T  # (L, T)
    p = _as_float(probability)
    shown = p[:_IMAGES_DRAWN]
    colours = _colours(len(modules))
    per_row = max(1, _PLOT_W // max((_text_w(m) + 24 for m in modules), default=1))
    legend = math.ceil(len(modules) / per_row) * _LINE
    head = _LINE + 4  # each panel's y label
    foot = 6 + 2 * _LINE + 6  # tick labels and the x label
    what = (f"left: distance of each module's output from the original's, / distance at "
            f"{xs[-1]:.3g}, mean over images; right: probability of the original top class")
    width = _LEFT + 2 * _PLOT_W + _GAP + _LEFT + 3 * _PAD + _FONT_W * 3
    canvas, top = _titled(width, head + _PLOT_H + foot + legend + _PAD,
                          None if title is None else (title, what))
    y0 = top + head
    _panel(canvas, _LEFT, y0, xs, mean, colours, [2] * len(modules), xlabel,
           f"distance / distance at {xs[-1]:.3g}")
    x1 = _LEFT + _PLOT_W + _GAP + _LEFT
    lines = torch.cat([shown, p.mean(0, keepdim=True)]) if p.numel() else p.new_zeros(1, len(xs))
    _panel(canvas, x1, y0, xs, lines, [_IMAGE_RGB] * len(shown) + [_INK_RGB],
           [1] * len(shown) + [2], xlabel, "probability of the original top class",
           ylim=(0.0, 1.0))
    draw = ImageDraw.Draw(canvas)
    ly = y0 + _PLOT_H + foot
    cell = _PLOT_W // per_row
    for i, (name, rgb) in enumerate(zip(modules, colours, strict=True)):
        x, y = _LEFT + (i % per_row) * cell, ly + (i // per_row) * _LINE
        draw.line([(x, y + _LINE // 2), (x + 16, y + _LINE // 2)], fill=rgb, width=3)
        _write(canvas, name, x + 20, y)
    _write(canvas, f"grey: each image ({min(len(p), _IMAGES_DRAWN)} drawn); black: their mean",
           x1, ly)
    canvas.info["convmaps-scale"] = "invariance"
    return canvas
