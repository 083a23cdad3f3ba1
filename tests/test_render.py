"""Tests for convmaps.render: layouts, colours, robust ranges, legends, caps and PNG encoding.

Layouts are recomputed here from the numbers the pictures promise (tile side, gaps, a 12 px
label band, a 30 px legend, a 200 px minimum width), not read from render's own geometry.
"""

from __future__ import annotations

import io
import math
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from convmaps.options import PngScale
from convmaps.render import (
    Scale,
    chart_size,
    choose_scale,
    colorize,
    draw,
    filter_grid,
    image_size,
    map_grid,
    png_bound,
    png_bytes,
    render_activation,
    robust_limit,
    tap_mosaic,
    upscale_factor,
    vector_grid,
)
from convmaps.render.scales import _limits

NEUTRAL = (221, 221, 221)  # coolwarm's middle
TITLE, TITLE_H = "alexnet · features.3 · cat.jpg", 2 * 12 + 4  # a title strip: two lines
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (128, 128, 128)
BAND, GAP, LEGEND, MIN_W, LINE = 12, 2, 30, 200, 12


def rgb(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 pixels, whatever the mode."""
    return np.asarray(img.convert("RGB"))


def px(img: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    r, g, b = rgb(img)[y, x]
    return int(r), int(g), int(b)


def lut_end(scale: Scale, which: float) -> tuple[int, int, int]:
    r, g, b = colorize(torch.tensor([[which]]), scale).flatten().tolist()
    return r, g, b


def factor(n: int, h: int, w: int) -> int:
    """The upscaling of a grid of n tiles: tiles of ~32 px, few tiles ~256 px wide, at most 16."""
    cols = 1 if n == 1 else math.ceil(math.sqrt(n))
    tile = max(1, min(16, round(32 / max(h, w))))
    return max(tile, min(16, round(256 / (cols * w))))


def tiles_layout(n: int, tile_h: int, tile_w: int, labels: bool = True
                 ) -> tuple[int, int, int, int, int]:
    """(width, height, left, cols, band) of a tile grid, from its stated rules."""
    cols = 1 if n == 1 else math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    band = BAND if labels else 0
    grid_w = cols * (tile_w + GAP) - GAP
    grid_h = rows * (band + tile_h + GAP) - GAP
    width = max(grid_w, MIN_W)
    return width, grid_h + LEGEND, (width - grid_w) // 2, cols, band


def tile_xy(i: int, tile_h: int, tile_w: int, left: int, cols: int, band: int
            ) -> tuple[int, int]:
    r, c = divmod(i, cols)
    return left + c * (tile_w + GAP), r * (band + tile_h + GAP) + band


def draw_text(s: str) -> np.ndarray:
    """`s` drawn with Pillow's bitmap font, independently of render: a bool mask."""
    font = ImageFont.load_default_imagefont()
    img = Image.new("1", (6 * len(s), 11), 0)
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"
    draw.text((0, 0), s, fill=1, font=font)
    return np.array(img, dtype=bool)


def shows_text(img: Image.Image, s: str, x: int, y: int) -> bool:
    """Whether `s` is inked (black) at (x, y), exactly, in the picture."""
    mask = draw_text(s)
    h, w = mask.shape
    region = rgb(img)[y : y + h, x : x + w]
    ink = (region == 0).all(-1)
    return region.shape[:2] == (h, w) and bool((ink == mask).all())


def says(img: Image.Image, note: str) -> bool:
    """Whether the picture ends with `note`, wrapped at spaces to its width."""
    lines = textwrap.wrap(note, (img.width - 8) // 6)
    top = img.height - 2 - len(lines) * LINE
    return all(shows_text(img, line, 4, top + i * LINE) for i, line in enumerate(lines))


# --- sizes, tiles and numbers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "cols", "rows"),
    [((6, 28, 28), 3, 2), ((16, 5, 5), 4, 4), ((10, 6, 6), 4, 3), ((64, 13, 13), 8, 8),
     ((1, 40, 40), 1, 1)],
)
def test_map_grid_size(shape: tuple[int, int, int], cols: int, rows: int) -> None:
    c, h, w = shape
    f = factor(c, h, w)
    img = map_grid(torch.randn(shape))
    assert img.mode == "P"
    width, height, *_ = tiles_layout(c, h * f, w * f)
    assert img.size == (width, height)
    assert img.size == image_size("activation", shape, titled=False)


def test_upscale_factor() -> None:
    assert upscale_factor(5, 5) == 6  # 5x5 maps become 30 px tiles (more in a small grid)
    assert upscale_factor(6, 6) == 5  # AlexNet's 6x6 maps become 30 px
    assert upscale_factor(13, 13) == 2  # 26 px: nearer 32 than 39 is
    assert upscale_factor(28, 28) == 1
    assert upscale_factor(55, 55) == 1
    assert upscale_factor(1, 1) == 16  # capped
    assert upscale_factor(0, 0) == 1


def test_tiles_are_upscaled_with_nearest_neighbour_and_numbered() -> None:
    torch.manual_seed(0)
    maps = torch.randn(5, 4, 6)  # 3 columns of 6 values: factor 14, a ~256 px wide grid
    img = map_grid(maps)
    f = factor(5, 4, 6)
    assert f == 14
    _, _, left, cols, band = tiles_layout(5, 4 * f, 6 * f)
    lo, hi = (float(v) for v in img.info["convmaps-range"].split(","))
    expected = colorize(((maps - lo) / (hi - lo)), Scale.DIVERGING)  # (5, 3, 4, 6)
    pixels = rgb(img)
    for i in range(5):
        x, y = tile_xy(i, 4 * f, 6 * f, left, cols, band)
        tile = pixels[y : y + 4 * f, x : x + 6 * f]
        want = expected[i].permute(1, 2, 0).numpy().repeat(f, 0).repeat(f, 1)
        assert np.array_equal(tile, want), i
        assert shows_text(img, str(i), x, y - band)  # its number, above it


def test_small_tiles_carry_no_numbers() -> None:
    img = map_grid(torch.rand(100, 50, 20))  # factor 1: 20 px wide tiles, under 24
    assert factor(100, 50, 20) == 1
    width, height, *_ = tiles_layout(100, 50, 20, labels=False)
    assert img.size == (width, height)


def test_map_grid_max_tiles_draws_first_channels() -> None:
    img = map_grid(torch.randn(100, 8, 8), max_tiles=9)
    f = factor(9, 8, 8)
    assert img.size == tiles_layout(9, 8 * f, 8 * f)[:2]


def test_layer_scale_uses_one_range_for_all_tiles() -> None:
    maps = torch.stack([torch.full((4, 4), 1.0), torch.full((4, 4), 4.0)])
    img = map_grid(maps, Scale.SEQUENTIAL)
    t = 4 * factor(2, 4, 4)
    _, _, left, cols, band = tiles_layout(2, t, t)
    a, b = (px(img, *tile_xy(i, t, t, left, cols, band)) for i in range(2))
    assert a != b  # a per-tile range would draw both constant tiles alike
    assert img.info["convmaps-range"] == "0,4"


def test_channel_scale_gives_each_tile_its_own_range() -> None:
    torch.manual_seed(0)
    maps = torch.stack([torch.rand(8, 8), 100 * torch.rand(8, 8)])
    img = map_grid(maps, png_scale=PngScale.channel)
    ranges = [tuple(float(v) for v in r.split(",")) for r in img.info["convmaps-range"].split(";")]
    assert ranges == [pytest.approx(robust_limit(m, Scale.SEQUENTIAL), rel=1e-5) for m in maps]
    assert img.info["convmaps-png-scale"] == "channel"
    t = 8 * factor(2, 8, 8)
    _, height, left, cols, band = tiles_layout(2, t, t)
    pixels = rgb(img)
    tiles = [pixels[y : y + t, x : x + t]
             for x, y in (tile_xy(i, t, t, left, cols, band) for i in range(2))]
    # the same pattern up to a factor 100: the same colours, tile for tile
    maps2 = torch.stack([maps[0], maps[0] * 100])
    img2 = map_grid(maps2, png_scale="channel")
    pixels2 = rgb(img2)
    a, b = (pixels2[y : y + t, x : x + t]
            for x, y in (tile_xy(i, t, t, left, cols, band) for i in range(2)))
    assert np.array_equal(a, b)
    assert not np.array_equal(tiles[0], tiles[1])
    # the bar says so instead of numbers, on a line of its own
    assert img.height == height + LINE + 2
    assert shows_text(img, "each channel has its own range", 4, height)
    assert img.size == image_size("activation", (2, 8, 8), "channel", titled=False)


# --- colours and the colour bar ------------------------------------------------------------------


def test_diverging_zero_is_neutral_and_signs_differ() -> None:
    img = map_grid(torch.tensor([[[-2.0, 0.0, 2.0]]]))  # one 1x3 tile, factor 16
    f = factor(1, 1, 3)
    _, _, left, cols, band = tiles_layout(1, f, 3 * f)
    neg, zero, pos = (px(img, left + i * f, band) for i in range(3))
    assert zero == NEUTRAL
    assert neg == lut_end(Scale.DIVERGING, 0.0) and pos == lut_end(Scale.DIVERGING, 1.0)


def test_colour_bar_shows_the_range_and_zero() -> None:
    torch.manual_seed(0)
    maps = torch.randn(4, 10, 10)
    img = map_grid(maps)
    lo, hi = robust_limit(maps, Scale.DIVERGING)
    assert img.info["convmaps-range"] == f"{lo:.6g},{hi:.6g}"
    t = 10 * factor(4, 10, 10)
    width, height, *_ = tiles_layout(4, t, t)
    bar_y, text_y = height - LEGEND + 4, height - LEGEND + 4 + 10 + 3
    bar_w = (width - 8) - 1 + (width - 8) % 2  # odd: one middle column
    bar = rgb(img)[bar_y + 5, 4 : 4 + bar_w]
    assert tuple(bar[0]) == lut_end(Scale.DIVERGING, 0.0)
    assert tuple(bar[-1]) == lut_end(Scale.DIVERGING, 1.0)
    assert tuple(bar[bar_w // 2]) == NEUTRAL
    assert tuple(rgb(img)[bar_y + 5, 4 + bar_w]) == BLACK  # its frame
    assert shows_text(img, f"{lo:.3g}", 4, text_y)
    right = f"{hi:.3g}"
    assert shows_text(img, right, 4 + bar_w - 6 * len(right), text_y)
    assert shows_text(img, "0", 4 + bar_w // 2 - 3, text_y)


def test_sequential_bar_starts_at_zero_without_a_middle_label() -> None:
    img = map_grid(torch.tensor([[[0.0, 1.0, 2.0]]]))
    assert choose_scale(torch.tensor([0.0, 1.0])) is Scale.SEQUENTIAL
    width, height = img.size
    text_y = height - LEGEND + 4 + 10 + 3
    assert shows_text(img, "0", 4, text_y) and shows_text(img, "2", width - 11, text_y)
    middle = rgb(img)[text_y : text_y + 11, width // 2 - 3 : width // 2 + 3]
    assert (middle == 255).all()


def test_colorize_lut_ends_and_middle() -> None:
    t = torch.tensor([[0.0, 0.5, 1.0, -3.0, 7.0]])
    div = colorize(t, Scale.DIVERGING)
    assert div.dtype == torch.uint8 and div.shape == (3, 1, 5)
    assert tuple(div[:, 0, 1].tolist()) == NEUTRAL
    assert torch.equal(div[:, 0, 3], div[:, 0, 0])  # clipped below
    assert torch.equal(div[:, 0, 4], div[:, 0, 2])  # clipped above
    seq = colorize(torch.linspace(0, 1, 256)[None], Scale.SEQUENTIAL)[:, 0]
    brightness = seq.float().sum(0)
    assert brightness[0] == brightness.min() and brightness[-1] == brightness.max()
    assert tuple(seq[:, 0].tolist()) == (68, 1, 84) and tuple(seq[:, -1].tolist()) == (253, 231, 37)


def test_colorize_keeps_leading_dims() -> None:
    assert colorize(torch.rand(2, 4, 5, 6), Scale.SEQUENTIAL).shape == (2, 4, 3, 5, 6)


def test_choose_scale() -> None:
    assert choose_scale(torch.rand(3, 3)) is Scale.SEQUENTIAL
    assert choose_scale(torch.tensor([0.0, -0.1])) is Scale.DIVERGING
    assert choose_scale(torch.tensor([1.0, float("nan")])) is Scale.SEQUENTIAL
    assert choose_scale(torch.tensor([1.0, float("-inf")])) is Scale.DIVERGING
    assert choose_scale(torch.empty(0)) is Scale.SEQUENTIAL


def test_nan_and_inf_colours() -> None:
    img = map_grid(torch.tensor([[[float("nan"), float("inf"), float("-inf"), -1.0, 1.0]]]))
    f = factor(1, 1, 5)
    _, _, left, _, band = tiles_layout(1, f, 5 * f)
    nan, pinf, ninf, neg, pos = (px(img, left + i * f, band) for i in range(5))
    assert nan == BLACK
    assert pinf == pos and ninf == neg  # infinities are clipped to the ends


def test_channels_last_and_half_precision_draw_the_same() -> None:
    torch.manual_seed(0)
    t = torch.randn(1, 6, 9, 9)
    last = t.to(memory_format=torch.channels_last)[0]
    assert not last.is_contiguous()
    assert png_bytes(map_grid(last)) == png_bytes(map_grid(t[0]))
    half = map_grid(torch.randn(4, 8, 8, dtype=torch.bfloat16))
    t = 8 * factor(4, 8, 8)
    assert half.size == tiles_layout(4, t, t)[:2]


# --- robust ranges ------------------------------------------------------------------------------


def reference_limit(t: torch.Tensor, scale: Scale) -> tuple[float, float]:
    """The range rule written the slow, obvious way: copy the kept values every pass."""
    x = t.flatten().double()
    x = x[torch.isfinite(x) & (x != 0)]
    centred = scale is Scale.SEQUENTIAL
    x = x[x > 0] if centred else x.abs()
    if x.numel() == 0:
        return (0.0, 1.0) if centred else (-1.0, 1.0)

    def stats(k: torch.Tensor) -> tuple[float, float]:
        if centred:
            return float(k.mean()), float(k.std(correction=0))
        return 0.0, float(k.square().mean().sqrt())

    keep = x
    for _ in range(5):
        c, s = stats(keep)
        kept = keep[(keep - c).abs() <= 4 * s]
        if kept.numel() in (0, keep.numel()):
            break
        keep = kept
    c, s = stats(keep)
    if centred:
        hi = min(float(x.max()), c + 3 * s)
        return (0.0, hi) if hi > 0 else (0.0, 1.0)
    lim = min(float(x.max()), 3 * s)
    return (-lim, lim) if lim > 0 else (-1.0, 1.0)


@pytest.mark.parametrize("make", [
    lambda g: torch.randn(5000, generator=g),
    lambda g: torch.randn(5000, generator=g).exp(),  # heavy right tail
    lambda g: torch.where(torch.rand(5000, generator=g) < 0.05, torch.rand(5000, generator=g), 0),
    lambda g: torch.cat([torch.randn(3000, generator=g), torch.tensor([1e6, -5e5, 80.0])]),
    lambda g: torch.randn(5000, generator=g) + 3,  # offset to one side
    lambda g: torch.cat([torch.rand(4000, generator=g), torch.tensor([float("nan"), 1e30])]),
])
@pytest.mark.parametrize("scale", list(Scale))
def test_robust_limit_matches_the_slow_rule(make, scale: Scale) -> None:
    t = make(torch.Generator().manual_seed(1))
    assert robust_limit(t, scale) == pytest.approx(reference_limit(t, scale), rel=1e-5)


@pytest.mark.parametrize("scale", list(Scale))
def test_per_channel_ranges_match_the_slow_rule_row_by_row(scale: Scale) -> None:
    # Rows that stop after different passes, empty and non-finite rows, side by side:
    # each row's range must be what the slow rule gives for that row alone.
    g = torch.Generator().manual_seed(2)
    rows = [
        torch.randn(400, generator=g),
        torch.randn(400, generator=g).exp(),  # several passes
        torch.cat([torch.randn(399, generator=g), torch.tensor([1e6])]),
        torch.zeros(400),
        torch.full((400,), float("nan")),
        torch.where(torch.rand(400, generator=g) < 0.03, torch.rand(400, generator=g), 0),
        torch.cat([torch.rand(398, generator=g), torch.tensor([float("inf"), 3e38])]),
        torch.randn(400, generator=g) + 5,
    ]
    x = torch.stack(rows).numpy()
    lo, hi = _limits(x, scale)
    for i, row in enumerate(rows):
        assert (lo[i], hi[i]) == pytest.approx(reference_limit(row, scale), rel=1e-5), i


def test_one_outlier_does_not_wash_out_the_rest() -> None:
    torch.manual_seed(0)
    t = torch.randn(1000)
    t[17] = 1e6
    lo, hi = robust_limit(t, Scale.DIVERGING)
    assert lo == -hi and 2 < hi < 5
    colours = map_grid(t.reshape(1, 40, 25)).convert("RGB").getcolors(maxcolors=1024)
    assert colours is not None and len(colours) > 100


def test_one_outlier_sequential() -> None:
    torch.manual_seed(0)
    t = torch.rand(1000)
    t[3] = 1e6
    lo, hi = robust_limit(t, Scale.SEQUENTIAL)
    assert lo == 0 and 0.9 < hi < 2


def test_sparse_map_is_not_saturated() -> None:
    torch.manual_seed(0)
    t = torch.where(torch.rand(10_000) < 0.05, torch.rand(10_000) + 1, torch.zeros(10_000))
    _, hi = robust_limit(t, Scale.SEQUENTIAL)
    assert hi >= 1.9  # the active values span 1..2


def test_robust_limit_never_exceeds_max() -> None:
    assert robust_limit(torch.tensor([0.0, 0.5]), Scale.SEQUENTIAL) == (0.0, 0.5)
    assert robust_limit(torch.tensor([-0.25, 0.5]), Scale.DIVERGING) == (-0.5, 0.5)


@pytest.mark.parametrize(
    "t",
    [
        torch.zeros(4, 4),
        torch.full((4, 4), 3.0),
        torch.full((4, 4), -3.0),
        torch.full((1000,), 0.1),
        torch.tensor([float("nan")] * 4),
        torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0]),
        torch.empty(0),
        torch.tensor([3e38, -3e38, 1.0]),  # squares overflow float32
    ],
)
@pytest.mark.parametrize("scale", list(Scale))
def test_robust_limit_degenerate(t: torch.Tensor, scale: Scale) -> None:
    lo, hi = robust_limit(t, scale)
    assert math.isfinite(lo) and math.isfinite(hi) and lo < hi
    assert lo == (-hi if scale is Scale.DIVERGING else 0.0)
    assert (lo, hi) == pytest.approx(reference_limit(t, scale), rel=1e-6)


@pytest.mark.parametrize(
    "t",
    [
        torch.tensor([[[float("nan"), 1.0], [float("inf"), float("-inf")]]]),
        torch.full((3, 4, 4), float("nan")),
        torch.full((2, 3, 3), 7.0),
        torch.zeros(2, 3, 3),
        torch.empty(0, 5, 5),
        torch.empty(3, 0, 5),
    ],
)
@pytest.mark.parametrize("png_scale", list(PngScale))
def test_map_grid_survives_odd_values(t: torch.Tensor, png_scale: PngScale) -> None:
    img = map_grid(t, png_scale=png_scale)
    assert img.width >= 1 and img.height >= 1
    assert img.size == image_size("activation", tuple(t.shape), png_scale, titled=False)
    png_bytes(img)


# --- vectors and dispatch ------------------------------------------------------------------------


def test_long_vector_wraps_into_a_square_grid_with_ticks() -> None:
    torch.manual_seed(0)
    v = torch.randn(1000)
    img = vector_grid(v)
    cols, cell = 32, 8  # ceil(sqrt(1000)), 256 px / 32
    left = len("992") * 6 + 4  # row ticks name the index each row starts at
    top = 14
    lo, hi = robust_limit(v, Scale.DIVERGING)
    expected = colorize(((v - lo) / (hi - lo))[None], Scale.DIVERGING)[:, 0].T  # (1000, 3)
    pixels = rgb(img)
    shift = (max(left + cols * cell, MIN_W) - left - cols * cell) // 2
    for i in (0, 1, 31, 32, 500, 999):
        r, c = divmod(i, cols)
        y, x = top + r * cell, left + shift + c * cell
        block = pixels[y : y + cell, x : x + cell].reshape(-1, 3)
        assert (block == expected[i].numpy()).all(), i
    # row 2 starts at index 64: its tick label ends 4 px left of the grid
    assert shows_text(img, "64", left + shift - 4 - 12, top + 2 * cell + cell // 2 - 5)
    assert img.size == image_size("activation", (1000,), titled=False)


def test_vector_lists_its_strongest_entries() -> None:
    v = torch.tensor([0.1, 5.0, -2.0, 3.0, float("nan"), 4.0, 0.0, 1.0])
    plain = render_activation(v)
    lines_top = plain.height - 5 * LINE - 2
    for rank, (i, value) in enumerate([(1, "5"), (5, "4"), (3, "3"), (7, "1"), (0, "0.1")], 1):
        assert shows_text(plain, f"{rank}. {i}: {value}", 4, lines_top + (rank - 1) * LINE)
    wrong = render_activation(v, classes=[f"class{i}" for i in range(3)])  # not one per value
    assert png_bytes(wrong) == png_bytes(plain)  # ignored: the grid, indices only


def test_classifier_output_is_a_bar_chart_of_its_top_classes() -> None:
    """A 1-D output with a name per value: its ten largest scores as labelled bars, from zero
    (warm for positive values, cool for negative ones), each with its softmax probability."""
    v = torch.linspace(-3, 8, 12)[torch.tensor([3, 11, 0, 7, 5, 1, 10, 2, 9, 4, 8, 6])]
    names = [f"class{i}" for i in range(12)]
    img = render_activation(v, classes=names)
    assert img.size == chart_size(titled=False)
    p = torch.softmax(v.double(), 0)
    order = torch.argsort(v, descending=True)[:10].tolist()
    name_end = 4 + 30 * 6 - 4
    for rank, i in enumerate(order, 1):
        y = 4 + (rank - 1) * (LINE + 3) + 1
        label = f"{rank:>2}. class{i}"
        assert shows_text(img, label, name_end - 6 * len(label), y)
        value = f"{float(v[i]):.4g}  p {float(p[i]):.3f}"
        assert shows_text(img, value, name_end + 4 + 160 + 6, y)
    pixels = rgb(img)
    top_row, last_row = pixels[4 + 5], pixels[4 + 9 * (LINE + 3) + 5]
    bars = (top_row != 255).any(-1)[name_end + 4 : name_end + 4 + 160]
    assert bars.sum() > 100  # the largest score's bar spans most of the width
    assert {tuple(c) for c in top_row[name_end + 4 + 120 : name_end + 4 + 140]} == \
        {tuple(colorize(torch.tensor([[230.5 / 251]]), Scale.DIVERGING).flatten().tolist())}
    assert (last_row[name_end + 4 : name_end + 4 + 160] != 255).any(-1).sum() > 0
    assert img.info["convmaps-range"] == vector_grid(v).info["convmaps-range"]


def test_strongest_ties_go_to_the_smaller_index() -> None:
    v = torch.zeros(50)
    v[[40, 3, 17, 9, 30, 44, 2]] = 1.0  # seven tied maxima: the five smallest indices win
    img = render_activation(v)
    top = img.height - 5 * LINE - 2
    for rank, i in enumerate([2, 3, 9, 17, 30], 1):
        assert shows_text(img, f"{rank}. {i}: 1", 4, top + (rank - 1) * LINE)


def test_long_class_names_are_cut_to_the_picture() -> None:
    img = render_activation(torch.arange(4.0), classes=["x" * 200] * 4)
    assert img.size == chart_size(titled=False)
    assert shows_text(img, " 1. " + "x" * 21 + "...", 4 + 30 * 6 - 4 - 28 * 6, 5)


@pytest.mark.parametrize(
    ("shape", "kind"),
    [((4, 6, 6), "grid"), ((6, 6), "grid"), ((10,), "vector"), ((2, 2, 2, 4), "vector"),
     ((), "vector"), ((512, 1, 1), "vector")],
)
def test_render_activation_dispatch(shape: tuple[int, ...], kind: str) -> None:
    t = torch.randn(shape)
    img = render_activation(t)
    if kind == "grid":
        t3 = t if t.dim() == 3 else t[None]
        assert png_bytes(img) == png_bytes(map_grid(t3))
    else:
        assert png_bytes(img) == png_bytes(vector_grid(t.flatten()))
    assert img.size == image_size("activation", shape, titled=False)


def test_render_activation_picks_scale() -> None:
    assert render_activation(torch.rand(3, 4, 4)).info["convmaps-scale"] == "sequential"
    assert render_activation(torch.randn(3, 4, 4) - 1).info["convmaps-scale"] == "diverging"


# --- filters -------------------------------------------------------------------------------------


def test_filter_grid_rgb_tiles() -> None:
    weight = torch.zeros(10, 3, 11, 11)
    weight[0, 0] = 1.0  # filter 0: red kernel positive
    weight[9, 2] = -1.0  # filter 9: blue kernel negative
    img, note = filter_grid(weight)
    t = 11 * factor(10, 11, 11)
    assert note is None and img.mode == "RGB"
    width, height, left, cols, band = tiles_layout(10, t, t)
    assert img.size == (width, height)
    assert px(img, *tile_xy(0, t, t, left, cols, band)) == (255, 128, 128)
    assert px(img, *tile_xy(9, t, t, left, cols, band)) == (128, 128, 0)
    assert px(img, *tile_xy(5, t, t, left, cols, band)) == GREY  # zero weights: mid grey
    assert shows_text(img, "9", *np.add(tile_xy(9, t, t, left, cols, band), (0, -band)))


def test_filter_grid_one_input_channel_is_tiles_not_a_strip() -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 1, 5, 5)  # LeNet's C1
    img, note = filter_grid(weight)
    f = factor(6, 5, 5)
    assert note is None and img.size == tiles_layout(6, 5 * f, 5 * f)[:2]
    _, _, left, cols, band = tiles_layout(6, 5 * f, 5 * f)
    lo, hi = robust_limit(weight, Scale.DIVERGING)
    x, y = tile_xy(4, 5 * f, 5 * f, left, cols, band)
    want = colorize((weight[4, 0] - lo) / (hi - lo), Scale.DIVERGING).permute(1, 2, 0).numpy()
    assert np.array_equal(rgb(img)[y : y + 5 * f : f, x : x + 5 * f : f], want)


def test_filter_grid_rows_per_filter_with_ticks() -> None:
    weight = torch.zeros(16, 6, 5, 5)
    weight[11, 4] = 1.0  # filter 11's kernel on input channel 4
    img, note = filter_grid(weight)
    assert note is None
    left, top, cell = len("15") * 6 + 4, 14, 30
    grid_w = 6 * (cell + 1) - 1
    width = max(left + grid_w, MIN_W)
    left += (width - left - grid_w) // 2
    assert img.size == (width, top + 16 * (cell + 1) - 1 + LEGEND)
    assert px(img, left + 4 * 31, top + 11 * 31) == lut_end(Scale.DIVERGING, 1.0)
    assert px(img, left + 3 * 31, top + 11 * 31) == NEUTRAL
    assert px(img, left + 4 * 31 - 1, top + 11 * 31) == GREY  # the gutter
    assert shows_text(img, "10", left - 4 - 12, top + 10 * 31 + 15 - 5)  # every 2nd row


def test_filter_grid_caps_and_says_so() -> None:
    img, note = filter_grid(torch.randn(20, 12, 3, 3), max_filters=8, max_kernels=5)
    assert note == "drew 8 of 20 filters x 5 of 12 kernels (cap: --png-cap)"
    assert says(img, note)
    img, note = filter_grid(torch.randn(96, 3, 11, 11), max_filters=64)
    assert note == "drew 64 of 96 filters (cap: --png-cap)"
    t = 11 * factor(64, 11, 11)
    width, height, *_ = tiles_layout(64, t, t)
    assert img.size == (width, height + len(textwrap.wrap(note, (width - 8) // 6)) * LINE + 2)
    assert says(img, note)


def test_filter_grid_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError, match="C_out"):
        filter_grid(torch.randn(3, 5, 5))


# --- tap mosaics ---------------------------------------------------------------------------------


def test_tap_mosaic_places_window_patches() -> None:
    taps = torch.zeros(2, 3, 2, 2)
    taps[1, 2, 0, 1] = 1.0  # window (1, 2), patch pixel (0, 1)
    img, note = tap_mosaic(taps)
    f = upscale_factor(2, 2)  # 16: 32 px patches
    cell = 2 * f
    left, top = len("1") * 6 + 4, 14
    grid_w = 3 * (cell + 1) - 1
    left += (max(left + grid_w, MIN_W) - left - grid_w) // 2
    assert note is None
    assert img.size == (MIN_W, top + 2 * (cell + 1) - 1 + LEGEND)
    x, y = left + 2 * (cell + 1) + 1 * f, top + 1 * (cell + 1)
    assert px(img, x, y) == px(img, x + f - 1, y + f - 1) == lut_end(Scale.DIVERGING, 1.0)
    assert px(img, x - 1, y) == NEUTRAL and px(img, left, top) == NEUTRAL
    assert px(img, left + cell, top) == GREY  # gutter between windows
    assert img.size == image_size("taps", (2, 3, 2, 2), titled=False)


def test_tap_mosaic_1x1_is_the_upscaled_map_without_gutters() -> None:
    img, _ = tap_mosaic(torch.randn(5, 6, 1, 1))
    f = upscale_factor(5, 6)
    left = len("4") * 6 + 4
    assert img.size == (max(left + 6 * f, MIN_W), 14 + 5 * f + LEGEND)


def test_tap_mosaic_cap() -> None:
    img, note = tap_mosaic(torch.randn(30, 20, 3, 3), max_side=100)  # 33 px patches + 1
    assert note == "drew the top-left 2x2 of 30x20 windows (cap: 100 px)"
    assert says(img, note)


# --- PNG -----------------------------------------------------------------------------------------


def test_png_bytes_round_trip_with_text() -> None:
    img = map_grid(torch.randn(4, 5, 5))
    back = Image.open(io.BytesIO(png_bytes(img, note="drew 4 of 9 filters")))
    assert back.mode == "P" and back.size == img.size
    assert np.array_equal(rgb(back), rgb(img))
    assert back.info["convmaps-note"] == "drew 4 of 9 filters"
    assert back.info["convmaps-scale"] == "diverging"
    lo, hi = (float(v) for v in back.info["convmaps-range"].split(","))
    assert lo == -hi and hi > 0


def test_png_bytes_deterministic() -> None:
    t = torch.randn(8, 6, 6)
    assert png_bytes(map_grid(t), note="x") == png_bytes(map_grid(t.clone()), note="x")


def test_png_bytes_compress_level_changes_size_not_pixels() -> None:
    img = map_grid(torch.randn(16, 12, 12))
    raw, packed = png_bytes(img, compress_level=0), png_bytes(img, compress_level=9)
    assert len(packed) < len(raw)
    assert Image.open(io.BytesIO(raw)).tobytes() == Image.open(io.BytesIO(packed)).tobytes()


def test_png_bytes_keeps_every_pixel_of_rgb_pictures() -> None:
    rng = np.random.default_rng(0)
    few = rng.integers(0, 4, (40, 50, 3), dtype=np.uint8) * 60  # 64 colours: a palette PNG
    many = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    for arr, mode in ((few, "P"), (many, "RGB")):
        back = Image.open(io.BytesIO(png_bytes(Image.fromarray(arr, "RGB"))))
        assert back.mode == mode and np.array_equal(rgb(back), arr)


def test_drawing_in_threads_gives_the_same_bytes() -> None:
    # No shared mutable state: concurrent writers (dump's writer threads) cannot mix pictures.
    torch.manual_seed(0)
    inputs = [torch.randn(c, 7, 7) for c in (3, 5, 8, 13)] + [torch.randn(300)]
    expected = [png_bytes(render_activation(t)) for t in inputs]
    got: dict[int, list[bytes]] = {}

    def work(k: int) -> None:
        got[k] = [png_bytes(render_activation(t)) for t in inputs for _ in range(3)][::3]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(v == expected for v in got.values())


def _palette_picture(seed: int, size: int = 400) -> Image.Image:
    """An RGB picture of 200 colours, a different (overlapping) set per seed, so that two
    pictures give the same colour different palette indices."""
    rng = np.random.default_rng(seed)
    reds = rng.integers(0, 200, (size, size)) + 5 * seed
    rgb = np.stack([reds, np.full_like(reds, 7), np.full_like(reds, 9)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def test_png_bytes_from_several_threads_equal_sequential() -> None:
    pictures = [_palette_picture(seed) for seed in range(6)]
    expected = [png_bytes(p) for p in pictures]
    assert all(Image.open(io.BytesIO(b)).mode == "P" for b in expected)  # the palette path
    barrier = threading.Barrier(len(pictures))

    def encode(i: int) -> list[bytes]:
        barrier.wait()  # start together, so the encodings overlap
        return [png_bytes(pictures[i]) for _ in range(8)]

    with ThreadPoolExecutor(len(pictures)) as pool:
        results = list(pool.map(encode, range(len(pictures))))
    for i, got in enumerate(results):
        assert all(b == expected[i] for b in got), f"picture {i} changed under threads"


@pytest.mark.parametrize("kind,shape", [
    ("activation", (6, 28, 28)), ("activation", (64, 55, 55)), ("activation", (1, 5, 5)),
    ("activation", (120,)), ("activation", (10,)), ("activation", (9216,)), ("activation", (7, 9)),
    ("activation", (256, 1, 1)), ("kernels", (6, 10, 10)), ("taps", (10, 10, 5, 5)),
    ("taps", (27, 27, 1, 1)), ("taps", (300, 300, 5, 5)),
])
def test_png_bound_is_the_drawn_size_and_an_upper_bound(kind, shape):
    """As a dump draws them (`draw`: a title strip), and without the strip."""
    torch.manual_seed(0)
    t = torch.rand(shape) * 2 - 1  # noise: the least compressible picture
    t.view(-1)[::7] = float("nan")
    img = draw(kind, t, title="model · module · a long image key.jpg · filter 12").image()
    assert img.size == image_size(kind, shape)
    assert len(png_bytes(img)) <= png_bound(kind, shape)
    if kind == "taps":
        img, _ = tap_mosaic(t)
    elif kind == "kernels":
        img = map_grid(t)
    else:
        img = render_activation(t)
    assert img.size == image_size(kind, shape, titled=False)
    assert len(png_bytes(img)) <= png_bound(kind, shape, titled=False)
    if kind == "activation" and len(shape) == 1:  # a classifier's chart fits the bound too
        chart = draw(kind, t, classes=[f"c{i}" for i in range(t.numel())], title="x").png()
        assert len(chart) <= png_bound(kind, shape)


# --- golden pictures (pytest --update-golden rewrites them) ---------------------------------------


def _ramp(*shape: int) -> torch.Tensor:
    """Deterministic values on every platform: a ramp folded into `shape`, centred on 0."""
    n = math.prod(shape)
    return (torch.arange(n, dtype=torch.float32) * 7 % n - n / 2).reshape(shape) / n


GOLDEN = {
    "map_grid": lambda: map_grid(_ramp(6, 5, 5)),
    "map_grid_relu_per_channel": lambda: map_grid(
        _ramp(4, 6, 6).clamp(min=0) * torch.arange(1.0, 5.0)[:, None, None], png_scale="channel"),
    "classifier": lambda: render_activation(_ramp(10), classes=[f"class {i}" for i in range(10)]),
    "long_vector": lambda: render_activation(_ramp(300)),
    "filters_rows": lambda: filter_grid(_ramp(4, 3 + 2, 3, 3), max_filters=3)[0],
    "filters_rgb": lambda: filter_grid(_ramp(5, 3, 3, 3))[0],
    "tap_mosaic": lambda: tap_mosaic(_ramp(4, 5, 3, 3))[0],
    "titled_map_grid": lambda: draw("activation", _ramp(6, 5, 5),
                                    title="lenet · C1 · 0_t-shirt-top.png").image(),
    "titled_kernels": lambda: draw("kernels", _ramp(6, 5, 5),
                                   title="lenet · C3 · 0_t-shirt-top.png · filter 2").image(),
    "titled_filters_rgb": lambda: filter_grid(_ramp(5, 3, 3, 3), title="alexnet · features.0")[0],
    "titled_chart": lambda: draw("activation", _ramp(1000), classes=[f"class {i}" for i in
                                 range(1000)], title="alexnet · classifier.6 · cat.jpg").image(),
    "projection_rgb": lambda: _projection(3, (2, 3, 10, 11)),
    "projection_grey_whole": lambda: _projection(1, (-5, -5, 21, 21), "class 'Sneaker'"),
    "topk_figure": lambda: _topk_pictures()[0],
    "topk_overview": lambda: _topk_pictures()[1],
    "occlusion": lambda: _occlusion_picture(),
    "explain": lambda: _explain_picture(),
}


def _explain_picture() -> Image.Image:
    from convmaps.core.explain import Node, Term, Window
    from convmaps.render import explain_figure

    taps = _ramp(2, 3, 3)
    sums = [float(t.sum()) for t in taps]
    terms = [Term(0, sums[0], (3, 4), "relu1"), Term(1, sums[1], (2, 3), "relu1")]
    windows = [Window(c, [2, 3, 4], [3, 4, 5], taps[c].tolist()) for c in (0, 1)]
    child = Node("relu1", 0, (3, 4), sums[0], 0.0, [Term(0, sums[0], (3, 4), "conv1")], "ReLU")
    root = Node("conv2", 4, (1, 2), 0.1 + sum(sums), 0.1, terms, "Conv2d", [child], windows)
    image = ((_ramp(3, 12, 12) + 0.5) * 255).to(torch.uint8)
    return explain_figure(root, image, (2, 3, 8, 9), title="lenet · unit conv2:4 · x.png")


def _occlusion_picture() -> Image.Image:
    from convmaps.render import occlusion_figure

    image = ((_ramp(3, 28, 28) + 0.5) * 255).to(torch.uint8)
    top = (torch.arange(36) * 5 % 11).reshape(6, 6)  # 11 classes: 9 coloured, 2 "other"
    return occlusion_figure(image, _ramp(6, 6) + 0.5, top, _ramp(6, 6) * 3, ["T-shirt/top"] * 3,
                            8, 4, title="lenet · x.png · target Sandal (5), p = 0.9 unoccluded")


def _topk_pictures() -> tuple[Image.Image, Image.Image]:
    from convmaps.render import topk_figure, topk_overview

    patches = ((_ramp(4, 3, 5, 5) + 0.5) * 255).to(torch.uint8)
    return (topk_figure(patches, _ramp(4, 1, 5, 5), [4.0, 3.0, 2.0, 1.0], title="lenet · C3:10"),
            topk_overview(patches, title="lenet · C3"))


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_picture(name: str, golden) -> None:
    golden(f"render_{name}", png_bytes(GOLDEN[name]()))


@pytest.mark.parametrize(("kind", "t", "public"), [
    ("activation", _ramp(6, 5, 5), lambda t: (render_activation(t, title=TITLE), None)),
    ("activation", _ramp(300), lambda t: (render_activation(t, title=TITLE), None)),
    ("activation", torch.empty(0, 4, 4), lambda t: (render_activation(t, title=TITLE), None)),
    ("kernels", _ramp(3, 7, 7), lambda t: (map_grid(t, title=TITLE), None)),
    ("taps", _ramp(4, 5, 3, 3), lambda t: tap_mosaic(t, title=TITLE)),
    ("taps", _ramp(200, 3, 3, 3), lambda t: tap_mosaic(t, title=TITLE)),  # capped: a note
])
def test_drawn_picture_is_the_png_of_the_public_image(kind, t, public):
    """The dump encodes `draw(...)` straight from its rows; the bytes must be those of the
    public function's image through `png_bytes`, note and title included (a kernel-map
    grid is a `map_grid` whose title strip says "kernel maps")."""
    pic = draw(kind, t, title=TITLE)
    img, note = public(t)
    assert pic.note == note
    if kind == "kernels":
        assert np.array_equal(np.asarray(pic.image())[TITLE_H:], np.asarray(img)[TITLE_H:])
        assert shows_text(pic.image(), f"{t.shape[0]} kernel maps, one per input channel", 4,
                          2 + LINE)
    else:
        assert pic.png() == png_bytes(img, note=note)
    assert pic.image().size == img.size == image_size(kind, tuple(t.shape))
    if note:
        assert Image.open(io.BytesIO(pic.png())).info["convmaps-note"] == note


@pytest.mark.parametrize("size", [(1, 1), (7, 3), (454, 580)])
def test_palette_pngs_read_back_exactly(size):
    """convmaps writes palette PNGs itself (ISA-L deflate): Pillow, an independent decoder,
    reads back the same pixels, palette and text, and the bytes are deterministic."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 200, size[::-1], dtype=np.uint8), "L").convert("P")
    img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    img.info["convmaps-range"] = "-1,1"
    data = png_bytes(img, note="crème brûlée 世界")
    back = Image.open(io.BytesIO(data))
    back.load()
    assert back.mode == "P" and back.size == size
    assert np.array_equal(np.asarray(back), np.asarray(img))
    assert back.getpalette() == img.getpalette()
    assert back.info["convmaps-range"] == "-1,1"
    assert back.info["convmaps-note"] == "crème brûlée 世界"
    assert png_bytes(img, note="crème brûlée 世界") == data


def test_grid_geometry_finds_each_channels_tile():
    from convmaps.render import grid_geometry

    maps = torch.zeros(6, 7, 9)
    for c in range(6):
        maps[c] = c  # each tile one value: its channel number
    img = np.asarray(draw("activation", maps, title="a dump's picture").image().convert("RGB"))
    g = grid_geometry((6, 7, 9))
    assert g is not None and (g["width"], g["height"]) == (img.shape[1], img.shape[0])
    colours = []
    for c in range(6):
        x = g["left"] + (c % g["cols"]) * g["px"] + g["w"] // 2
        y = g["top"] + (c // g["cols"]) * g["py"] + g["band"] + g["h"] // 2
        colours.append(tuple(img[y, x]))
    assert len(set(colours)) == 6  # six channels, six different colours at the tile centres
    assert grid_geometry((10,)) is None


def test_topk_figure_rows_are_the_patches_and_their_projections():
    from convmaps.render import topk_figure, topk_overview

    patches = torch.randint(0, 256, (3, 3, 4, 5), dtype=torch.uint8)
    proj = torch.zeros(3, 1, 4, 5)
    proj[1, 0, 2, 3] = -2.0
    proj[2, 0, 0, 0] = 1.0
    img = topk_figure(patches, proj, [3.5, 2.0, -1.0])
    f = 13  # ceil(64 / 5): patches are upscaled to about 64 px
    arr = torch.tensor(list(img.getdata()), dtype=torch.uint8).view(img.height, img.width, 3)
    arr = arr.permute(2, 0, 1)
    col = 5 * f + 2
    for i in range(3):  # top row: each patch, upscaled by nearest neighbour, in order
        tile = arr[:, :4 * f, i * col:i * col + 5 * f]
        assert torch.equal(tile[:, ::f, ::f], patches[i])
    below = arr[:, 4 * f + 2:8 * f + 2]  # one input channel: the diverging colour map
    assert tuple(below[:, 0, 0].tolist()) == NEUTRAL  # zero
    assert tuple(below[:, 2 * f, col + 3 * f].tolist()) == lut_end(Scale.DIVERGING, 0.0)
    assert tuple(below[:, 0, 2 * col].tolist()) == lut_end(Scale.DIVERGING, 0.75)
    assert img.info["convmaps-range"] == "-2,2"
    assert img.height == 8 * f + 4 + 14 + 32  # two rows, their values, the scale bar
    # tiles of round(64 / 5) = 13 times 4 x 5, each under a 12 px band for its number
    assert topk_overview(patches).size == (2 * 5 * 13 + 2, 2 * (12 + 4 * 13) + 2)


# --- titles, projections, top-k figures ----------------------------------------------------------


def _ink_rows(img: Image.Image, top: int, bottom: int) -> int:
    """How many rows between `top` and `bottom` have black pixels."""
    return int((rgb(img)[top:bottom] == 0).all(-1).any(-1).sum())


@pytest.mark.parametrize(("name", "make"), [
    ("map_grid", lambda title: map_grid(_ramp(6, 5, 5), title=title)),
    ("vector", lambda title: vector_grid(_ramp(300), title=title)),
    ("chart", lambda title: render_activation(_ramp(10), classes=list("abcdefghij"),
                                              title=title)),
    ("filters_rgb", lambda title: filter_grid(_ramp(5, 3, 3, 3), title=title)[0]),
    ("filters_rows", lambda title: filter_grid(_ramp(4, 5, 3, 3), title=title)[0]),
    ("taps", lambda title: tap_mosaic(_ramp(4, 5, 3, 3), title=title)[0]),
])
def test_a_title_strip_says_where_from_and_what_a_tile_is(name, make) -> None:
    """A titled picture is the untitled one under a strip that holds the title and what the
    tiles are; without the strip the picture is unchanged."""
    plain, titled = make(None), make(TITLE)
    assert titled.size == (plain.width, plain.height + TITLE_H)
    assert np.array_equal(rgb(titled)[TITLE_H:], rgb(plain))
    assert shows_text(titled, TITLE, 4, 2)
    assert _ink_rows(titled, 2 + LINE, TITLE_H) >= 5  # the second line: what a tile is
    assert (rgb(plain)[:2] == 255).all()  # no strip: nothing above the picture
    assert {k: v for k, v in titled.info.items() if k.startswith("convmaps-")} == \
        {k: v for k, v in plain.info.items() if k.startswith("convmaps-")}


def test_a_long_title_is_cut_to_the_picture() -> None:
    img = map_grid(_ramp(1, 5, 5), title="x" * 100)  # 200 px: 32 characters
    assert shows_text(img, "x" * 29 + "...", 4, 2)
    assert shows_text(img, "one 5x5 feature map", 4, 2 + LINE)


def test_signed_pictures_colour_rgb_around_grey_and_one_channel_like_other_maps() -> None:
    from convmaps.render import signed_picture

    p = torch.zeros(3, 1, 3)
    p[0, 0, 0], p[1, 0, 1], p[2, 0, 2] = 2.0, -2.0, 1.0
    pic, lim = signed_picture(p)
    assert lim == 2.0
    assert pic[:, 0, 0].tolist() == [255, 128, 128]  # each channel 128 + 127 p / limit
    assert pic[:, 0, 1].tolist() == [128, 1, 128]
    assert pic[:, 0, 2].tolist() == [128, 128, 192]
    one, lim = signed_picture(torch.tensor([[[-4.0, 0.0, 4.0]]]))
    assert lim == 4.0
    assert [tuple(one[:, 0, i].tolist()) for i in range(3)] == [
        lut_end(Scale.DIVERGING, 0.0), NEUTRAL, lut_end(Scale.DIVERGING, 1.0)]


def _projection(channels: int, box: tuple[int, int, int, int], caption: str = "at y,x 3,4"):
    from convmaps.render import projection_figure

    image = (torch.arange(3 * 16 * 16) % 251).to(torch.uint8).view(3, 16, 16)
    proj = _ramp(channels, 16, 16)
    return projection_figure(image, proj, box, "lenet · C3:5 · shoe.png", caption)


@pytest.mark.parametrize("channels", [1, 3])
def test_projection_panels_are_labelled_and_captioned(channels: int) -> None:
    img = _projection(channels, (2, 3, 10, 11))
    panel = 16 * 14  # upscaled to >= 224 px
    assert shows_text(img, "lenet · C3:5 · shoe.png", 4, 2)
    for i, label in enumerate(["input with box", "projection"]):
        assert shows_text(img, label, 4 + i * (panel + 8), TITLE_H)
    crop_x = 4 + 2 * (panel + 8)
    assert shows_text(img, "input, cropped", crop_x, TITLE_H)
    assert shows_text(img, "projection, cropped", crop_x + 8 * 28 + 8, TITLE_H)
    assert shows_text(img, "at y,x 3,4", 4, img.height - LINE - 2)
    # the scale: -limit and +limit under the bar's ends
    lim = float(_ramp(channels, 16, 16).sum(0).abs().max()) if channels == 1 else 0.5
    bar_y = TITLE_H + LINE + 2 + panel + 6
    assert shows_text(img, f"{-lim:.3g}", 4, bar_y + 12)
    bar_end = rgb(img)[bar_y + 5, 4:4 + 256]
    if channels == 3:  # each channel around mid grey: the bar runs black, grey, white
        assert tuple(bar_end[0]) == (1, 1, 1) and tuple(bar_end[-1]) == (255, 255, 255)
        assert shows_text(img, "R, G, B each", 4 + 256 + 8, bar_y)
    else:  # one channel: the diverging colour map of every signed picture
        assert tuple(bar_end[0]) == lut_end(Scale.DIVERGING, 0.0)
        assert tuple(bar_end[-1]) == lut_end(Scale.DIVERGING, 1.0)


def test_a_unit_that_sees_the_whole_input_has_two_panels_not_four() -> None:
    whole = _projection(3, (-5, -5, 21, 21))
    part = _projection(3, (2, 3, 10, 11))
    panel = 16 * 14
    assert whole.width == 2 * panel + 8 + 8 < part.width
    assert not shows_text(whole, "input, cropped", 4 + 2 * (panel + 8), TITLE_H)


def test_topk_figure_and_overview_titles() -> None:
    from convmaps.render import topk_figure, topk_overview

    patches = torch.randint(0, 256, (9, 3, 5, 5), dtype=torch.uint8)
    plain = topk_figure(patches, torch.randn(9, 1, 5, 5), [1.0] * 9)
    titled = topk_figure(patches, torch.randn(9, 1, 5, 5), [1.0] * 9, title="lenet · C3:10")
    assert titled.height == plain.height + TITLE_H
    assert shows_text(titled, "lenet · C3:10", 4, 2)
    assert shows_text(titled, "its top 9 images: the patches it sees", 4, 2 + LINE)
    over = topk_overview(patches, title="lenet · C3")
    assert shows_text(over, "lenet · C3", 4, 2)
    assert shows_text(over, "9 channels, a tile each", 4, 2 + LINE)


def test_topk_overview_tiles_are_readable_and_numbered() -> None:
    from convmaps.render import topk_overview

    tiles = torch.randint(0, 256, (16, 3, 14, 14), dtype=torch.uint8)
    img = topk_overview(tiles)
    f = 5  # round(64 / 14): tiles of 70 px, at least 48
    pitch_x, pitch_y = 14 * f + 2, LINE + 14 * f + 2
    arr = torch.from_numpy(rgb(img).copy()).permute(2, 0, 1)
    for c in (0, 5, 15):
        r, col = divmod(c, 4)
        assert shows_text(img, str(c), col * pitch_x, r * pitch_y)
        tile = arr[:, r * pitch_y + LINE : r * pitch_y + LINE + 14 * f,
                   col * pitch_x : col * pitch_x + 14 * f]
        assert torch.equal(tile[:, ::f, ::f], tiles[c])
    assert img.size == (4 * pitch_x - 2, 4 * pitch_y - 2)
