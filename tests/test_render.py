"""Tests for convmaps.render: sizes, colours, robust ranges, caps and PNG encoding."""

from __future__ import annotations

import io
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from convmaps.render import (
    Scale,
    barcode,
    choose_scale,
    colorize,
    filter_grid,
    map_grid,
    png_bytes,
    render_activation,
    robust_limit,
    tap_mosaic,
    upscale_factor,
)

NEUTRAL = (221, 221, 221)  # coolwarm's middle


def grid_side(n_tiles: int, tile_px: int, gutter: int = 1) -> int:
    return n_tiles * tile_px + (n_tiles - 1) * gutter


def pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    r, g, b = img.getpixel(xy)  # type: ignore[misc]
    return r, g, b


# --- sizes and modes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "cols", "rows"),
    [((6, 28, 28), 3, 2), ((16, 5, 5), 4, 4), ((1, 1, 1), 1, 1), ((10, 6, 6), 4, 3)],
)
def test_map_grid_size(shape: tuple[int, int, int], cols: int, rows: int) -> None:
    c, h, w = shape
    f = upscale_factor(h, w)
    img = map_grid(torch.randn(shape))
    assert img.mode == "RGB"
    assert img.size == (grid_side(cols, w * f), grid_side(rows, h * f))


def test_upscale_factor() -> None:
    assert upscale_factor(5, 5) == 7  # LeNet's 5x5 maps become 35 px
    assert upscale_factor(6, 6) == 6  # AlexNet's 6x6 maps become 36 px
    assert upscale_factor(32, 32) == 1
    assert upscale_factor(55, 55) == 1
    assert upscale_factor(1, 1) == 16  # capped
    assert upscale_factor(0, 0) == 1


def test_map_grid_upscales_with_nearest_neighbour() -> None:
    maps = torch.tensor([[[-1.0, 1.0]]])  # one 1x2 tile, factor 16
    img = map_grid(maps)
    assert img.size == (32, 16)
    left = {pixel(img, (x, y)) for x in range(16) for y in range(16)}
    right = {pixel(img, (x, y)) for x in range(16, 32) for y in range(16)}
    assert len(left) == 1 and len(right) == 1 and left != right


def test_map_grid_max_tiles_draws_first_channels() -> None:
    img = map_grid(torch.randn(100, 8, 8), max_tiles=9)
    assert img.size == (grid_side(3, 32), grid_side(3, 32))


def test_map_grid_uses_one_range_for_all_tiles() -> None:
    maps = torch.stack([torch.full((4, 4), 1.0), torch.full((4, 4), 4.0)])
    img = map_grid(maps, Scale.SEQUENTIAL)
    # A per-tile range would draw both constant tiles in the same colour.
    assert pixel(img, (0, 0)) != pixel(img, (img.width - 1, 0))


# --- colours -------------------------------------------------------------------------------


def test_diverging_zero_is_neutral_and_signs_differ() -> None:
    maps = torch.tensor([[[-2.0, 0.0, 2.0]]])
    img = map_grid(maps)
    f = upscale_factor(1, 3)
    neg, zero, pos = (pixel(img, (i * f, 0)) for i in range(3))
    assert zero == NEUTRAL
    assert neg[2] > neg[0]  # blue
    assert pos[0] > pos[2]  # red


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


def test_colorize_keeps_leading_dims() -> None:
    assert colorize(torch.rand(2, 4, 5, 6), Scale.SEQUENTIAL).shape == (2, 4, 3, 5, 6)


def test_sequential_zero_is_darkest() -> None:
    maps = torch.tensor([[[0.0, 1.0, 2.0]]])
    assert choose_scale(maps) is Scale.SEQUENTIAL
    img = map_grid(maps)
    darkest = tuple(colorize(torch.zeros(1, 1), Scale.SEQUENTIAL).flatten().tolist())
    assert pixel(img, (0, 0)) == darkest
    assert sum(pixel(img, (0, 0))) < sum(pixel(img, (img.width - 1, 0)))


def test_choose_scale() -> None:
    assert choose_scale(torch.rand(3, 3)) is Scale.SEQUENTIAL
    assert choose_scale(torch.tensor([0.0, -0.1])) is Scale.DIVERGING
    assert choose_scale(torch.tensor([1.0, float("nan")])) is Scale.SEQUENTIAL
    assert choose_scale(torch.tensor([1.0, float("-inf")])) is Scale.DIVERGING
    assert choose_scale(torch.empty(0)) is Scale.SEQUENTIAL


# --- robust ranges -------------------------------------------------------------------------


def test_one_outlier_does_not_wash_out_the_rest() -> None:
    torch.manual_seed(0)
    t = torch.randn(1000)
    t[17] = 1e6
    lo, hi = robust_limit(t, Scale.DIVERGING)
    assert lo == -hi and 2 < hi < 5
    # The typical values still spread over many colours of the grid.
    img = map_grid(t.reshape(1, 40, 25))
    colours = img.getcolors(maxcolors=256)
    assert colours is not None and len(colours) > 100


def test_one_outlier_sequential() -> None:
    torch.manual_seed(0)
    t = torch.rand(1000)
    t[3] = 1e6
    lo, hi = robust_limit(t, Scale.SEQUENTIAL)
    assert lo == 0 and 0.9 < hi < 2


def test_sparse_map_is_not_saturated() -> None:
    # 95% zeros (ReLU): the spread of the few active values sets the range.
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
    ],
)
@pytest.mark.parametrize("scale", list(Scale))
def test_robust_limit_degenerate(t: torch.Tensor, scale: Scale) -> None:
    lo, hi = robust_limit(t, scale)
    assert math.isfinite(lo) and math.isfinite(hi) and lo < hi
    assert lo == (-hi if scale is Scale.DIVERGING else 0.0)


def test_constant_maps_to_top_of_scale() -> None:
    assert robust_limit(torch.full((5, 5), 3.0), Scale.SEQUENTIAL) == pytest.approx((0, 3))
    assert robust_limit(torch.full((5, 5), -2.0), Scale.DIVERGING) == pytest.approx((-2, 2))


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
def test_map_grid_survives_odd_values(t: torch.Tensor) -> None:
    img = map_grid(t)
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


def test_nan_and_inf_colours() -> None:
    t = torch.tensor([[[float("nan"), float("inf"), float("-inf"), -1.0, 1.0]]])
    img = map_grid(t)
    f = upscale_factor(1, 5)
    nan, pinf, ninf, neg, pos = (pixel(img, (i * f, 0)) for i in range(5))
    assert nan == (0, 0, 0)
    assert pinf == pos and ninf == neg  # infinities are clipped to the ends


def test_half_precision_input() -> None:
    img = map_grid(torch.randn(4, 8, 8, dtype=torch.bfloat16))
    assert img.size == (grid_side(2, 32), grid_side(2, 32))


# --- barcode and dispatch ------------------------------------------------------------------


@pytest.mark.parametrize(("n", "width"), [(10, 260), (256, 256), (100, 300), (4096, 4096)])
def test_barcode_size(n: int, width: int) -> None:
    img = barcode(torch.randn(n))
    assert img.size == (width, 24) and img.mode == "RGB"


def test_barcode_height_and_columns() -> None:
    img = barcode(torch.tensor([-1.0, 0.0, 1.0]), height=5)
    assert img.size == (258, 5)
    assert pixel(img, (86, 4)) == NEUTRAL
    assert pixel(img, (0, 0)) != pixel(img, (257, 0))


def test_barcode_empty() -> None:
    assert barcode(torch.empty(0)).mode == "RGB"


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((4, 6, 6), (grid_side(2, 36), grid_side(2, 36))),  # map grid
        ((6, 6), (36, 36)),  # one tile
        ((10,), (260, 24)),  # barcode
        ((2, 2, 2, 4), (256, 24)),  # flattened to 32 values, 8 px each
        ((), (256, 24)),  # a scalar: one column
    ],
)
def test_render_activation_dispatch(shape: tuple[int, ...], size: tuple[int, int]) -> None:
    assert render_activation(torch.randn(shape)).size == size


def test_render_activation_picks_scale() -> None:
    assert render_activation(torch.rand(3, 4, 4)).info["convmaps-scale"] == "sequential"
    assert render_activation(torch.randn(3, 4, 4) - 1).info["convmaps-scale"] == "diverging"


# --- filters -------------------------------------------------------------------------------


def test_filter_grid_rgb_tiles() -> None:
    weight = torch.randn(10, 3, 11, 11)
    img, note = filter_grid(weight)
    tile = 11 * upscale_factor(11, 11)
    assert note is None
    assert img.size == (grid_side(4, tile), grid_side(3, tile))  # 10 tiles, 4 x 3


def test_filter_grid_rgb_channels_and_zero() -> None:
    weight = torch.zeros(2, 3, 3, 3)
    weight[0, 0] = 1.0  # filter 0: red kernel positive
    img, _ = filter_grid(weight)
    assert pixel(img, (0, 0)) == (255, 128, 128)
    assert pixel(img, (img.width - 1, 0)) == (128, 128, 128)  # zero weights: mid grey


def test_filter_grid_rows_per_filter() -> None:
    weight = torch.randn(16, 6, 5, 5)
    img, note = filter_grid(weight)
    tile = 5 * upscale_factor(5, 5)
    assert note is None
    assert img.size == (grid_side(6, tile), grid_side(16, tile))


def test_filter_grid_row_holds_one_filter() -> None:
    weight = torch.zeros(2, 4, 1, 1)
    weight[1] = 1.0  # the second filter, every kernel
    img, _ = filter_grid(weight)
    top = {pixel(img, (x, 0)) for x in range(0, img.width, 17)}
    bottom = {pixel(img, (x, img.height - 1)) for x in range(0, img.width, 17)}
    assert top == {NEUTRAL} and len(bottom) == 1 and bottom != top


def test_filter_grid_cap_kernels() -> None:
    img, note = filter_grid(torch.randn(20, 12, 3, 3), max_filters=8, max_kernels=5)
    tile = 3 * upscale_factor(3, 3)
    assert img.size == (grid_side(5, tile), grid_side(8, tile))
    assert note == "drew 8 of 20 filters x 5 of 12 kernels (cap: --png-cap)"


def test_filter_grid_cap_rgb() -> None:
    img, note = filter_grid(torch.randn(96, 3, 11, 11), max_filters=64)
    tile = 11 * upscale_factor(11, 11)
    assert img.size == (grid_side(8, tile), grid_side(8, tile))
    assert note == "drew 64 of 96 filters (cap: --png-cap)"


def test_filter_grid_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError, match="C_out"):
        filter_grid(torch.randn(3, 5, 5))


# --- tap mosaics ---------------------------------------------------------------------------


def test_tap_mosaic_size() -> None:
    img, note = tap_mosaic(torch.randn(7, 9, 3, 3))
    assert note is None
    assert img.size == (9 * 3 + 8, 7 * 3 + 6)


def test_tap_mosaic_places_window_patches() -> None:
    taps = torch.zeros(2, 3, 2, 2)
    taps[1, 2, 0, 1] = 1.0  # window (1, 2), patch pixel (0, 1)
    img, _ = tap_mosaic(taps)
    red_end = tuple(colorize(torch.ones(1, 1), Scale.DIVERGING).flatten().tolist())
    assert pixel(img, (2 * 3 + 1, 1 * 3 + 0)) == red_end
    assert pixel(img, (0, 0)) == NEUTRAL


def test_tap_mosaic_1x1_has_no_gutter() -> None:
    img, _ = tap_mosaic(torch.randn(5, 6, 1, 1))
    assert img.size == (6, 5)


def test_tap_mosaic_crop() -> None:
    img, note = tap_mosaic(torch.randn(30, 20, 3, 3), max_side=40)
    assert img.size == (10 * 4 - 1, 10 * 4 - 1)
    assert note == "drew the top-left 10x10 of 30x20 windows (cap: 40 px)"


# --- PNG -----------------------------------------------------------------------------------


def test_png_bytes_round_trip_with_text() -> None:
    img = map_grid(torch.randn(4, 5, 5))
    data = png_bytes(img, note="drew 4 of 9 filters")
    back = Image.open(io.BytesIO(data))
    assert back.mode == "P" and back.size == img.size  # stored as a palette image
    assert back.convert("RGB").tobytes() == img.tobytes()
    text = back.info  # Pillow reads tEXt chunks into info
    assert text["convmaps-note"] == "drew 4 of 9 filters"
    assert text["convmaps-scale"] == "diverging"
    lo, hi = (float(v) for v in text["convmaps-range"].split(","))
    assert lo == -hi and hi > 0


def test_png_bytes_deterministic() -> None:
    t = torch.randn(8, 6, 6)
    assert png_bytes(map_grid(t), note="x") == png_bytes(map_grid(t.clone()), note="x")


def test_png_bytes_without_note() -> None:
    back = Image.open(io.BytesIO(png_bytes(barcode(torch.rand(5)))))
    assert "convmaps-note" not in back.info
    assert back.info["convmaps-range"].startswith("0,")


def test_png_bytes_compress_level_changes_size_not_pixels() -> None:
    img = map_grid(torch.randn(16, 12, 12))
    raw, packed = png_bytes(img, compress_level=0), png_bytes(img, compress_level=9)
    assert len(packed) < len(raw)
    assert Image.open(io.BytesIO(raw)).tobytes() == Image.open(io.BytesIO(packed)).tobytes()


def test_png_bytes_keeps_every_pixel_whatever_the_mode():
    import io

    from PIL import Image as PILImage

    from convmaps.render import map_grid, png_bytes

    torch.manual_seed(0)
    for img in (map_grid(torch.randn(64, 13, 13)),
                PILImage.fromarray(torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8).numpy())):
        back = PILImage.open(io.BytesIO(png_bytes(img)))
        assert back.convert("RGB").tobytes() == img.tobytes()
    grid = PILImage.open(io.BytesIO(png_bytes(map_grid(torch.randn(64, 13, 13)))))
    assert grid.mode == "P"  # a colour-mapped grid is stored as a palette image


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
    ("kernels", (6, 10, 10)), ("taps", (10, 10, 5, 5)), ("taps", (27, 27, 1, 1)),
    ("taps", (300, 300, 5, 5)),
])
def test_png_bound_is_the_drawn_size_and_an_upper_bound(kind, shape):
    from convmaps.render import image_size, png_bound

    torch.manual_seed(0)
    t = torch.randn(shape)
    t.view(-1)[::7] = float("nan")  # more than 256 colours: the PNG stays RGB
    if kind == "taps":
        img, _ = tap_mosaic(t)
    elif kind == "kernels":
        img = map_grid(t)
    else:
        img = render_activation(t)
    assert img.size == image_size(kind, shape)
    assert len(png_bytes(img)) <= png_bound(kind, shape)
