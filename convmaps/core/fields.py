"""Receptive fields: the box of input pixels behind every position of every module's output.

A position's **box** is the half-open rectangle `(top, left, bottom, right)` of input-tensor
pixels that can influence it (the bounding box of that set), in the preprocessed input's own
coordinates. It reaches past the edges (negative, or beyond H/W) where padding lies: padding
counts as virtual pixels that continue the map by its jump, as in the usual receptive-field
arithmetic. Inside the image the box's edges are those of the real pixels, so a window partly in
padding never claims image pixels it cannot see.

Product path (this module): interval composition along the traced graph. One forward pass on the
meta device (real module code, no compute) runs under a `TorchFunctionMode` that gives every
tensor a geometry: which of its dims are the rows and columns, and for each row (column) the
interval of input rows (columns) behind it, twice: the geometric interval, where padding counts
as virtual pixels, and the real one, the pixels that can influence it. Each function maps its
inputs' geometry to its output's: convolutions and pools (stride, padding incl. asymmetric
`'same'`, dilation, `ceil_mode`) take the union over their window's taps; adaptive pools over
their exact windows `[floor(i*n/m), ceil((i+1)*n/m))`; `F.pad` shifts (negative pads crop);
elementwise functions (add, mul, activations, eval-mode norms) take the union of their operands,
broadcasting included (a squeeze-excitation scale reaches every position); `cat`, `chunk`,
views, permutes and indexing move or slice the row/column tables. The row and column intervals
are exact tables per position; a module's :class:`Field` is their affine summary `(size, jump,
offset)`, with the tables kept where they are not affine.

Independent check (tests/test_fields.py): the support of a one-hot backward pass through a positive
surrogate of the same network (uniform positive conv/linear weights, no bias, max pools replaced
by average pools, nonlinearities and norms replaced by the identity), in float64; its bounding
box must lie in the product box and meet each of the box's edges that lies in the image.
Perturbation tests on tiny models check that pixels outside a box never change the unit and that
every edge of a box inside the image is reached.

Conventions:
- Boxes are the union over a position's channels (a concatenation's channels may differ).
- Modules with no spatial axes per image (after flatten or a linear over them) get the whole
  input, `(0, 0, H, W)`. A global pool (adaptive to 1x1) is one window over the whole map, so
  its box is the union of all the map's boxes, padding included.
- Uneven adaptive windows, or maps with different fields meeting, make a field non-affine: the
  tables stay exact for every position, and padding positions beyond the map's ends are
  extrapolated from the edge position by the jump.
- A box is a rectangle: where a dilated window has a tap in the padding, its edge beyond the
  image is the virtual one, and the image pixels between it and the first real tap lie inside the
  box without influencing the unit. A position that sees only padding (a pad's own border, a
  window wholly in padding) depends on no pixel and keeps its geometric box. Reflect and
  replicate padding count as virtual pixels too (for the usual symmetric windows the pixels they
  copy lie in the window anyway); circular padding is not followed.
- Norms are taken in eval mode (fields() runs the model in eval mode); instance/group norms and
  a layer norm over a spatial axis make that axis global.

    >>> from convmaps.core.models import build
    >>> f = fields(build("alexnet", init=False), (3, 224, 224))
    >>> f["features.10"].size, f["features.10"].jump
    ((163, 163), (16, 16))
    >>> f["features.7"].box(6, 6)
    (62, 62, 161, 161)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from convmaps.core.capture import Trace, meta_trace
from convmaps.errors import ConvmapsError, UnknownLayerError

_log = logging.getLogger("convmaps")

__all__ = ["Field", "box", "fields", "survey"]

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Field:
    """One module output's receptive-field geometry in input pixels.

    Position `(y, x)` has the box `(top, left, bottom, right)` =
    `(offset[0] + y*jump[0], offset[1] + x*jump[1], top + size[0], left + size[1])` when the field
    is affine (`rows` and `cols` are None); otherwise `rows[y]` / `cols[x]` give its exact
    `(start, stop)` per axis and `size` is the largest.

    Attributes:
        size: (h, w) of one position's box.
        jump: input pixels between neighbouring positions; (0, 0) for outputs without spatial
            axes, whose box is the whole input.
        offset: (top, left) of position (0, 0)'s box; may be negative.
        shape: positions per axis of one image's output (1, 1 without spatial axes).
        dims: which dims of one image's output (no batch dim) are rows and columns, e.g.
            (1, 2) for (C, H, W), (0, 1) for ConvNeXt's (H, W, C); None without spatial axes.
        rows, cols: exact per-position (start, stop) tables where the field is not affine.
    """

    size: tuple[int, int]
    jump: tuple[int, int]
    offset: tuple[int, int]
    shape: tuple[int, int] = (1, 1)
    dims: tuple[int, int] | None = None
    rows: tuple[tuple[int, int], ...] | None = None
    cols: tuple[tuple[int, int], ...] | None = None

    @property
    def affine(self) -> bool:
        return self.rows is None and self.cols is None

    def box(self, y: int, x: int) -> Box:
        """The box of position (y, x); positions beyond the map extrapolate by the jump."""
        top, bottom = self._span(0, y)
        left, right = self._span(1, x)
        return top, left, bottom, right

    def boxes(self, positions: torch.Tensor) -> torch.Tensor:
        """Boxes of many positions at once: int64 `(..., 2)` (y, x) -> int64 `(..., 4)`."""
        positions = torch.as_tensor(positions, dtype=torch.int64)
        ys, xs = positions[..., 0], positions[..., 1]
        top, bottom = self._spans(0, ys)
        left, right = self._spans(1, xs)
        return torch.stack([top, left, bottom, right], dim=-1)

    def _table(self, axis: int) -> tuple[tuple[int, int], ...] | None:
        return self.rows if axis == 0 else self.cols

    def _span(self, axis: int, i: int) -> tuple[int, int]:
        start, stop = self._spans(axis, torch.tensor([i]))
        return int(start[0]), int(stop[0])

    def _spans(self, axis: int, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        jump, table = self.jump[axis], self._table(axis)
        if table is None:
            start = self.offset[axis] + i * jump
            return start, start + self.size[axis]
        t = torch.tensor(table, dtype=torch.int64)
        n = len(table)
        edge = i.clamp(0, n - 1)
        # beyond the ends: the edge position's interval, moved by the jump (padding positions)
        shift = (i - edge) * jump
        return t[edge, 0] + shift, t[edge, 1] + shift


def _whole(h: int, w: int) -> Field:
    return Field(size=(h, w), jump=(0, 0), offset=(0, 0))


# ---------------------------------------------------------------------------------------------
# Geometry of one tensor


_NONE = 1 << 62  # an empty real interval is [_NONE, -_NONE)


@dataclass(frozen=True)
class _Axis:
    """Per position along one spatial axis, two intervals of input pixels: the geometric one
    [lo, hi), where padding counts as virtual pixels that continue the map by its jump, and the
    real one [rlo, rhi), the pixels that can actually influence it (empty: padding only)."""

    lo: tuple[int, ...]
    hi: tuple[int, ...]
    rlo: tuple[int, ...]
    rhi: tuple[int, ...]
    jump: int  # input pixels per step of this axis, for positions beyond its ends (padding)

    @classmethod
    def pixels(cls, n: int) -> _Axis:
        lo, hi = tuple(range(n)), tuple(range(1, n + 1))
        return cls(lo, hi, lo, hi, 1)

    def __len__(self) -> int:
        return len(self.lo)

    def at(self, j: int) -> tuple[int, int, int, int]:
        """Intervals of position j; beyond the ends (padding) the geometric one is extrapolated
        by the jump and the real one is empty."""
        if 0 <= j < len(self):
            return self.lo[j], self.hi[j], self.rlo[j], self.rhi[j]
        edge = min(max(j, 0), len(self) - 1)
        shift = (j - edge) * self.jump
        return self.lo[edge] + shift, self.hi[edge] + shift, _NONE, -_NONE

    @staticmethod
    def _of(spans: Sequence[tuple[int, int, int, int]], jump: int) -> _Axis:
        lo, hi, rlo, rhi = zip(*spans, strict=True) if spans else ((), (), (), ())
        return _Axis(tuple(lo), tuple(hi), tuple(rlo), tuple(rhi), jump)

    def spans(self) -> list[tuple[int, int, int, int]]:
        return list(zip(self.lo, self.hi, self.rlo, self.rhi, strict=True))

    def windows(self, starts: Sequence[int], stops: Sequence[int], step: int, jump: int
                ) -> _Axis:
        """Position i takes the union of taps starts[i], starts[i]+step, ... < stops[i]."""
        out = []
        for a, b in zip(starts, stops, strict=True):
            taps = [self.at(j) for j in range(a, b, step)]
            out.append(_hull(taps))
        return self._of(out, jump)

    def conv(self, n_out: int, kernel: int, stride: int, pad: int, dilation: int) -> _Axis:
        starts = [i * stride - pad for i in range(n_out)]
        stops = [s + dilation * (kernel - 1) + 1 for s in starts]
        return self.windows(starts, stops, dilation, self.jump * stride)

    def adaptive(self, n_out: int) -> _Axis:
        n = len(self)
        starts = [(i * n) // n_out for i in range(n_out)]
        stops = [-((-(i + 1) * n) // n_out) for i in range(n_out)]
        # plain windows (n % n_out == 0, a global pool included) keep an exact jump; uneven
        # ones get the rounded mean step, used only beyond the ends
        jump = self.jump * n // n_out if n % n_out == 0 else round(self.jump * n / n_out)
        return self.windows(starts, stops, 1, jump)

    def shift(self, before: int, n_out: int) -> _Axis:
        """F.pad: `before` new positions in front (negative: cropped)."""
        return self.windows([i - before for i in range(n_out)],
                            [i - before + 1 for i in range(n_out)], 1, self.jump)

    def take(self, index: range) -> _Axis:
        spans = self.spans()
        return self._of([spans[i] for i in index],
                        self.jump * (index.step if len(index) > 1 else 1))

    def whole(self, n: int = 1) -> _Axis:
        """Every one of n positions sees the union of all (a reduction or a global norm)."""
        jump = self.jump * len(self) if n == 1 else self.jump
        return self._of([_hull(self.spans())] * n, jump)

    def broadcast(self, n: int) -> _Axis:
        if len(self) == n:
            return self
        assert len(self) == 1, (len(self), n)
        return self._of(self.spans() * n, self.jump)

    def cat(self, other: _Axis) -> _Axis:
        return self._of(self.spans() + other.spans(), self.jump)


def _hull(spans: Sequence[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    return (min(s[0] for s in spans), max(s[1] for s in spans),
            min(s[2] for s in spans), max(s[3] for s in spans))


def _union(axes: Sequence[_Axis], n: int) -> _Axis:
    if len(axes[0]) == n and all(a == axes[0] for a in axes[1:]):
        return axes[0]  # the common case: an activation, a norm, x + x
    full = [a.broadcast(n).spans() for a in axes]
    spans = [_hull(column) for column in zip(*full, strict=True)]
    # the jump of the operands that are maps of this size, not broadcast single positions
    jumps = [a.jump for a in axes if len(a) == n] or [a.jump for a in axes]
    return _Axis._of(spans, max(jumps))


@dataclass(frozen=True)
class _Geo:
    """A tensor's geometry: the dims holding rows and columns (None: that axis was reduced to
    one position and its dim removed) and their interval tables."""

    dims: tuple[int | None, int | None]
    axes: tuple[_Axis, _Axis]


class _Whole:
    """Every element depends on the whole input (spatial axes merged, e.g. by flatten)."""


@dataclass(frozen=True)
class _Unknown:
    """A function whose geometry convmaps does not know touched this tensor's past."""

    reason: str


_WHOLE = _Whole()
Geometry = _Geo | _Whole | _Unknown


class _Unsupported(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Argument helpers


def _arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _pair(v: Any) -> tuple[int, int]:
    """An int, or a sequence of one or two ints, as a pair: a conv's or pool's size argument
    (shared by pooling and deconv)."""
    if isinstance(v, int):
        return v, v
    v = tuple(int(x) for x in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _dims(v: Any, ndim: int) -> list[int]:
    if v is None:
        return list(range(ndim))
    items = [v] if isinstance(v, int) else list(v)
    return [d % ndim for d in items]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, torch.Tensor):
                yield v


# ---------------------------------------------------------------------------------------------
# Propagation rules: (name, args, kwargs, output, geometry lookup) -> geometry of the output


Rule = Callable[[Any, Any, dict[str, Any], Any], Any]


def _trailing(g: _Geo, x: torch.Tensor) -> tuple[_Axis, _Axis]:
    """The axes of a tensor a conv or pool slides over: its last two dims."""
    nd = x.dim()
    want = (nd - 2, nd - 1)
    for k in range(2):
        d = g.dims[k]
        if d != want[k] and not (d is None and x.shape[want[k]] == 1):
            raise _Unsupported("a conv or pool over dims that are not the spatial ones")
    return g.axes


def _conv(g: _Geo, args: Any, kwargs: dict[str, Any], out: torch.Tensor) -> _Geo:
    x, weight = args[0], _arg(args, kwargs, 1, "weight", None)
    stride = _pair(_arg(args, kwargs, 3, "stride", 1))
    padding = _arg(args, kwargs, 4, "padding", 0)
    dilation = _pair(_arg(args, kwargs, 5, "dilation", 1))
    kernel = tuple(weight.shape[-2:])
    rows, cols = _trailing(g, x)
    if padding == "valid":
        pad = (0, 0)
    elif padding == "same":
        # torch pads d*(k-1) in all, the odd pixel after: the leading side gets the floor half
        pad = (dilation[0] * (kernel[0] - 1) // 2, dilation[1] * (kernel[1] - 1) // 2)
    else:
        pad = _pair(padding)
    n = out.shape[-2:]
    axes = tuple(a.conv(n[k], kernel[k], stride[k], pad[k], dilation[k])
                 for k, a in enumerate((rows, cols)))
    nd = out.dim()
    return _Geo((nd - 2, nd - 1), axes)  # type: ignore[arg-type]


def _pool(g: _Geo, args: Any, kwargs: dict[str, Any], out: Any, has_dilation: bool) -> _Geo:
    x = args[0]
    kernel = _pair(_arg(args, kwargs, 1, "kernel_size", None))
    stride_v = _arg(args, kwargs, 2, "stride", None)
    stride = kernel if stride_v is None or stride_v == [] or stride_v == () else _pair(stride_v)
    pad = _pair(_arg(args, kwargs, 3, "padding", 0))
    dilation = _pair(_arg(args, kwargs, 4, "dilation", 1)) if has_dilation else (1, 1)
    y = out[0] if isinstance(out, (tuple, list)) else out
    rows, cols = _trailing(g, x)
    n = y.shape[-2:]
    axes = tuple(a.conv(n[k], kernel[k], stride[k], pad[k], dilation[k])
                 for k, a in enumerate((rows, cols)))
    nd = y.dim()
    return _Geo((nd - 2, nd - 1), axes)  # type: ignore[arg-type]


def _adaptive(g: _Geo, args: Any, out: Any) -> _Geo:
    y = out[0] if isinstance(out, (tuple, list)) else out
    rows, cols = _trailing(g, args[0])
    n = y.shape[-2:]
    nd = y.dim()
    return _Geo((nd - 2, nd - 1), (rows.adaptive(n[0]), cols.adaptive(n[1])))


def _elementwise(operands: Sequence[tuple[torch.Tensor, _Geo]], out: torch.Tensor) -> _Geo:
    """Union of broadcast operands; operands align at their trailing dims."""
    nd = out.dim()
    dims: list[int | None] = []
    axes: list[_Axis] = []
    for k in range(2):
        placed = {d + nd - t.dim() for t, g in operands if (d := g.dims[k]) is not None}
        if len(placed) > 1:
            raise _Unsupported("operands whose spatial dims do not line up")
        dim = placed.pop() if placed else None
        n = out.shape[dim] if dim is not None else 1
        dims.append(dim)
        axes.append(_union([g.axes[k] for _, g in operands], n))
    return _Geo((dims[0], dims[1]), (axes[0], axes[1]))


def _renumber(g: _Geo, where: Callable[[int], int]) -> _Geo:
    d0, d1 = (None if d is None else where(d) for d in g.dims)
    return _Geo((d0, d1), g.axes)


def _moved(g: _Geo, where: Callable[[int], int | None]) -> _Geo | None:
    """Dims renumbered by `where` (None: the dim is gone, which only a one-position axis may
    do); None where a spatial axis of several positions is merged away."""
    dims: list[int | None] = []
    for k in range(2):
        d = g.dims[k]
        nd = None if d is None else where(d)
        if d is not None and nd is None and len(g.axes[k]) != 1:
            return None
        dims.append(nd)
    return _Geo((dims[0], dims[1]), g.axes)


def _reshaped(g: _Geo, src: torch.Size, dst: torch.Size) -> Geometry:
    """view/reshape/flatten/squeeze/unsqueeze: a dim survives where some output dim has the same
    size and the same contiguous stride (then its index digit is the same for every element)."""

    def strides(shape: torch.Size) -> list[int]:
        out, acc = [], 1
        for s in reversed(shape):
            out.append(acc)
            acc *= s
        return out[::-1]

    s_in, s_out = strides(src), strides(dst)

    def where(d: int) -> int | None:
        if src[d] == 1:
            return None
        for e, (size, stride) in enumerate(zip(dst, s_out, strict=True)):
            if size == src[d] and stride == s_in[d]:
                return e
        return None

    moved = _moved(g, where)
    return _WHOLE if moved is None else moved


def _index(g: _Geo, x: torch.Tensor, index: Any) -> Geometry:
    """x[index] for ints, slices, None and Ellipsis."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) or isinstance(i, bool)
           for i in items):
        raise _Unsupported("advanced indexing")
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items[k:k + 1] = [slice(None)] * (x.dim() - used)
    items += [slice(None)] * (x.dim() - used)
    src = 0
    out_dim = 0
    dims: list[int | None] = list(g.dims)
    axes = list(g.axes)
    for item in items:
        if item is None:
            out_dim += 1
            continue
        for k in range(2):
            if g.dims[k] == src:
                if isinstance(item, int):
                    i = item % x.shape[src]
                    axes[k] = g.axes[k].take(range(i, i + 1))
                    dims[k] = None
                else:
                    axes[k] = g.axes[k].take(range(*item.indices(x.shape[src])))
                    dims[k] = out_dim
        if isinstance(item, slice):
            out_dim += 1
        src += 1
    return _Geo((dims[0], dims[1]), (axes[0], axes[1]))


def _reduced(g: _Geo, x: torch.Tensor, dims_v: Any, keepdim: bool) -> Geometry:
    reduce = _dims(dims_v, x.dim())
    axes = list(g.axes)
    dims: list[int | None] = list(g.dims)
    for k in range(2):
        if g.dims[k] in reduce:
            axes[k] = g.axes[k].whole()
            dims[k] = g.dims[k] if keepdim else None
    if keepdim:
        return _Geo((dims[0], dims[1]), (axes[0], axes[1]))
    shifted = [None if d is None else d - sum(1 for r in reduce if r < d) for d in dims]
    return _Geo((shifted[0], shifted[1]), (axes[0], axes[1]))


def _globalised(g: _Geo, x: torch.Tensor, over: Sequence[int]) -> _Geo:
    axes = tuple(a.whole(len(a)) if g.dims[k] in over else a for k, a in enumerate(g.axes))
    return _Geo(g.dims, axes)  # type: ignore[arg-type]


def _split(g: _Geo, x: torch.Tensor, dim: int, out: Sequence[torch.Tensor]) -> list[Geometry]:
    dim %= x.dim()
    pieces: list[Geometry] = []
    start = 0
    for piece in out:
        n = piece.shape[dim]
        axes = tuple(a.take(range(start, start + n)) if g.dims[k] == dim else a
                     for k, a in enumerate(g.axes))
        pieces.append(_Geo(g.dims, axes))  # type: ignore[arg-type]
        start += n
    return pieces


def _cat(operands: Sequence[tuple[torch.Tensor, Geometry | None]], dim: int,
         out: torch.Tensor) -> _Geo:
    dim %= out.dim()
    geos = [(t, g) for t, g in operands if isinstance(g, _Geo)]
    along = [k for k in range(2) if geos[0][1].dims[k] == dim]
    if not along:  # along another dim every operand covers the same positions: their union
        return _elementwise(geos, out)
    if len(geos) != len(operands) or len({g.dims for _, g in geos}) != 1:
        raise _Unsupported("a concatenation along a spatial axis with constants")
    k = along[0]
    joined = geos[0][1].axes[k]
    for _, g in geos[1:]:
        joined = joined.cat(g.axes[k])
    other = geos[0][1].dims[1 - k]
    n = out.shape[other] if other is not None else 1
    rest = _union([g.axes[1 - k] for _, g in geos], n)
    axes = (joined, rest) if k == 0 else (rest, joined)
    return _Geo(geos[0][1].dims, axes)


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Functions that keep every element's dependence where it is (pointwise, or per channel).
_POINTWISE = _names(
    """abs abs_ add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ rsub mul
    mul_ __mul__ __rmul__ __imul__ div div_ __truediv__ __rtruediv__ __itruediv__ true_divide
    floor_divide __floordiv__ pow pow_ __pow__ __rpow__ neg neg_ __neg__ __pos__ exp exp_ log log_
    sqrt sqrt_ rsqrt rsqrt_ square reciprocal sign clamp clamp_ clip clip_ clamp_min clamp_min_
    clamp_max clamp_max_ maximum minimum fmax fmin where masked_fill masked_fill_ lerp addcmul
    addcdiv relu relu_ relu6 hardtanh hardtanh_ sigmoid sigmoid_ hardsigmoid hardswish silu
    gelu elu elu_ selu celu leaky_relu leaky_relu_ prelu rrelu mish softplus softsign tanh tanh_
    tanhshrink threshold threshold_ logsigmoid hardshrink softshrink glu dropout dropout_
    dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout contiguous clone detach
    detach_ to type type_as float double half bfloat16 cpu cuda requires_grad_ __eq__ __ne__
    __lt__ __le__ __gt__ __ge__ eq ne lt le gt ge logical_not isnan isfinite nan_to_num
    float_power fmod remainder __mod__ erf round floor ceil trunc frac local_response_norm
    channel_shuffle native_channel_shuffle data.__get__ view_as_real view_as_complex"""
)
# Functions whose tensor output does not depend on the values of their tensor inputs.
_CONSTANT = _names(
    """zeros_like ones_like empty_like full_like rand_like randn_like randint_like new_zeros
    new_ones new_empty new_full new_tensor"""
)
_RESHAPE = _names("view reshape flatten unflatten squeeze squeeze_ unsqueeze unsqueeze_ view_as "
                  "reshape_as ravel")
_REDUCE = _names("mean sum amax amin max min std var prod logsumexp nansum nanmean")


def _name(func: Any) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":  # a property, e.g. Tensor.shape
        name = f"{getattr(getattr(func, '__self__', None), '__name__', '?')}.__get__"
    return str(name)


def _rule(name: str, args: Any, kwargs: dict[str, Any], out: Any,
          geo: Callable[[torch.Tensor], Geometry | None]) -> Any:
    """The geometry of `out` (a tensor, or a list for sequence outputs)."""
    x: Any = args[0] if args else None
    first = geo(x) if isinstance(x, torch.Tensor) else None
    if name in ("conv2d", "conv_transpose2d"):
        if name != "conv2d":
            raise _Unsupported(name)
        return _conv(_as_geo(first), args, kwargs, out)
    if name in ("max_pool2d", "max_pool2d_with_indices"):
        g = _pool(_as_geo(first), args, kwargs, out, has_dilation=True)
        return [g, g] if isinstance(out, (tuple, list)) else g
    if name == "avg_pool2d":
        return _pool(_as_geo(first), args, kwargs, out, has_dilation=False)
    if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d", "_adaptive_avg_pool2d"):
        g = _adaptive(_as_geo(first), args, out)
        return [g, g] if isinstance(out, (tuple, list)) else g
    if name in ("pad", "constant_pad_nd"):
        if _arg(args, kwargs, 2, "mode", "constant") == "circular":
            raise _Unsupported("circular padding")  # it wraps the far edge's pixels around
        return _padded(_as_geo(first), x, _arg(args, kwargs, 1, "pad", None), out)
    if name == "batch_norm":
        training = _arg(args, kwargs, 5, "training", False)
        g = _as_geo(first)
        return _globalised(g, x, [d for d in g.dims if d is not None]) if training else g
    if name in ("instance_norm", "group_norm"):
        g = _as_geo(first)
        return _globalised(g, x, [d for d in g.dims if d is not None])
    if name == "layer_norm":
        shape = _arg(args, kwargs, 1, "normalized_shape", ())
        k = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
        return _globalised(_as_geo(first), x, range(x.dim() - k, x.dim()))
    if name in ("softmax", "log_softmax", "softmin"):
        dim = _arg(args, kwargs, 1, "dim", None)
        return _globalised(_as_geo(first), x, _dims(dim, x.dim()))
    if name == "linear":
        g = _as_geo(first)
        if x.dim() - 1 in g.dims:
            return _WHOLE  # a linear over a spatial axis mixes all of it
        return g
    if name in _RESHAPE:
        return _reshaped(_as_geo(first), x.shape, out.shape)
    if name in ("permute", "transpose", "swapaxes", "swapdims", "t", "movedim", "moveaxis"):
        return _permuted(_as_geo(first), name, args, kwargs, x, out)
    if name in ("expand", "expand_as", "broadcast_to"):
        g = _as_geo(first)
        shift = out.dim() - x.dim()
        return _elementwise([(out, _renumber(g, lambda d: d + shift))], out)
    if name == "__getitem__":
        return _index(_as_geo(first), x, args[1])
    if name == "select":
        index: list[Any] = [slice(None)] * (_arg(args, kwargs, 1, "dim", 0) % x.dim())
        return _index(_as_geo(first), x, (*index, _arg(args, kwargs, 2, "index", 0)))
    if name == "narrow":
        dim = _arg(args, kwargs, 1, "dim", 0) % x.dim()
        start = _arg(args, kwargs, 2, "start", 0)
        length = _arg(args, kwargs, 3, "length", 0)
        return _index(_as_geo(first), x, (*[slice(None)] * dim, slice(start, start + length)))
    if name in ("chunk", "split", "tensor_split", "split_with_sizes"):
        return _split(_as_geo(first), x, _arg(args, kwargs, 2, "dim", 0), out)
    if name == "unbind":
        dim = _arg(args, kwargs, 1, "dim", 0) % x.dim()
        index = [slice(None)] * dim
        return [_index(_as_geo(first), x, (*index, i)) for i in range(len(out))]
    if name in ("cat", "concat", "concatenate", "stack"):
        tensors = list(x)
        dim = _arg(args, kwargs, 1, "dim", 0)
        operands = [(t, geo(t)) for t in tensors]
        if name == "stack":
            dim %= out.dim()
            shifted = [(out, _renumber(g, lambda d: d + (d >= dim)))
                       for _, g in operands if isinstance(g, _Geo)]
            return _elementwise(shifted, out)
        return _cat(operands, dim, out)
    if name in _REDUCE:
        dim = _arg(args, kwargs, 1, "dim", None)
        if isinstance(dim, torch.Tensor):  # max(a, b), min(a, b): elementwise
            return _pointwise(args, kwargs, out, geo)
        keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
        if dim is None and not isinstance(out, (tuple, list)):
            return _WHOLE  # a reduction to a scalar
        reduced = _reduced(_as_geo(first), x, dim, keepdim)
        return [reduced, reduced] if isinstance(out, (tuple, list)) else reduced
    if name in _POINTWISE:
        return _pointwise(args, kwargs, out, geo)
    raise _Unsupported(name)


def _as_geo(g: Geometry | None) -> _Geo:
    if not isinstance(g, _Geo):
        raise _Unsupported("a spatial function on a constant")
    return g


def _pointwise(args: Any, kwargs: dict[str, Any], out: Any,
               geo: Callable[[torch.Tensor], Geometry | None]) -> _Geo:
    operands = [(t, g) for v in (*args, *kwargs.values()) for t in _tensors(v)
                if isinstance(g := geo(t), _Geo)]
    return _elementwise(operands, out)


def _padded(g: _Geo, x: torch.Tensor, pad: Sequence[int], out: torch.Tensor) -> _Geo:
    axes = list(g.axes)
    for j in range(len(pad) // 2):
        d = x.dim() - 1 - j  # pad pairs run from the last dim backwards
        for k in range(2):
            if g.dims[k] == d:
                axes[k] = g.axes[k].shift(int(pad[2 * j]), out.shape[d])
    return _Geo(g.dims, (axes[0], axes[1]))


def _permuted(g: _Geo, name: str, args: Any, kwargs: dict[str, Any], x: torch.Tensor,
              out: torch.Tensor) -> _Geo:
    nd = x.dim()
    order = list(range(nd))
    if name == "permute":
        given: Any = args[1:] if len(args) > 1 else [kwargs.get("dims")]
        perm = given[0] if len(given) == 1 and not isinstance(given[0], int) else given
        order = [int(p) % nd for p in perm]
    elif name in ("transpose", "swapaxes", "swapdims", "t"):
        a, b = (0, 1) if name == "t" else (args[1] % nd, args[2] % nd)
        order[a], order[b] = order[b], order[a]
    else:  # movedim
        src = _dims(args[1], nd)
        dst = _dims(args[2], nd)
        others = iter([d for d in range(nd) if d not in src])
        order = [-1] * nd
        for s, t in zip(src, dst, strict=True):
            order[t] = s
        order = [o if o >= 0 else next(others) for o in order]
    return _renumber(g, order.index)


# ---------------------------------------------------------------------------------------------
# The mode


class _GeometryMode(TorchFunctionMode):
    """Follows every function's geometry during one forward pass (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.geo: dict[int, Geometry] = {}
        self._alive: list[torch.Tensor] = []  # keeps ids unique while the pass lasts

    def set(self, t: torch.Tensor, g: Geometry | None) -> None:
        if g is None:
            self.geo.pop(id(t), None)
            return
        self.geo[id(t)] = g
        self._alive.append(t)

    def get(self, t: torch.Tensor) -> Geometry | None:
        return self.geo.get(id(t))

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        inputs = [t for v in (*args, *kwargs.values()) for t in _tensors(v)]
        known = [g for t in inputs if (g := self.get(t)) is not None]
        if not known:
            return out  # constants in, constants out
        if name == "__setitem__":  # writes into args[0]
            self.set(args[0], _Unknown(name))
            return out
        outs = list(_tensors(out))
        if not outs:
            return out  # .shape, .dim(), … : nothing to follow
        result: Any
        if name in _CONSTANT:
            result = None
        elif unknown := next((g for g in known if isinstance(g, _Unknown)), None):
            result = unknown
        elif any(isinstance(g, _Whole) for g in known):
            result = _WHOLE
        else:
            try:
                result = _rule(name, args, kwargs, out, self.get)
            except _Unsupported as e:
                result = _Unknown(name if str(e) == name else f"{name} ({e})")
            except (TypeError, ValueError, IndexError) as e:
                result = _Unknown(f"{name} ({type(e).__name__}: {e})")
        results = result if isinstance(result, list) else [result] * len(outs)
        for t, g in zip(outs, results, strict=True):
            self.set(t, g)
        return out


def _edges(a: _Axis, n: int) -> tuple[list[int], list[int]]:
    """Box edges along one axis of n input pixels: where the geometric interval reaches past the
    input's edge, its virtual pixels there; inside the input, the real pixels' edge. A position
    that sees only padding keeps its geometric interval."""
    starts, stops = [], []
    for lo, hi, rlo, rhi in a.spans():
        real = rlo < rhi
        starts.append(lo if lo < 0 or not real else rlo)
        stops.append(hi if hi > n or not real else rhi)
    return starts, stops


def _field(g: Geometry | None, hw: tuple[int, int], batch_dims: int = 1) -> Field | None:
    if g is None or isinstance(g, _Unknown):
        return None
    if isinstance(g, _Whole) or None in g.dims:
        return _whole(*hw)
    rows, cols = g.axes
    size, jump, offset, tables = [], [], [], []
    for a, n in ((rows, hw[0]), (cols, hw[1])):
        starts, stops = _edges(a, n)
        sizes = [b - t for t, b in zip(starts, stops, strict=True)]
        affine = len(set(sizes)) == 1 and all(
            t == starts[0] + i * a.jump for i, t in enumerate(starts)
        )
        size.append(max(sizes))
        jump.append(a.jump)
        offset.append(starts[0])
        tables.append(None if affine else tuple(zip(starts, stops, strict=True)))
    d0, d1 = g.dims
    assert d0 is not None and d1 is not None
    return Field(
        size=(size[0], size[1]), jump=(jump[0], jump[1]), offset=(offset[0], offset[1]),
        shape=(len(rows), len(cols)), dims=(d0 - batch_dims, d1 - batch_dims),
        rows=tables[0], cols=tables[1],
    )


def _meta_trace(model: nn.Module, input_shape: tuple[int, ...], names: list[str],
                mode: _GeometryMode, inputs: bool = False) -> Trace:
    """Outputs (and with `inputs`, inputs) of `names` from a forward pass on the meta device,
    the input seeded with the identity geometry."""
    geo = _Geo((2, 3), (_Axis.pixels(input_shape[1]), _Axis.pixels(input_shape[2])))
    return meta_trace(model, input_shape, names, inputs=inputs,
                      on_input=lambda x: mode.set(x, geo))


def fields(model: nn.Module, input_shape: tuple[int, int, int], *, strict: bool = True
           ) -> dict[str, Field]:
    """The receptive field of every module's output for one input of `input_shape` (C, H, W).

    Keys are qualified module names as in `named_modules()` (a module called again gets
    `name@1`, … as in a dump). One forward pass on the meta device; the model is left as found.

    Args:
        strict: raise when a function convmaps cannot follow touched a module's output; False
            leaves such modules out instead, with one warning on the `convmaps` logger naming
            them and the function each could not be followed through.

    Raises:
        ConvmapsError: the forward pass fails, or (strict) a field cannot be followed.
    """
    return survey(model, input_shape, strict=strict, inputs=False)[1]


def survey(model: nn.Module, input_shape: tuple[int, int, int], *, strict: bool = False,
           inputs: bool = True) -> tuple[Trace, dict[str, Field]]:
    """One pass on the meta device for everything a plan needs: every module's output (and,
    with `inputs`, input) shapes as a `Trace`, and the receptive fields of `fields`."""
    if len(input_shape) != 3:
        raise ConvmapsError(f"input shape {tuple(input_shape)}: give (C, H, W)")
    hw = (int(input_shape[1]), int(input_shape[2]))
    mode = _GeometryMode()
    names = [n for n, _ in model.named_modules() if n]
    with mode:  # trace() leaves every submodule's flags and buffers as found
        shapes = _meta_trace(model, tuple(input_shape), names, mode, inputs)
    order = {n: i for i, n in enumerate(names)}
    out: dict[str, Field] = {}
    dropped: dict[str, list[str]] = {}  # reason -> modules left out for it
    for key in sorted(shapes.outputs, key=lambda k: (order[k.split("@")[0]], k)):
        g = mode.get(shapes.outputs[key])
        f = _field(g, hw)
        if f is None:
            if isinstance(g, _Unknown):
                if strict:
                    raise ConvmapsError(
                        f"receptive field of {key}: cannot follow {g.reason}; "
                        "fields(..., strict=False) leaves such modules out"
                    )
                dropped.setdefault(g.reason, []).append(key)
            continue
        out[key] = f
    if dropped:
        _log.warning("no receptive field for %s", "; ".join(
            f"{', '.join(keys)} (cannot follow {reason})" for reason, keys in dropped.items()
        ))
    return shapes, out


def box(model: nn.Module, input_shape: tuple[int, int, int], module: str, y: int, x: int
        ) -> Box:
    """The box `(top, left, bottom, right)` of position (y, x) of `module`'s output."""
    all_fields = fields(model, input_shape)
    if module not in all_fields:
        known = dict(model.named_modules())
        if module not in known or not module:
            raise UnknownLayerError(f"no module named {module!r}")
        raise ConvmapsError(f"{module} has no output that depends on the input")
    f = all_fields[module]
    if not (0 <= y < f.shape[0] and 0 <= x < f.shape[1]):
        raise ConvmapsError(
            f"position ({y}, {x}) is outside {module}'s {f.shape[0]}×{f.shape[1]} output"
        )
    return f.box(y, x)
