"""Kernel maps and tap maps: checked against the real module and recomputed independently."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convmaps.core import decompose
from convmaps.core.decompose import (
    kernel_map_chunks,
    kernel_maps,
    tap_map_chunks,
    tap_maps,
)
from convmaps.jobs.runtime import threads

from .reference import forum_kernel_maps

C_IN, C_OUT, H, W = 4, 6, 9, 8
KERNELS = [3, 2, (2, 3)]  # odd, even, non-square (even x odd)
STRIDES = [1, 2, (2, 1)]
PADDINGS = [0, 1, (1, 2), "same", "valid"]
MODES = ["zeros", "reflect", "replicate", "circular"]
EXTRAS = list(itertools.product([1, 2], [1, 2, C_IN], [True, False]))  # dilation, groups, bias


def _configs() -> list[tuple]:
    """Every stride x padding x mode x kernel; dilation, groups and bias cycled through."""
    configs = []
    for stride, padding, mode, kernel in itertools.product(STRIDES, PADDINGS, MODES, KERNELS):
        if padding == "same" and stride != 1:
            continue  # nn.Conv2d refuses it
        dilation, groups, bias = EXTRAS[len(configs) % len(EXTRAS)]
        configs.append((stride, padding, mode, kernel, dilation, groups, bias))
    # and every dilation x groups x bias with the trickiest paddings
    for (dilation, groups, bias), padding in itertools.product(EXTRAS, ["same", (1, 2)]):
        configs.append((1, padding, "reflect", 2, dilation, groups, bias))
    return configs


def _make(stride, padding, mode, kernel, dilation, groups, bias, dtype=torch.float64):
    torch.manual_seed(0)
    c_out = C_OUT if groups != C_IN else 2 * C_IN  # depthwise with channel multiplier 2
    conv = nn.Conv2d(C_IN, c_out, kernel, stride, padding, dilation, groups, bias, mode)
    return conv.to(dtype), torch.randn(C_IN, H, W, dtype=dtype)


def _independent_pad(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Pad as documented for nn.Conv2d, without reading the module's private padding."""
    if conv.padding == "valid":
        pads = [(0, 0), (0, 0)]
    elif conv.padding == "same":  # total d(k-1); the odd one out goes after (right/bottom)
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        pads = [(t // 2, t - t // 2) for t in totals]
    else:
        pads = [(p, p) for p in conv.padding]
    (top, bottom), (left, right) = pads
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x[None], (left, right, top, bottom), mode=mode)[0]


def _bias(conv: nn.Conv2d) -> torch.Tensor | float:
    return conv.bias.detach()[:, None, None] if conv.bias is not None else 0.0


CONFIGS = _configs()


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_maps_sum_to_the_real_conv_and_match_independent_entries(config):
    conv, x = _make(*config)
    with torch.no_grad():
        y = conv(x)
    km, tm = kernel_maps(conv, x), tap_maps(conv, x)
    c_out, cg = conv.out_channels, C_IN // conv.groups
    kh, kw = conv.kernel_size
    assert km.shape == (c_out, cg, *y.shape[-2:])
    assert tm.shape == (c_out, *y.shape[-2:], kh, kw)
    torch.testing.assert_close(km.sum(1) + _bias(conv), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(tm.sum((-2, -1)) + _bias(conv), y, rtol=0, atol=1e-12)

    xp = _independent_pad(conv, x)
    weight = conv.weight.detach()
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    co_g = c_out // conv.groups
    for o, c in [(0, 0), (c_out - 1, cg - 1), (c_out // 2, cg // 2)]:
        channel = o // co_g * cg + c
        one = F.conv2d(
            xp[None, None, channel], weight[o, c][None, None], None, conv.stride, 0, conv.dilation
        )[0, 0]
        torch.testing.assert_close(km[o, c], one, rtol=0, atol=1e-12)
    ho, wo = y.shape[-2:]
    for o, i, j, a, b in [
        (0, 0, 0, 0, 0),
        (c_out - 1, ho - 1, wo - 1, kh - 1, kw - 1),
        (1, ho // 2, wo - 1, kh - 1, 0),
    ]:
        g0 = o // co_g * cg
        window = xp[g0 : g0 + cg, i * sh + a * dh, j * sw + b * dw]
        torch.testing.assert_close(
            tm[o, i, j, a, b], (weight[o, :, a, b] * window).sum(), rtol=0, atol=1e-12
        )


@pytest.mark.parametrize("config", CONFIGS[::7], ids=[str(c) for c in CONFIGS[::7]])
def test_float32_within_tolerance(config):
    conv, x = _make(*config, dtype=torch.float32)
    with torch.no_grad():
        y = conv(x)
    km, tm = kernel_maps(conv, x), tap_maps(conv, x)
    assert km.dtype == tm.dtype == torch.float32
    torch.testing.assert_close(km.sum(1) + _bias(conv), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tm.sum((-2, -1)) + _bias(conv), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(km, kernel_maps(conv.double(), x.double()).float())


@pytest.mark.parametrize(
    ("kernel", "dilation", "split"),
    [(2, 1, (0, 1)), (4, 1, (1, 2)), (4, 2, (3, 3)), (3, 2, (2, 2))],
)
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_same_padding_splits_like_torch(kernel, dilation, split, mode):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, kernel, padding="same", dilation=dilation, padding_mode=mode).double()
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    km = kernel_maps(conv, x)
    assert km.shape[-2:] == (7, 6)
    before, after = split
    xp = F.pad(
        x[None], (before, after, before, after), mode="constant" if mode == "zeros" else mode
    )
    expected = F.conv2d(xp[:, 1:2], conv.weight.detach()[2:3, 1:2], dilation=dilation)[0, 0]
    torch.testing.assert_close(km[2, 1], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(km.sum(1) + _bias(conv), conv(x).detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c[2] == "zeros" and c[5] == 1])
def test_agrees_with_forum_recipe(config):
    conv, x = _make(*config)
    torch.testing.assert_close(kernel_maps(conv, x), forum_kernel_maps(conv, x), rtol=0, atol=1e-12)


def test_forum_recipe_only_for_plain_convs():
    x = torch.randn(4, 8, 8)
    with pytest.raises(NotImplementedError):
        forum_kernel_maps(nn.Conv2d(4, 4, 3, groups=2), x)
    with pytest.raises(NotImplementedError):
        forum_kernel_maps(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), x)


# Layers big enough for several tiles; float32, where a GEMM's rounding could change with
# the number of filters it is given.
TILED = {
    "plain": (nn.Conv2d(8, 150, 3, padding=1), 12),
    "grouped": (nn.Conv2d(16, 160, 3, stride=2, groups=2, bias=False), 13),
    "depthwise_x3": (nn.Conv2d(8, 24, 3, groups=8, padding="same", padding_mode="circular"), 10),
    "depthwise": (nn.Conv2d(70, 70, 5, groups=70), 9),
    "big_kernel": (nn.Conv2d(3, 20, 11, stride=4, padding=2), 40),  # taps > filters per tile
}


def _tiled(name: str) -> tuple[nn.Conv2d, torch.Tensor]:
    torch.manual_seed(2)
    conv, size = TILED[name]
    conv.reset_parameters()
    return conv, torch.randn(conv.in_channels, size, size)


@pytest.fixture(params=[None, 4, 1], ids=["tile64", "tile4", "tile1"])
def tile(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(decompose, "_TILE_FILTERS", request.param)
    return request.param


@pytest.mark.parametrize("name", TILED)
def test_filter_slices_are_exact_slices_of_the_whole(name, tile):
    conv, x = _tiled(name)
    km, tm = kernel_maps(conv, x), tap_maps(conv, x)
    n = conv.out_channels
    for s in [
        slice(10, 100),
        slice(None, 3),
        slice(-2, None),
        slice(63, 65),
        slice(5, 2),
        slice(n // 2 - 3, n // 2 + 3),
        slice(1, None),
    ]:
        assert torch.equal(kernel_maps(conv, x, filters=s), km[s]), s
        assert torch.equal(tap_maps(conv, x, filters=s), tm[s]), s


def test_filter_slice_must_be_contiguous():
    conv = nn.Conv2d(2, 6, 3)
    with pytest.raises(ValueError, match="step"):
        kernel_maps(conv, torch.randn(2, 5, 5), filters=slice(0, 6, 2))


@pytest.mark.parametrize("name", TILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chunks_concatenate_to_the_whole(name, dtype, tile):
    # Bit-exact on one thread: a multi-threaded GEMM splits its reduction by the operands'
    # shapes, and a chunk's channel blocks are other shapes than the whole layer's.
    with threads(1):
        _chunks_concatenate_to_the_whole(name, dtype)


def _chunks_concatenate_to_the_whole(name: str, dtype: torch.dtype) -> None:
    conv, x = _tiled(name)
    whole = {"kernel": kernel_maps(conv, x).to(dtype), "tap": tap_maps(conv, x).to(dtype)}
    chunkers = {"kernel": kernel_map_chunks, "tap": tap_map_chunks}
    for kind, chunker in chunkers.items():
        per_filter = whole[kind][0].numel() * dtype.itemsize
        for max_bytes in [1, per_filter, 3 * per_filter + 1, 40 * per_filter, 10**9]:
            chunks = list(chunker(conv, x, max_bytes, dtype))
            starts = [s.start for s, _ in chunks]
            stops = [s.stop for s, _ in chunks]
            assert starts == [0, *stops[:-1]] and stops[-1] == conv.out_channels
            for s, part in chunks:
                assert part.dtype == dtype and part.shape[0] == s.stop - s.start
                assert part.nbytes <= max(max_bytes, per_filter)
            assert torch.equal(torch.cat([p for _, p in chunks]), whole[kind]), (kind, max_bytes)


def test_kernel_chunks_split_the_columns_by_channel(monkeypatch):
    """Columns bigger than a chunk are rebuilt per chunk in channel blocks, still exact."""
    monkeypatch.setattr(decompose, "_TILE_FILTERS", 2)
    conv, x = _tiled("plain")  # columns: 8 channels x 9 taps; a chunk: 2 filters x 8 kernels
    whole = kernel_maps(conv, x)
    built: list[int] = []
    cols = decompose._Layer.cols

    def spy(self, c0, c1):
        built.append(c1 - c0)
        return cols(self, c0, c1)

    monkeypatch.setattr(decompose._Layer, "cols", spy)
    chunks = list(kernel_map_chunks(conv, x, 2 * whole[0].nbytes))
    assert len(chunks) == 75 and max(built) < conv.in_channels
    assert torch.equal(torch.cat([p for _, p in chunks]), whole)


def test_batched_input():
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    x = torch.randn(3, 4, 9, 9)
    km, tm = kernel_maps(conv, x, filters=slice(1, 5)), tap_maps(conv, x)
    assert km.shape == (3, 4, 2, 5, 5) and tm.shape == (3, 6, 5, 5, 3, 3)
    for i in range(3):
        torch.testing.assert_close(km[i], kernel_maps(conv, x[i], filters=slice(1, 5)))
        torch.testing.assert_close(tm[i], tap_maps(conv, x[i]))
    torch.testing.assert_close(forum_kernel_maps(nn.Conv2d(4, 6, 3), x).shape[:3], (3, 6, 4))
    with pytest.raises(ValueError, match="one image"):
        next(kernel_map_chunks(conv, x, 10**6))


def test_no_autograd_and_half_inputs_computed_in_float32():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(3, 6, 6, requires_grad=True)
    assert not kernel_maps(conv, x).requires_grad and not tap_maps(conv, x).requires_grad
    half = kernel_maps(conv.half(), x.detach().half())
    assert half.dtype == torch.float32


BYTES_CASES = [
    (nn.Conv2d(3, 64, 11, stride=4, padding=2), (3, 224, 224)),  # AlexNet features.0
    (nn.Conv2d(64, 192, 5, padding=2), (64, 27, 27)),  # AlexNet features.3
    (nn.Conv2d(192, 384, 3, padding=1), (192, 13, 13)),  # AlexNet features.6
    (nn.Conv2d(3, 8, (4, 3), stride=(3, 2), padding=(2, 0), dilation=(1, 3)), (3, 31, 29)),
    (nn.Conv2d(4, 8, 4, padding="same", dilation=3, padding_mode="reflect"), (4, 15, 14)),
    (nn.Conv2d(4, 4, 5, padding="valid", groups=4), (4, 5, 9)),
    (nn.Conv2d(6, 9, 2, stride=3, padding=(0, 1), groups=3, padding_mode="circular"), (6, 8, 8)),
]


def _output_hw(conv, shape):
    with torch.no_grad():
        return conv(torch.zeros(1, *shape)).shape[-2:]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("size", [(9, 8), (16, 11)])
def test_map_sizes_follow_the_real_conv_output(config, size):
    conv, _ = _make(*config, dtype=torch.float32)
    x = torch.randn(5, C_IN, *size)
    ho, wo = _output_hw(conv, x.shape[1:])  # from the module itself, not from a formula
    cg, (kh, kw) = C_IN // conv.groups, conv.kernel_size
    assert kernel_maps(conv, x).shape == (5, conv.out_channels, cg, ho, wo)
    assert tap_maps(conv, x[0]).shape == (conv.out_channels, ho, wo, kh, kw)


@pytest.mark.parametrize(("conv", "shape"), BYTES_CASES)
def test_maps_of_real_layer_shapes_have_the_expected_bytes(conv, shape):
    torch.manual_seed(4)
    x = torch.randn(shape)
    ho, wo = _output_hw(conv, shape)
    cg, (kh, kw) = shape[0] // conv.groups, conv.kernel_size
    km_bytes = conv.out_channels * cg * ho * wo
    tm_bytes = conv.out_channels * ho * wo * kh * kw
    km = kernel_maps(conv, x)
    assert km.numel() * km.element_size() == km_bytes * 4
    chunks = kernel_map_chunks(conv, x, 2 * 2**20, torch.bfloat16)
    assert sum(p.nbytes for _, p in chunks) == km_bytes * 2
    if tm_bytes * 4 < 50 * 2**20:
        tm = tap_maps(conv, x)
        assert tm.numel() * tm.element_size() == tm_bytes * 4
    else:  # AlexNet's first layer: stream the taps rather than hold 94 MB
        chunks = tap_map_chunks(conv, x, 16 * 2**20, torch.float16)
        assert sum(p.nbytes for _, p in chunks) == tm_bytes * 2


def test_errors_say_what_is_wrong():
    conv = nn.Conv2d(3, 4, 5)
    with pytest.raises(ValueError, match="3 input channels"):
        kernel_maps(conv, torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        tap_maps(conv, torch.randn(3, 4, 8))
    with pytest.raises(TypeError, match="Conv2d"):
        kernel_maps(nn.Conv1d(3, 4, 5), torch.randn(3, 8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_bytes"):
        kernel_map_chunks(conv, torch.randn(3, 8, 8), 0)
    with pytest.raises(ValueError, match="floating"):
        tap_map_chunks(conv, torch.randn(3, 8, 8), 100, torch.int32)


def test_decompose_leaves_the_conv_as_found():
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).train()
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    x = torch.randn(4, 7, 7)
    kernel_maps(conv, x), tap_maps(conv, x)
    list(kernel_map_chunks(conv, x, 500)), list(tap_map_chunks(conv, x, 500))
    assert conv.training and conv.weight.requires_grad and conv.weight.grad is None
    assert torch.equal(conv.weight, weight) and torch.equal(conv.bias, bias)
