"""Occlusion (Zeiler & Fergus, Fig. 7) by exact incremental inference.

A square patch of `fill` slides over the preprocessed input on Captum's grid. A patch changes
only a box of the input, and through each conv or pool only the box of outputs whose windows
meet it (the interval arithmetic of receptive fields, run forwards). So each layer recomputes
that box alone, from the occluded batch's input around it, and splices it into the
unoccluded pass's output; where the box covers the whole map, or at the first module that mixes
every position (linear, flatten, an adaptive pool that is not the identity), the rest runs in
full (Krypton, Nakandala et al., SIGMOD 2019). Models that are not a chain of modules
(`core.chain`) run every position in full.

    >>> import torch
    >>> from convmaps.core.models import lenet5
    >>> net = lenet5().eval()
    >>> image = torch.rand(1, 28, 28)
    >>> got = occlude(net, image, patch=8, stride=4)
    >>> tuple(got.logits.shape), got.incremental
    ((6, 6, 10), True)
    >>> full = occlude(net, image, patch=8, stride=4, incremental=False)
    >>> bool(torch.allclose(got.logits, full.logits, atol=1e-5))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convmaps.core import chain
from convmaps.core.fields import _pair
from convmaps.errors import ConvmapsError

__all__ = ["Occlusion", "corners", "occlude", "occluded"]

# The modules a box passes through unchanged in place (elementwise in eval mode).
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Hardtanh,
                nn.BatchNorm2d, nn.Dropout, nn.Identity)


def corners(size: int, patch: int, stride: int) -> list[int]:
    """Captum's `Occlusion` grid along one axis: starts 0, S, 2S, ..., `ceil((size - P) / S) + 1`
    of them, the last patch cut at the edge."""
    if patch < 1 or stride < 1:
        raise ConvmapsError(f"patch and stride must be at least 1, not {patch} and {stride}")
    if patch > size:
        raise ConvmapsError(f"a {patch} px patch does not fit a {size} px input")
    return [i * stride for i in range(math.ceil((size - patch) / stride) + 1)]


def occluded(image: Tensor, boxes: Sequence[tuple[int, int, int, int]], fill: float) -> Tensor:
    """(len(boxes), C, H, W): `image` (C, H, W) with box (y0, y1, x0, x1) set to `fill`."""
    out = image.expand(len(boxes), *image.shape).clone()
    for b, (y0, y1, x0, x1) in enumerate(boxes):
        out[b, :, y0:y1, x0:x1] = fill
    return out


@dataclass
class Occlusion:
    """Outputs at every patch position: `logits` (Py, Px, classes) and `sums[module]` (Py, Px,
    channels), each channel's feature map summed over space; and of the unoccluded image,
    `clear` (classes,) and `peaks[module]` (channels,), each channel's maximum."""

    logits: Tensor
    clear: Tensor
    sums: dict[str, Tensor] = field(default_factory=dict)
    peaks: dict[str, Tensor] = field(default_factory=dict)
    incremental: bool = False  # whether the incremental pass ran (a chain), not full passes
    full_from: str | None = None  # the first module that ran in full at some position
    # ("flatten": the torch.flatten call in AlexNet's and VGG's forward)


def occlude(model: nn.Module, image: Tensor, patch: int = 16, stride: int = 4,
            fill: float = 0.0, modules: Sequence[str] = (), batch_size: int = 64,
            incremental: bool = True) -> Occlusion:
    """The model's outputs for `image` (C, H, W) with a `patch` square of `fill` at every
    position of Captum's grid, `batch_size` positions at a time; `modules`' channel sums too.

    Runs in the image's dtype and device; the model is used in eval mode. `incremental=False`
    runs every occluded image in full (the reference the incremental pass must equal).

    Raises:
        ConvmapsError: a patch that does not fit, or a module the model does not run.
    """
    if image.dim() != 3:
        raise ConvmapsError(f"occlude takes one image (C, H, W), not {tuple(image.shape)}")
    if batch_size < 1:
        raise ConvmapsError(f"batch_size must be at least 1, not {batch_size}")
    h, w = image.shape[1:]
    ys, xs = corners(h, patch, stride), corners(w, patch, stride)
    boxes = [(y, min(y + patch, h), x, min(x + patch, w)) for y in ys for x in xs]
    try:
        steps = chain.steps(model) if incremental else None
    except ConvmapsError:
        steps = None
    ends = chain.ends(steps) if steps is not None else {}
    missing = [m for m in modules if steps is not None and m not in ends]
    if missing:
        raise ConvmapsError(f"no module {missing[0]!r} in the chain of {type(model).__name__}")
    spatial = {m: model.get_submodule(m) for m in modules}
    logits: list[Tensor] = []
    sums: dict[str, list[Tensor]] = {m: [] for m in modules}
    full_from: set[int] = set()
    training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            if steps is not None:  # the unoccluded pass the windows are spliced into
                base = _base(steps, image[None])
                clear, peaks = base[-1], {m: _maps(base[ends[m]], m).amax((2, 3)) for m in modules}
            else:
                base = []
                clear, peaks = _full(model, image[None], spatial, lambda t: t.amax((2, 3)))
            for start in range(0, len(boxes), batch_size):
                part = boxes[start:start + batch_size]
                if steps is not None:
                    out, kept, first = _incremental(steps, base, image, part, fill,
                                                    {ends[m]: m for m in modules})
                    full_from.add(first)
                else:
                    out, kept = _full(model, occluded(image, part, fill), spatial,
                                      lambda t: t.sum((2, 3)))
                logits.append(out)
                for m in modules:
                    sums[m].append(kept[m])
    finally:
        for module, flag in training:
            module.training = flag
    shape = (len(ys), len(xs))
    first = min(full_from, default=len(steps or []))
    named = (steps[first][0] or "flatten") if steps is not None and first < len(steps) else None
    return Occlusion(torch.cat(logits).reshape(*shape, -1), clear[0],
                     {m: torch.cat(v).reshape(*shape, -1) for m, v in sums.items()},
                     {m: v[0] for m, v in peaks.items()}, steps is not None, named)


def _full(model: nn.Module, x: Tensor, modules: dict[str, nn.Module],
          reduce: Callable[[Tensor], Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Full forward passes, with `reduce` of `modules`' outputs (B, C, H, W) -> (B, C) taken by
    forward hooks (before any in-place op after them changes the output)."""
    kept: dict[str, Tensor] = {}
    handles = []
    for name, module in modules.items():
        def hook(_: nn.Module, __: object, out: Tensor, name: str = name) -> None:
            kept[name] = reduce(_maps(out, name))
        handles.append(module.register_forward_hook(hook))
    try:
        return model(x), kept
    finally:
        for handle in handles:
            handle.remove()


def _maps(out: Tensor, name: str) -> Tensor:
    """A module's output, which must be feature maps (B, C, H, W) to sum over space."""
    if out.dim() != 4:
        raise ConvmapsError(f"{name} gives {tuple(out.shape[1:])} per image, not feature maps "
                            "(C, H, W) to sum")
    return out


def _base(steps: Sequence[tuple[str, nn.Module]], x: Tensor) -> list[Tensor]:
    """The unoccluded pass: every step's output (1, ...)."""
    outs: list[Tensor] = []
    for _, module in steps:
        x = module(x.clone() if outs else x)  # AlexNet's in-place ReLUs keep the conv's output
        outs.append(x)
    return outs


@dataclass
class _Patched:
    """A batch that equals the unoccluded `base` (1, C, H, W) except in one window per image:
    `patch[b]` (C, h, w) with its top-left at `at[b]`. Only the windows are ever computed."""

    base: Tensor
    patch: Tensor
    at: list[tuple[int, int]]

    def full(self) -> Tensor:
        out = self.base.expand(len(self.at), *self.base.shape[1:]).clone()
        _scatter(out, self.at, self.patch)
        return out

    def sums(self) -> Tensor:
        """Each channel summed over the whole map, per image: the base's sums corrected by
        what each window changed."""
        under = _gather(self.base.expand(len(self.at), *self.base.shape[1:]), self.at,
                        self.patch.shape[-2:])
        return self.base.sum((2, 3)) + (self.patch - under).sum((2, 3))


def _incremental(steps: Sequence[tuple[str, nn.Module]], base: Sequence[Tensor], image: Tensor,
                 boxes: Sequence[tuple[int, int, int, int]], fill: float, keep: dict[int, str]
                 ) -> tuple[Tensor, dict[str, Tensor], int]:
    """The steps run on `len(boxes)` occluded copies of `image`, each recomputing only the
    window its patch can change; also the first step that ran in full."""
    # the patches as windows of one size (a patch cut at the edge: a window moved inwards)
    h, w = image.shape[1:]
    size = (max(y1 - y0 for y0, y1, _, _ in boxes), max(x1 - x0 for _, _, x0, x1 in boxes))
    at = [(min(y0, h - size[0]), min(x0, w - size[1])) for y0, _, x0, _ in boxes]
    x: _Patched | Tensor = _Patched(image[None], _gather(occluded(image, boxes, fill), at, size),
                                    at)
    kept: dict[str, Tensor] = {}
    first = len(steps)
    for i, (_, module) in enumerate(steps):
        if isinstance(x, _Patched):
            step = _step(module, x, base[i])
            if step is None:
                first = i
            x = step if step is not None else module(x.full())
        else:
            x = module(x)
        if i in keep:
            kept[keep[i]] = x.sums() if isinstance(x, _Patched) else x.sum((2, 3))
    assert isinstance(x, Tensor)  # a classifier ends in a full pass (flatten, linear)
    return x, kept, first


def _step(module: nn.Module, x: _Patched, base: Tensor) -> _Patched | None:
    """`module` on the patched batch `x`, its unoccluded output being `base`; None where this
    module needs a full pass (it mixes every position, or the windows cover the whole map)."""
    if isinstance(module, _ELEMENTWISE) and x.patch.dim() == 4:
        return _Patched(base, module(x.patch.clone()), x.at)  # clone: in-place ReLUs
    if isinstance(module, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d) and x.patch.dim() == 4:
        same = all(s in (None, n) for s, n in zip(_pair(module.output_size),
                                                    x.base.shape[-2:], strict=True))
        return _Patched(base, x.patch, x.at) if same else None  # AlexNet's 6x6 at 224
    axes = chain.window(module) if x.patch.dim() == 4 else None
    if axes is None:  # a module without a window rule here: it runs in full
        return None
    kernel, stride, pad, dil = ([axis[i] for axis in axes] for i in range(4))
    fill = -math.inf if isinstance(module, nn.MaxPool2d) else 0.0  # what the padding holds
    out_hw, in_hw, h_w = base.shape[-2:], x.base.shape[-2:], x.patch.shape[-2:]
    spans = [[_reach(at[d], at[d] + h_w[d], kernel[d], stride[d], pad[d], dil[d], out_hw[d])
              for at in x.at] for d in range(2)]
    size = tuple(max(b - a for a, b in spans[d]) for d in range(2))
    if size == tuple(out_hw):
        return None
    # one window size for the whole batch: starts moved back where a window would pass the end
    out_at = [(min(ay, out_hw[0] - size[0]), min(ax, out_hw[1] - size[1]))
              for (ay, _), (ax, _) in zip(*spans, strict=True)]
    # the input each output window reads (`need`), in the base padded by `pad`; read with room
    # for the whole patch, which may reach past the rows any window reads (AlexNet's row 223)
    need = [(size[d] - 1) * stride[d] + dil[d] * (kernel[d] - 1) + 1 for d in range(2)]
    in_at = [(oy * stride[0], ox * stride[1]) for oy, ox in out_at]
    offsets = [(py + pad[0] - iy, px + pad[1] - ix)
               for (py, px), (iy, ix) in zip(x.at, in_at, strict=True)]
    room = [max(need[d], max(o[d] for o in offsets) + h_w[d]) for d in range(2)]
    far = [max(0, max(a[d] for a in in_at) + room[d] - in_hw[d] - 2 * pad[d]) for d in range(2)]
    padded = F.pad(x.base, (pad[1], pad[1] + far[1], pad[0], pad[0] + far[0]), value=fill)
    windows = _gather(padded.expand(len(x.at), *padded.shape[1:]), in_at, room)
    _scatter(windows, offsets, x.patch)
    return _Patched(base, _unpadded(module)(windows[..., :need[0], :need[1]]), out_at)


# One gather or scatter for the batch, not a small copy per image: each small copy is a
# parallel region of its own, which costs milliseconds where threads contend.
def _where(x: Tensor, at: Sequence[tuple[int, int]], size: Sequence[int]
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Advanced indices (image, row, column) of image b's window at `at[b]` of `size` in `x`."""
    corner = torch.tensor(at, device=x.device)
    rows = corner[:, 0, None] + torch.arange(size[0], device=x.device)
    cols = corner[:, 1, None] + torch.arange(size[1], device=x.device)
    image = torch.arange(len(at), device=x.device)
    return image[:, None, None], rows[:, :, None], cols[:, None, :]


def _gather(x: Tensor, at: Sequence[tuple[int, int]], size: Sequence[int]) -> Tensor:
    """(B, C, *size): image b's window of `x` (B, C, H, W) with its top-left at `at[b]`."""
    return x.permute(0, 2, 3, 1)[_where(x, at, size)].permute(0, 3, 1, 2)


def _scatter(out: Tensor, at: Sequence[tuple[int, int]], values: Tensor) -> None:
    """`out[b, :, window at at[b]] = values[b]` for every b, in place."""
    out.permute(0, 2, 3, 1)[_where(out, at, values.shape[-2:])] = values.permute(0, 2, 3, 1)


def _reach(a: int, b: int, k: int, s: int, p: int, d: int, n_out: int) -> tuple[int, int]:
    """Outputs [o0, o1) of a window op (kernel k, stride s, padding p, dilation d) whose windows
    meet input rows [a, b) (output o reads padded rows o*s .. o*s + d(k-1), input rows - p),
    widened so that their windows start at or before row a: the patch then lies in them."""
    o0 = max(0, -((-(a + p - d * (k - 1))) // s))  # ceil
    o1 = min(n_out, (b - 1 + p) // s + 1)
    o0 = min(o0, (a + p) // s, n_out - 1)
    return o0, max(o1, o0 + 1)


def _unpadded(module: nn.Module) -> nn.Module:
    """The same window op with no padding of its own (the window was padded already)."""
    if isinstance(module, nn.Conv2d):
        def conv(t: Tensor) -> Tensor:
            return F.conv2d(t, module.weight, module.bias, module.stride, 0, module.dilation,
                            module.groups)
        return _Fn(conv)
    if isinstance(module, nn.MaxPool2d):
        def pool(t: Tensor) -> Tensor:
            return F.max_pool2d(t, module.kernel_size, module.stride or module.kernel_size, 0,
                                module.dilation)
        return _Fn(pool)
    return module  # AvgPool2d without padding


class _Fn(nn.Module):
    def __init__(self, fn: object) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, t: Tensor) -> Tensor:
        return self.fn(t)  # type: ignore[operator]
