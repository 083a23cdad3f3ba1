"""Decompose: a conv layer's output taken apart into kernel maps and tap maps, exactly.

For a `nn.Conv2d` and one image `x` of shape `(C_in, H, W)`:

- **kernel maps** `(C_out, C_in/groups, H_out, W_out)`: each kernel applied to its own
  input channel, before the sum over input channels; `km.sum(1) + bias[:, None, None]`
  is the conv's output.
- **tap maps** `(C_out, H_out, W_out, kh, kw)`: for each filter and window position, the
  products at each kernel tap summed over input channels only; `tm.sum((-2, -1)) + bias`
  is the conv's output.

The bias is never inside the maps: it belongs to the filter, not to any one kernel or tap.
Padding (`'same'` included, asymmetric for even kernels) and padding modes are applied
exactly as `nn.Conv2d._conv_forward` does, from the module's own
`_reversed_padding_repeated_twice`.

Every function also accepts a batch `(N, C_in, H, W)` and then returns a leading `N`
axis, except the `*_chunks` generators, which stream one image.

Exactness of chunks: a BLAS GEMM may round differently when only the number of rows
(filters) or the alignment of its operands changes, so all maps are computed in fixed
*tiles* of filters whose boundaries depend on the layer alone, each GEMM operand at a
fixed alignment. A chunk or a `filters=` slice is a union of (trimmed) tiles, so for one
image concatenated chunks are bit-for-bit the unchunked result.

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> conv = nn.Conv2d(3, 8, 3, padding=1)
    >>> x = torch.randn(3, 16, 16)
    >>> km = kernel_maps(conv, x)
    >>> km.shape
    torch.Size([8, 3, 16, 16])
    >>> torch.allclose(km.sum(1) + conv.bias[:, None, None], conv(x), atol=1e-5)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "kernel_map_chunks",
    "kernel_maps",
    "tap_map_chunks",
    "tap_maps",
    "window_products",
    "window_taps",
]

# A tile is at most this many filters and this many bytes of maps in the compute dtype.
# 64 filters keep the per-tile GEMMs big enough that BLAS runs near full speed (measured on
# AlexNet: 64-filter tiles cost ~1.5x one whole-layer GEMM, 8-filter tiles ~5x); the byte
# cap keeps a tile, and so the smallest unit of work, bounded for huge feature maps.
_TILE_FILTERS = 64
_TILE_BYTES = 64 * 2**20
# BLAS may pick a different code path, and round differently, for a different alignment of
# its operands. Every GEMM operand is therefore placed at the address, modulo this, that
# it would have inside one whole-layer buffer (CPU and CUDA allocators align to >= 64).
_ALIGN = 64


def _aligned_empty(
    shape: tuple[int, ...], offset: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """An empty tensor whose address is that of element `offset` of an aligned buffer."""
    numel = math.prod(shape)
    flat = torch.empty(numel + _ALIGN // dtype.itemsize, dtype=dtype, device=device)
    shift = (offset * dtype.itemsize - flat.data_ptr()) % _ALIGN // dtype.itemsize
    return flat[shift : shift + numel].view(shape)


@dataclass(frozen=True)
class _Geometry:
    """What a Conv2d does to shapes, read from the module itself."""

    c_in: int
    c_out: int
    groups: int
    kh: int
    kw: int
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad: tuple[int, int, int, int]  # F.pad order: left, right, top, bottom
    padding_mode: str

    @property
    def cg(self) -> int:
        """Input channels per group (= kernels per filter)."""
        return self.c_in // self.groups

    @property
    def co_g(self) -> int:
        """Filters per group."""
        return self.c_out // self.groups

    @property
    def taps(self) -> int:
        return self.kh * self.kw

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        """H_out, W_out = floor((H + pads - d(k-1) - 1) / s) + 1, pads as the conv pads."""
        left, right, top, bottom = self.pad
        ho = (h + top + bottom - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1
        wo = (w + left + right - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1
        if ho < 1 or wo < 1:
            raise ValueError(
                f"input {h}x{w} is too small for a {self.kh}x{self.kw} kernel with "
                f"dilation {self.dilation} and padding {self.pad} (output {ho}x{wo})"
            )
        return ho, wo


def _geometry(conv: nn.Conv2d) -> _Geometry:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    # The exact padding nn.Conv2d applies, 'same' included: for an even kernel 'same' pads
    # one more on the right/bottom, and torch records that split here.
    left, right, top, bottom = (int(p) for p in conv._reversed_padding_repeated_twice)
    kh, kw = conv.kernel_size
    return _Geometry(
        c_in=conv.in_channels,
        c_out=conv.out_channels,
        groups=conv.groups,
        kh=kh,
        kw=kw,
        stride=(conv.stride[0], conv.stride[1]),
        dilation=(conv.dilation[0], conv.dilation[1]),
        pad=(left, right, top, bottom),
        padding_mode=conv.padding_mode,
    )


def _filter_range(filters: slice | None, c_out: int) -> tuple[int, int]:
    if filters is None:
        return 0, c_out
    if not isinstance(filters, slice):
        raise TypeError(f"filters must be a slice or None, got {type(filters).__name__}")
    start, stop, step = filters.indices(c_out)
    if step != 1:
        raise ValueError(f"filters must be a contiguous slice (step 1), got step {step}")
    return start, max(start, stop)


def _check_storage(max_bytes: int, dtype: torch.dtype) -> None:
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if not dtype.is_floating_point:
        raise ValueError(f"maps are stored as a floating dtype, got {dtype}")


# -- tiles: which filters are computed together (pure functions of the layer's numbers) ------


def _tile_size(per_filter_elements: int, itemsize: int) -> int:
    """Filters per tile; depends on the layer and image size only, never on a chunk."""
    per_filter_bytes = per_filter_elements * itemsize
    return max(1, min(_TILE_FILTERS, _TILE_BYTES // max(1, per_filter_bytes)))


def _tiles(o0: int, o1: int, size: int, unit: int) -> Iterator[tuple[int, int]]:
    """The fixed tiles (start, stop) that cover filters [o0, o1): `size` filters from the start
    of each `unit` (a tile never crosses one), the last tile of a unit shorter."""
    for base in range(o0 - o0 % unit, o1, unit):
        end = base + unit
        if max(o0, base) >= min(o1, end):
            continue
        first = base + (max(o0, base) - base) // size * size
        for t0 in range(first, min(o1, end), size):
            yield t0, min(t0 + size, end)


def _plan_chunks(
    c_out: int, unit: int, size: int, per_filter_bytes: int, max_bytes: int
) -> list[tuple[range, list[range]]]:
    """(computed block, chunks yielded from it) pairs covering every filter in order.

    Chunks are whole units (groups) or whole tiles when max_bytes allows, so no chunk pays for
    a partial tile; when one tile is larger than max_bytes, each tile is computed once and
    handed out in pieces, so no filter is ever computed twice.
    """
    fit = max(1, max_bytes // per_filter_bytes)
    if fit >= unit:
        step = fit - fit % unit
        blocks = [range(o, min(o + step, c_out)) for o in range(0, c_out, step)]
    elif fit >= size:
        step = fit - fit % size
        blocks = [
            range(o, min(o + step, base + unit))
            for base in range(0, c_out, unit)
            for o in range(base, base + unit, step)
        ]
    else:
        return [
            (range(t0, t1), [range(o, min(o + fit, t1)) for o in range(t0, t1, fit)])
            for t0, t1 in _tiles(0, c_out, size, unit)
        ]
    return [(block, [block]) for block in blocks]


# -- the prepared layer -----------------------------------------------------------------------


@dataclass(eq=False)
class _Layer:
    """One conv and its padded input in the compute dtype, ready for any range of filters."""

    g: _Geometry
    dtype: torch.dtype  # the compute dtype: the input's, at least float32
    batched: bool  # whether the caller's x had a batch axis
    xp: Tensor  # (N, C_in, H + pads, W + pads), contiguous
    w: Tensor  # (C_out, C_in/groups, kh*kw)
    ho: int
    wo: int
    _cols: Tensor | None = None  # every channel's im2col, once cache_cols() kept it
    _w_taps: Tensor | None = None  # w as (kh*kw, C_out, C_in/groups), built on first use

    @property
    def n(self) -> int:
        return self.xp.shape[0]

    @property
    def length(self) -> int:
        return self.ho * self.wo

    @property
    def unit(self) -> int:
        """Tiles never cross this many filters: a group when filters share input channels."""
        return self.g.co_g if self.g.cg > 1 else self.g.c_out

    def tile_size(self, per_filter_elements: int) -> int:
        return _tile_size(per_filter_elements, self.dtype.itemsize)

    def tiles(self, o0: int, o1: int, size: int) -> Iterator[tuple[int, int]]:
        return _tiles(o0, o1, size, self.unit)

    def cols(self, c0: int, c1: int) -> Tensor:
        """im2col of input channels [c0, c1): (N, c1 - c0, kh*kw, H_out*W_out)."""
        if self._cols is not None:
            return self._cols[:, c0:c1]
        g = self.g
        cols = _aligned_empty(
            (self.n, c1 - c0, g.taps, self.length),
            c0 * g.taps * self.length,
            self.dtype,
            self.xp.device,
        )
        unfolded = F.unfold(self.xp[:, c0:c1], (g.kh, g.kw), dilation=g.dilation, stride=g.stride)
        return cols.copy_(unfolded.view(cols.shape))

    def cache_cols(self) -> None:
        """Keep the im2col of every channel, for callers that revisit all of them."""
        if self._cols is None:
            self._cols = self.cols(0, self.g.c_in)

    def w_taps(self) -> Tensor:
        if self._w_taps is None:
            self._w_taps = self.w.permute(2, 0, 1).contiguous()
        return self._w_taps

    def inputs_of(self, o0: int, o1: int) -> Tensor:
        """The padded input channel of each filter in [o0, o1) when groups == C_in."""
        if self.g.co_g == 1:
            return self.xp[:, o0:o1]  # a view: filter o reads channel o
        index = torch.arange(o0, o1, device=self.xp.device) // self.g.co_g
        return self.xp.index_select(1, index)

    def shape_kernel(self, maps: Tensor) -> Tensor:
        """(N, n, C_in/groups, L) -> (N, n, C_in/groups, H_out, W_out), N dropped if unbatched."""
        maps = maps.view(self.n, maps.shape[1], self.g.cg, self.ho, self.wo)
        return maps if self.batched else maps[0]

    def shape_tap(self, maps: Tensor) -> Tensor:
        """(N, n, L, kh*kw) -> (N, n, H_out, W_out, kh, kw), N dropped if unbatched."""
        g = self.g
        maps = maps.view(self.n, maps.shape[1], self.ho, self.wo, g.kh, g.kw)
        return maps if self.batched else maps[0]

    def plan_chunks(self, per_filter_bytes: int, max_bytes: int, size: int
                    ) -> list[tuple[range, list[range]]]:
        return _plan_chunks(self.g.c_out, self.unit, size, per_filter_bytes, max_bytes)


def _prepare(conv: nn.Conv2d, x: Tensor) -> _Layer:
    """Check x against the conv, pad it as the conv would, and cast both to the compute dtype."""
    g = _geometry(conv)
    if x.dim() not in (3, 4):
        raise ValueError(f"expected x of shape (C, H, W) or (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[-3] != g.c_in:
        raise ValueError(f"the conv expects {g.c_in} input channels, x has {x.shape[-3]}")
    weight = conv.weight.detach()
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the conv's weight is on {weight.device}")
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"expected a floating-point input, got {x.dtype}")
    # At least fp32: half-precision sums of many products lose the small kernel maps that make
    # a decomposition worth looking at; fp64 stays fp64.
    dtype = torch.promote_types(dtype, torch.float32)
    batched = x.dim() == 4
    # Detached inputs: no autograd graph, and bmm(out=...) is allowed.
    x4 = (x if batched else x.unsqueeze(0)).detach().to(dtype)
    if any(g.pad):
        mode = "constant" if g.padding_mode == "zeros" else g.padding_mode
        x4 = F.pad(x4, g.pad, mode=mode)
    left, right, top, bottom = g.pad
    ho, wo = g.out_hw(x4.shape[-2] - top - bottom, x4.shape[-1] - left - right)
    w = weight.to(dtype).reshape(g.c_out, g.cg, g.taps)
    return _Layer(g, dtype, batched, x4.contiguous(), w, ho, wo)


# -- kernel maps ------------------------------------------------------------------------------


def _kernel_maps(layer: _Layer, o0: int, o1: int, channel_block: int | None = None) -> Tensor:
    """Kernel maps of filters [o0, o1) as (N, n, C_in/groups, H_out*W_out)."""
    g = layer.g
    per_filter = g.cg * layer.length
    out = _aligned_empty(
        (layer.n, o1 - o0, g.cg, layer.length), o0 * per_filter, layer.dtype, layer.xp.device
    )
    size = layer.tile_size(per_filter)
    if g.cg == 1:
        _depthwise_kernel_maps(layer, o0, o1, size, out)
    else:
        block = g.cg if channel_block is None else max(1, min(g.cg, channel_block))
        _grouped_kernel_maps(layer, o0, o1, size, block, out)
    return out


def _depthwise_kernel_maps(layer: _Layer, o0: int, o1: int, size: int, out: Tensor) -> None:
    """One kernel per filter: each kernel map is the conv's own output channel, so one grouped
    conv over a tile's channels gives them with no im2col."""
    g = layer.g
    for t0, t1 in layer.tiles(o0, o1, size):
        a, b = max(t0, o0), min(t1, o1)
        y = F.conv2d(
            layer.inputs_of(t0, t1),
            layer.w[t0:t1].view(t1 - t0, 1, g.kh, g.kw),
            None,
            g.stride,
            0,
            g.dilation,
            t1 - t0,
        )
        out[:, a - o0 : b - o0, 0].copy_(y[:, a - t0 : b - t0].flatten(-2))


def _grouped_kernel_maps(
    layer: _Layer, o0: int, o1: int, size: int, block: int, out: Tensor
) -> None:
    """Several kernels per filter: one GEMM per input channel and tile, `block` channels'
    im2col at a time."""
    g = layer.g
    per_filter = g.cg * layer.length
    for base in range(o0 - o0 % layer.unit, o1, layer.unit):
        group_tiles = list(layer.tiles(max(o0, base), min(o1, base + layer.unit), size))
        # A tile wholly inside [o0, o1) is written in place; a partial one (only at the ends)
        # goes through a scratch tile, computed whole so its bits never change.
        targets = [
            out[:, t0 - o0 : t1 - o0]
            if o0 <= t0 and t1 <= o1
            else _aligned_empty(
                (layer.n, t1 - t0, g.cg, layer.length), t0 * per_filter, layer.dtype, out.device
            )
            for t0, t1 in group_tiles
        ]
        c_base = base // g.co_g * g.cg
        for c0 in range(0, g.cg, block):
            c1 = min(g.cg, c0 + block)
            cols = layer.cols(c_base + c0, c_base + c1)
            for (t0, t1), target in zip(group_tiles, targets, strict=True):
                w = layer.w[t0:t1, c0:c1].transpose(0, 1)  # (channels, tile, taps)
                for i in range(layer.n):
                    # One GEMM per input channel: (tile, taps) @ (taps, L), written straight
                    # into the (filter, channel, L) layout: BLAS takes the row stride as its
                    # leading dimension, so no permute copy is needed.
                    torch.bmm(w, cols[i], out=target[i, :, c0:c1].transpose(0, 1))
        for (t0, t1), target in zip(group_tiles, targets, strict=True):
            if not (o0 <= t0 and t1 <= o1):
                a, b = max(t0, o0), min(t1, o1)
                out[:, a - o0 : b - o0].copy_(target[:, a - t0 : b - t0])


# -- tap maps ---------------------------------------------------------------------------------


def _tap_maps(layer: _Layer, o0: int, o1: int, dtype: torch.dtype | None = None) -> Tensor:
    """Tap maps of filters [o0, o1) as (N, n, H_out*W_out, kh*kw), in `dtype` (default: the
    compute dtype); a storage dtype is cast on the final copy, never rounded twice."""
    g = layer.g
    out = torch.empty(
        (layer.n, o1 - o0, layer.length, g.taps), dtype=dtype or layer.dtype,
        device=layer.xp.device,
    )
    size = layer.tile_size(layer.length * g.taps)
    if g.cg == 1:
        _depthwise_tap_maps(layer, o0, o1, size, out)
    else:
        _grouped_tap_maps(layer, o0, o1, size, out)
    return out


def _depthwise_tap_maps(layer: _Layer, o0: int, o1: int, size: int, out: Tensor) -> None:
    """One product per tap and nothing to sum: exact, and cast on store."""
    g = layer.g
    for t0, t1 in layer.tiles(o0, o1, size):
        a, b = max(t0, o0), min(t1, o1)
        cols = F.unfold(
            layer.inputs_of(a, b), (g.kh, g.kw), dilation=g.dilation, stride=g.stride
        ).view(layer.n, b - a, g.taps, layer.length)
        torch.mul(
            cols.transpose(-1, -2),
            layer.w[a:b].view(1, b - a, 1, g.taps),
            out=out[:, a - o0 : b - o0],
        )


def _grouped_tap_maps(layer: _Layer, o0: int, o1: int, size: int, out: Tensor) -> None:
    """Per tap, (tile, C_in/g) @ (C_in/g, L): the sum over input channels in one GEMM."""
    g = layer.g
    w_taps = layer.w_taps()  # (taps, C_out, C_in/groups)
    for base in range(o0 - o0 % layer.unit, o1, layer.unit):
        c_base = base // g.co_g * g.cg
        cols = layer.cols(c_base, c_base + g.cg)
        for t0, t1 in layer.tiles(max(o0, base), min(o1, base + layer.unit), size):
            a, b = max(t0, o0), min(t1, o1)
            for i in range(layer.n):
                # Taps-last output cannot be a BLAS target, so the result is permuted on the
                # copy, which also casts to the storage dtype.
                prod = torch.bmm(w_taps[:, t0:t1], cols[i].transpose(0, 1))
                out[i, a - o0 : b - o0].copy_(prod[:, a - t0 : b - t0].permute(1, 2, 0))


def _one_image(x: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"chunks stream one image of shape (C, H, W), got {tuple(x.shape)}")


def kernel_maps(conv: nn.Conv2d, x: Tensor, filters: slice | None = None) -> Tensor:
    """Kernel maps of `conv` on one image: `(C_out, C_in/groups, H_out, W_out)`, no bias.

    Args:
        conv: any `nn.Conv2d` (stride, padding incl. 'same'/'valid', padding modes,
            dilation, groups, bias or not).
        x: `(C_in, H, W)`, or `(N, C_in, H, W)` for a leading batch axis in the result.
        filters: a contiguous range of output filters; only the tiles holding them are
            computed (at most one partial tile of extra work at each end).

    Returns:
        The maps in the compute dtype (the input's, at least float32).

    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(4, 6, 3, groups=2, bias=False)
    >>> x = torch.randn(4, 10, 10)
    >>> km = kernel_maps(conv, x, filters=slice(2, 5))
    >>> km.shape
    torch.Size([3, 2, 8, 8])
    >>> torch.allclose(km.sum(1), conv(x)[2:5], atol=1e-5)
    True
    """
    layer = _prepare(conv, x)
    o0, o1 = _filter_range(filters, layer.g.c_out)
    return layer.shape_kernel(_kernel_maps(layer, o0, o1))


def tap_maps(conv: nn.Conv2d, x: Tensor, filters: slice | None = None) -> Tensor:
    """Tap maps of `conv` on one image: `(C_out, H_out, W_out, kh, kw)`, no bias.

    Each entry is one kernel tap's products summed over the filter's input channels.
    Arguments and dtype as in `kernel_maps`.

    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(3, 5, (2, 3), stride=2)
    >>> x = torch.randn(3, 9, 9)
    >>> tm = tap_maps(conv, x)
    >>> tm.shape
    torch.Size([5, 4, 4, 2, 3])
    >>> torch.allclose(tm.sum((-2, -1)) + conv.bias[:, None, None], conv(x), atol=1e-5)
    True
    """
    layer = _prepare(conv, x)
    o0, o1 = _filter_range(filters, layer.g.c_out)
    return layer.shape_tap(_tap_maps(layer, o0, o1))


def kernel_map_chunks(
    conv: nn.Conv2d, x: Tensor, max_bytes: int, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[slice, Tensor]]:
    """Kernel maps of one image in consecutive filter ranges of at most ~`max_bytes` each.

    Each chunk is computed in the compute dtype and yielded as `dtype`; a chunk holds at
    least one filter, so it exceeds `max_bytes` only when one filter's maps do.
    `torch.cat` of the chunks is exactly `kernel_maps(conv, x).to(dtype)` on one thread (with
    more, a GEMM may split its sums by shape: the low bits can differ).

    Peak memory per chunk, a small multiple of the chunk: its maps in the compute dtype
    (max_bytes x compute/storage itemsize), the cast copy (max_bytes; none when `dtype`
    is the compute dtype) and im2col columns no larger than the compute-dtype chunk (kept
    for the whole layer when they fit, else rebuilt per chunk in channel blocks; briefly
    twice that while one block is built and copied to its aligned place). The one
    exception: below one tile (at most 64 filters and 64 MiB in the compute dtype) a
    whole tile is held and handed out in pieces, so that nothing is computed twice.

    Raises:
        ValueError: for a batched x, a non-positive max_bytes or a non-float dtype.

    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(3, 8, 3)
    >>> x = torch.randn(3, 12, 12)
    >>> [(s.start, s.stop, tuple(m.shape)) for s, m in kernel_map_chunks(conv, x, 5000)]
    [(0, 4, (4, 3, 10, 10)), (4, 8, (4, 3, 10, 10))]
    """
    layer, plan = _chunk_plan(conv, x, max_bytes, dtype, lambda a: a.g.cg * a.length)
    return _kernel_chunks(layer, plan, dtype)


def _chunk_plan(
    conv: nn.Conv2d, x: Tensor, max_bytes: int, dtype: torch.dtype,
    per_filter: Callable[[_Layer], int],
) -> tuple[_Layer, list[tuple[range, list[range]]]]:
    """The layer and its chunk plan, given the values one filter's maps hold."""
    _one_image(x)
    _check_storage(max_bytes, dtype)
    layer = _prepare(conv, x)
    n = per_filter(layer)
    return layer, layer.plan_chunks(n * dtype.itemsize, max_bytes, layer.tile_size(n))


def _kernel_chunks(
    layer: _Layer, plan: list[tuple[range, list[range]]], dtype: torch.dtype
) -> Iterator[tuple[slice, Tensor]]:
    g = layer.g
    block_elements = max(len(block) for block, _ in plan) * g.cg * layer.length
    column_elements = layer.length * g.taps
    channel_block: int | None = None
    if g.cg > 1:
        if g.c_in * column_elements <= block_elements:
            layer.cache_cols()  # all the columns fit in one chunk's budget: build them once
        else:
            channel_block = max(1, block_elements // column_elements)
    for block, pieces in plan:
        maps = _kernel_maps(layer, block.start, block.stop, channel_block)
        for r in pieces:
            part = layer.shape_kernel(maps[:, r.start - block.start : r.stop - block.start])
            # Pieces of one tile get their own memory, so no two chunks ever alias.
            yield slice(r.start, r.stop), part.to(dtype, copy=len(pieces) > 1)


def tap_map_chunks(
    conv: nn.Conv2d, x: Tensor, max_bytes: int, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[slice, Tensor]]:
    """Tap maps of one image in consecutive filter ranges of at most ~`max_bytes` each.

    As `kernel_map_chunks`; `torch.cat` of the chunks is exactly
    `tap_maps(conv, x).to(dtype)`.

    Peak memory per chunk: its maps in `dtype` (written directly, the cast fused into the
    permuting copy), one tile of products in the compute dtype (no larger than the
    compute-dtype chunk once a chunk holds a tile), and the layer's im2col columns, built
    once and kept: C_in*kh*kw*H_out*W_out values, the size of C_in/groups filters' tap
    maps. For the bits not to depend on the chunking the sum over input channels must be
    one GEMM over all of them, so these columns cannot be split by channel.

    Raises:
        ValueError: for a batched x, a non-positive max_bytes or a non-float dtype.

    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(3, 4, 3)
    >>> x = torch.randn(3, 8, 8)
    >>> [(s.start, s.stop, m.dtype) for s, m in tap_map_chunks(conv, x, 700, torch.float16)]
    [(0, 1, torch.float16), (1, 2, torch.float16), (2, 3, torch.float16), (3, 4, torch.float16)]
    """
    layer, plan = _chunk_plan(conv, x, max_bytes, dtype, lambda a: a.length * a.g.taps)
    return _tap_chunks(layer, plan, dtype)


def _tap_chunks(
    layer: _Layer, plan: list[tuple[range, list[range]]], dtype: torch.dtype
) -> Iterator[tuple[slice, Tensor]]:
    if layer.g.cg > 1:
        layer.cache_cols()
    for block, pieces in plan:
        maps = _tap_maps(layer, block.start, block.stop, dtype)
        for r in pieces:
            part = layer.shape_tap(maps[:, r.start - block.start : r.stop - block.start])
            yield slice(r.start, r.stop), part.clone() if len(pieces) > 1 else part


def window_taps(conv: nn.Conv2d, position: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The input rows `(kh,)` and columns `(kw,)` the taps of output `position` (y, x) read,
    in the unpadded input's coordinates (outside it where the conv pads).

    >>> from torch import nn
    >>> rows, cols = window_taps(nn.Conv2d(1, 1, 3, stride=2, padding=1), (0, 2))
    >>> rows.tolist(), cols.tolist()
    ([-1, 0, 1], [3, 4, 5])
    """
    g = _geometry(conv)
    left, _, top, _ = g.pad
    rows = torch.arange(g.kh) * g.dilation[0] + position[0] * g.stride[0] - top
    cols = torch.arange(g.kw) * g.dilation[1] + position[1] * g.stride[1] - left
    return rows, cols


def window_products(conv: nn.Conv2d, x: Tensor, filter: int, position: tuple[int, int]
                    ) -> Tensor:
    """The products `w * x` of one filter at one output position, `(C_in/groups, kh, kw)`, no
    bias: only that window is read. Summed over the taps, input channel i's product is its
    kernel-map value there (`kernel_maps(conv, x)[filter, i, y, x]`, up to the order of the
    sum); the dtype is the input's, at least float32.

    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    >>> x = torch.randn(4, 7, 7)
    >>> p = window_products(conv, x, 5, (0, 3))
    >>> p.shape
    torch.Size([2, 3, 3])
    >>> torch.allclose(p.sum((1, 2)), kernel_maps(conv, x)[5, :, 0, 3], atol=1e-6)
    True
    """
    g = _geometry(conv)
    if x.dim() != 3 or x.shape[0] != g.c_in:
        raise ValueError(f"expected x of shape ({g.c_in}, H, W), got {tuple(x.shape)}")
    ho, wo = g.out_hw(x.shape[-2], x.shape[-1])
    if not (0 <= filter < g.c_out and 0 <= position[0] < ho and 0 <= position[1] < wo):
        raise ValueError(f"filter {filter} at {position} is outside the output "
                         f"({g.c_out}, {ho}, {wo})")
    c0 = filter // g.co_g * g.cg
    weight = conv.weight.detach()
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    xs = x[c0:c0 + g.cg].detach().to(dtype)
    rows, cols = window_taps(conv, position)
    if g.padding_mode == "zeros":
        # Only the window is gathered; the taps in the padding read zeros.
        h, w = xs.shape[-2:]
        inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        # index_select, not x[:, rows]: advanced indexing is ~100x slower on CPU here
        win = xs.index_select(1, rows.clamp(0, h - 1).to(xs.device)).index_select(
            2, cols.clamp(0, w - 1).to(xs.device))
        win = win * inside.to(device=win.device, dtype=dtype)
    else:  # reflect, replicate, circular: the padded values are other pixels
        left, _, top, _ = g.pad
        xp = F.pad(xs.unsqueeze(0), g.pad, mode=g.padding_mode)[0]
        win = xp.index_select(1, (rows + top).to(xp.device)).index_select(
            2, (cols + left).to(xp.device))
    return weight[filter].to(dtype) * win
