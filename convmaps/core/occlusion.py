"""Occlusion (Zeiler & Fergus, Fig. 7) by exact incremental inference.

A square patch of `fill` slides over the preprocessed input on Captum's grid. A patch changes
only a box of the input, and through each conv or pool only the box of outputs whose windows
meet it (the interval arithmetic of receptive fields, run forwards). So each operation of the
model's traced graph (`core.graph`) recomputes that box alone, from the occluded batch's input
around it, and splices it into the unoccluded pass's output (Krypton, Nakandala et al.,
SIGMOD 2019). Elementwise ops (ReLU, eval BatchNorm, …) work on the box as it is; a residual
add, a product or a concatenation works on the union of its operands' boxes. Where the box
covers the whole map, at an op that mixes every position (linear, flatten, an adaptive pool
that is not the identity), and at an op without a rule here (`method` names them), that op
runs in full, and so does everything after it that reads it. A model `torch.fx` cannot trace
runs every position in full.

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
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torchvision.ops import stochastic_depth

from convmaps.core import chain, graph
from convmaps.errors import ConvmapsError

__all__ = ["Occlusion", "corners", "method", "occlude", "occluded"]

# The modules and functions a box passes through unchanged in place (elementwise in eval).
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU,
                nn.Hardtanh, nn.Hardswish, nn.BatchNorm2d, nn.Dropout, nn.Identity)
_ELEMENTWISE_FUNCTIONS = (torch.relu, F.relu, F.relu6, F.leaky_relu, F.hardtanh, F.gelu,
                          F.silu, F.hardswish, torch.sigmoid, torch.tanh, F.dropout,
                          stochastic_depth)  # (EfficientNet's and ConvNeXt's: eval, identity)
# Elementwise ops of two operands: on the union of their boxes.
_JOINS = (operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul,
          operator.sub, torch.sub)
# Ops that mix every position: they run in full, as they must.
_GLOBAL = (nn.Linear, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_GLOBAL_FUNCTIONS = (torch.flatten, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.linear)
_GLOBAL_METHODS = ("flatten", "mean", "amax", "sum")  # (RegNet's x.flatten(start_dim=1))


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
    incremental: bool = False  # whether the incremental pass ran (a traced graph), not full passes
    full_from: str | None = None  # the first op that ran in full at some position
    # ("flatten": the torch.flatten call in AlexNet's and VGG's forward)


def method(model: nn.Module) -> str:
    """How `occlude` computes the maps of `model` (in eval mode), in words: incremental, and
    the ops it has no rule for (they run in full wherever a patch reaches them), or full
    passes, and why."""
    ops, why = _traced(model)
    if ops is None:
        return f"full passes ({why})"
    unknown = sorted({op.kind for op in ops if op.node.op != "get_attr" and not _known(op)})
    return ("incremental (each op of the traced graph recomputes the box a patch can change"
            + (f"; no rule for {', '.join(unknown)}: run in full" if unknown else "") + ")")


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
    spatial = {m: model.get_submodule(m) for m in modules}
    logits: list[Tensor] = []
    sums: dict[str, list[Tensor]] = {m: [] for m in modules}
    ran_full: set[int] = set()
    training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        ops = _traced(model)[0] if incremental else None
        end = graph.ends(ops) if ops is not None else {}
        if any(m not in end for m in modules):  # a module that runs no op (an empty Sequential)
            ops = None
        with torch.no_grad():
            if ops is not None:  # the unoccluded pass the boxes are spliced into
                keep: dict[int, list[str]] = {}
                for m in modules:
                    keep.setdefault(end[m], []).append(m)
                base = graph.run(ops, image[None])
                clear = base[graph.result(ops)]  # type: ignore[index]
                peaks = {m: _maps(base[end[m]], m).amax((2, 3)) for m in modules}
            else:
                clear, peaks = _full(model, image[None], spatial, lambda t: t.amax((2, 3)))
            for start in range(0, len(boxes), batch_size):
                part = boxes[start:start + batch_size]
                if ops is not None:
                    out, kept, full = _incremental(ops, base, image, part, fill, keep)
                    ran_full |= full
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
    named = ops[min(ran_full)].name if ops is not None and ran_full else None
    return Occlusion(torch.cat(logits).reshape(*shape, -1), clear[0],
                     {m: torch.cat(v).reshape(*shape, -1) for m, v in sums.items()},
                     {m: v[0] for m, v in peaks.items()}, ops is not None, named)


def _traced(model: nn.Module) -> tuple[list[graph.Op] | None, str]:
    """The model's traced graph, or None and why the model runs every position in full: it
    does not trace, returns no single tensor, or reads an in-place op's input again."""
    try:
        ops = graph.ops(model, "occlude")
    except ConvmapsError as e:
        return None, str(e).split(": ", 1)[1]
    if graph.result(ops) is None:
        return None, f"{type(model).__name__}'s forward returns no single tensor"
    if (i := graph.reread(ops)) is not None:
        return None, f"the input of the in-place {ops[i].name} is read again after it"
    return ops, ""


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
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(out, Tensor):
        raise ConvmapsError(f"occlude needs a model whose forward returns one tensor of class "
                            f"scores; {type(model).__name__} returns {type(out).__name__}")
    return out, kept


def _maps(out: Tensor, name: str) -> Tensor:
    """A module's output, which must be feature maps (B, C, H, W) to sum over space."""
    if out.dim() != 4:
        raise ConvmapsError(f"{name} gives {tuple(out.shape[1:])} per image, not feature maps "
                            "(C, H, W) to sum")
    return out


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

    def meta(self) -> Tensor:
        """The batch's shape and dtype on the meta device (no values)."""
        return torch.empty((len(self.at), *self.base.shape[1:]), dtype=self.base.dtype,
                           device="meta")

    def sums(self) -> Tensor:
        """Each channel summed over the whole map, per image: the base's sums corrected by
        what each window changed."""
        under = _gather(self.base.expand(len(self.at), *self.base.shape[1:]), self.at,
                        self.patch.shape[-2:])
        return self.base.sum((2, 3)) + (self.patch - under).sum((2, 3))


def _incremental(ops: Sequence[graph.Op], base: dict[int, Tensor], image: Tensor,
                 boxes: Sequence[tuple[int, int, int, int]], fill: float,
                 keep: dict[int, list[str]]) -> tuple[Tensor, dict[str, Tensor], set[int]]:
    """The traced ops run on `len(boxes)` occluded copies of `image`, each recomputing only the
    box its patch can change; also the ops that ran in full with a patch reaching them."""
    # the patches as windows of one size (a patch cut at the edge: a window moved inwards)
    h, w = image.shape[1:]
    # (at least 1: a grid start past the edge, where the stride passes the patch, is empty)
    size = (max(1, *(y1 - y0 for y0, y1, _, _ in boxes)),
            max(1, *(x1 - x0 for _, _, x0, x1 in boxes)))
    at = [(min(y0, h - size[0]), min(x0, w - size[1])) for y0, _, x0, _ in boxes]
    env: dict[int, _Patched | Tensor] = {
        -1: _Patched(image[None], _gather(occluded(image, boxes, fill), at, size), at)}
    index = {op.node: i for i, op in enumerate(ops)}
    last = {j: i for i, op in enumerate(ops) for j in op.inputs}  # an output's last reader
    final = graph.result(ops)
    assert final is not None  # (`_traced` keeps only graphs that return one op's output)
    kept: dict[str, Tensor] = {}
    full: set[int] = set()
    for i, op in enumerate(ops):
        ins = [env[j] for j in op.inputs]
        patched = any(isinstance(x, _Patched) for x in ins)
        out = _patched(op, ins, base[i]) if patched else None
        if out is None:
            shape = _reads_shape(op)
            if patched and not shape:
                full.add(i)

            def read(a: fx.Node, shape: bool = shape) -> Any:
                x = env[index.get(a, -1)]
                if isinstance(x, _Patched):  # a shape needs no values
                    return x.meta() if shape else x.full()
                return x

            out = graph.call(op, fx.node.map_arg(op.node.args, read),
                             fx.node.map_arg(op.node.kwargs, read))
        env[i] = out
        for m in keep.get(i, []):
            kept[m] = out.sums() if isinstance(out, _Patched) else _maps(out, m).sum((2, 3))
        for j in op.inputs:
            if last[j] == i and j not in (-1, final):
                del env[j]  # bounded memory: only the outputs still to be read
    result = env[final]
    return (result.full() if isinstance(result, _Patched) else result), kept, full


def _elementwise(m: nn.Module) -> bool:
    """A module elementwise in eval (a BatchNorm without running statistics uses the batch's)."""
    return isinstance(m, _ELEMENTWISE) and not (isinstance(m, nn.BatchNorm2d)
                                                and m.running_mean is None)


def _reads_shape(op: graph.Op) -> bool:
    """`x.shape`, `x.size()`, `x.dim()`: what a reshape needs, not the values."""
    n = op.node
    return (n.op == "call_method" and n.target in ("size", "dim")) or \
        (n.op == "call_function" and n.target is getattr and n.args[1:2] == ("shape",))


def _known(op: graph.Op) -> bool:
    """Whether occlusion has a rule for the op: a box, a union of boxes, a shape, or a full
    pass because it mixes every position."""
    if _reads_shape(op) or op.node.op == "call_method" and op.node.target in _GLOBAL_METHODS:
        return True
    m = op.what
    if isinstance(m, nn.Module):
        return _elementwise(m) or isinstance(m, _GLOBAL) or chain.window(m) is not None
    return op.node.op == "call_function" and (m in _ELEMENTWISE_FUNCTIONS or m in _JOINS
                                              or m is torch.cat or m in _GLOBAL_FUNCTIONS)


def _patched(op: graph.Op, ins: list[_Patched | Tensor], base: Tensor) -> _Patched | None:
    """Op on patched operands, as a box spliced into its unoccluded output `base`; None where
    it runs in full (no rule, it mixes every position, or an operand is whole)."""
    m, n = op.what, op.node
    if not all(isinstance(x, _Patched) for x in ins) or not isinstance(base, Tensor) \
            or base.dim() != 4:
        return None
    boxes: list[_Patched] = ins  # type: ignore[assignment]
    if isinstance(m, nn.Module):
        if n.op != "call_module" or len(n.args) != 1 or n.kwargs:
            return None
        return _step(m, boxes[0], base)
    if n.op != "call_function":
        return None
    if m in _ELEMENTWISE_FUNCTIONS:
        if len(ins) != 1 or not n.args or n.args[0] is not n.all_input_nodes[0]:
            return None  # the box is the first argument, the rest are numbers
        patch = boxes[0].patch.clone()  # an in-place F.relu must not touch the patch it read
        return _Patched(base, m(patch, *n.args[1:], **n.kwargs), boxes[0].at)
    if m in _JOINS:
        if len(n.args) != 2 or n.kwargs or len({x.base.shape for x in boxes}) != 1:
            return None  # (a broadcast is no union of boxes)
        windows, at = _union(boxes)
        lookup = dict(zip(n.all_input_nodes, windows, strict=True))
        args = [lookup[a] if isinstance(a, fx.Node) else a for a in n.args]
        fn = {operator.iadd: operator.add, operator.imul: operator.mul}.get(m, m)
        return _Patched(base, fn(*args), at)  # a fresh sum, not in place
    tensors = graph.arg(n, 0, "tensors", [])
    if m is torch.cat and graph.arg(n, 1, "dim", 0) in (1, -3) and \
            all(isinstance(a, fx.Node) for a in tensors) and \
            len({x.base.shape[-2:] for x in boxes}) == 1:
        windows, at = _union(boxes)
        lookup = dict(zip(n.all_input_nodes, windows, strict=True))
        return _Patched(base, torch.cat([lookup[a] for a in tensors], 1), at)
    return None


def _union(xs: Sequence[_Patched]) -> tuple[list[Tensor], list[tuple[int, int]]]:
    """The operands' windows over one box per image that holds each operand's box (one size
    for the batch), read from each operand's unoccluded map where its own box does not reach."""
    hw = xs[0].base.shape[-2:]
    starts = [[min(x.at[b][d] for x in xs) for d in range(2)] for b in range(len(xs[0].at))]
    stops = [[max(x.at[b][d] + x.patch.shape[-2 + d] for x in xs) for d in range(2)]
             for b in range(len(xs[0].at))]
    size = [max(e[d] - s[d] for s, e in zip(starts, stops, strict=True)) for d in range(2)]
    at = [(min(s[0], hw[0] - size[0]), min(s[1], hw[1] - size[1])) for s in starts]
    windows = []
    for x in xs:
        if x.at == at and list(x.patch.shape[-2:]) == size:
            windows.append(x.patch)
            continue
        window = _gather(x.base.expand(len(at), *x.base.shape[1:]), at, size)
        _scatter(window, [(a[0] - b[0], a[1] - b[1]) for a, b in zip(x.at, at, strict=True)],
                 x.patch)
        windows.append(window)
    return windows, at


def _step(module: nn.Module, x: _Patched, base: Tensor) -> _Patched | None:
    """`module` on the patched batch `x`, its unoccluded output being `base`; None where this
    module needs a full pass (it mixes every position, or the windows cover the whole map)."""
    if _elementwise(module) and x.patch.dim() == 4:
        return _Patched(base, module(x.patch.clone()), x.at)  # clone: in-place ReLUs
    if isinstance(module, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d) and x.patch.dim() == 4:
        wanted = module.output_size
        pair = (wanted, wanted) if wanted is None or isinstance(wanted, int) else tuple(wanted)
        same = all(s in (None, n) for s, n in zip(pair, x.base.shape[-2:], strict=True))
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
