"""Value scales and colour maps: which values a picture shows, and in which colours.

A picture's value range is robust (a few standard deviations after sigma clipping, never
stretched by one outlier); diverging scales (signed values) are symmetric around zero and
drawn in coolwarm, sequential ones (non-negative values) in viridis. Every value becomes the
index of its colour in a 256-entry palette: `_LEVELS` colour-map entries, then the colours
that are not values (gutter, NaN, paper, ink).

    >>> import torch
    >>> robust_limit(torch.tensor([0.0, 1.0, 2.0]), Scale.SEQUENTIAL)[0]
    0.0
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import cache

import numpy as np
import torch
from torch import Tensor

from convmaps.options import PngScale

__all__ = ["Scale", "choose_scale", "colorize", "robust_limit"]


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


# --- statistics ------------------------------------------------------------------------------


def _values(t: Tensor) -> np.ndarray:
    """float32 values on the CPU as a numpy view, in the tensor's own memory order (a
    channels-last map is not copied to make it contiguous)."""
    t = t.detach()
    if t.device.type != "cpu" or t.dtype != torch.float32:
        # Half and bfloat16 are too coarse for statistics; hooks may hand over CUDA tensors.
        t = t.to(device="cpu", dtype=torch.float32)
    return t.numpy()


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
