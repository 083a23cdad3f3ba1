"""Explain: one unit's value as an exact sum of terms, followed down the biggest terms.

A conv output is the sum of its per-input-channel kernel maps plus the bias, so a unit
`MODULE:C@Y,X` of a conv is `bias + sum_i k_i`, `k_i` input channel i's kernel-map value at
(Y, X). A `Node` records that sum (every term, sorted by |value|) and, as its children, the
nodes of the `top` largest terms one level down, at the tap of each with the largest |w * x|.
Other modules are sums too, of one or a few terms:

- Linear: the terms `w_j x_j` of every input j, and the bias;
- eval BatchNorm2d, an affine map: one term `scale * x` (same channel and position), the bias
  `shift`;
- ReLU: one term, the input where it passed (0 where the ReLU cut it); Dropout and Identity
  in eval: the input;
- MaxPool2d: one term, the input at its switch (the position the pool chose);
- AvgPool2d, AdaptiveAvgPool2d: the window's inputs, each divided by the window's size;
- Flatten: one term, the input at the (channel, y, x) the flat index came from;
- the input image: a pixel is its own one term (a leaf).

So `bias + sum(terms) == value` at every node. A single-term node has that term as its one
child; a pool's child is its largest term. Depth counts the conv and linear nodes on a path
(and the pixels): a weighted node at level `depth` has no children; below a first conv the
children are every colour channel of its pixels (with `top` >= the channels, as by default).
Chains only (`chain.steps`: nn.Sequential, AlexNet, VGG); residual and concatenating models
are refused.

    >>> import torch
    >>> from convmaps.core.deconv import Unit
    >>> from convmaps.core.models import lenet5
    >>> _ = torch.manual_seed(0)
    >>> node = explain(lenet5().eval(), torch.rand(1, 28, 28), Unit("C3", 5, (4, 4)))
    >>> abs(node.bias + sum(t.value for t in node.terms) - node.value) < 1e-5
    True
    >>> [c.module for c in node.children], node.children[0].children[0].module
    (['S2', 'S2', 'S2'], 'relu1')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from convmaps.core import chain
from convmaps.core.decompose import window_products, window_taps
from convmaps.core.deconv import Unit
from convmaps.core.pooling import switches
from convmaps.errors import ConvmapsError

__all__ = ["INPUT", "Node", "Term", "explain", "explainable", "nodes"]

INPUT = "input"  # the module name of the image's pixel nodes
_FLATTEN = "flatten"  # the name of AlexNet's and VGG's unnamed torch.flatten step
_WEIGHTED = (nn.Conv2d, nn.Linear)  # the modules that count as a level of depth
_PASS = (nn.ReLU, nn.Dropout, nn.Identity)
_TYPES = (*_WEIGHTED, *_PASS, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d,
          nn.AdaptiveAvgPool2d, nn.Flatten)


@dataclass(frozen=True)
class Term:
    """One term of a node's sum: input `channel`'s contribution `value`, and the position in
    the input its child is at (a conv's largest tap, a pool's cell; None for 1-D inputs)."""

    channel: int
    value: float
    position: tuple[int, int] | None = None


@dataclass
class Node:
    """One unit: `value == bias + sum(t.value for t in terms)`; `terms` sorted by |value|
    (ties: smaller channel, then earlier position), `children` the nodes of the largest."""

    module: str
    channel: int
    position: tuple[int, int] | None
    value: float
    bias: float
    terms: list[Term]
    kind: str  # the module's type name, "input" for pixels
    children: list[Node] = field(default_factory=list)


def nodes(root: Node) -> list[Node]:
    """Every node of the tree, depth first."""
    out = [root]
    for child in root.children:
        out += nodes(child)
    return out


def _check(steps: Sequence[tuple[str, nn.Module]]) -> None:
    for name, module in steps:
        ok = isinstance(module, _TYPES)
        if isinstance(module, nn.BatchNorm2d):
            ok = module.running_var is not None
        if isinstance(module, nn.AvgPool2d):
            ok = module.padding in (0, (0, 0)) and module.divisor_override is None \
                and not module.ceil_mode
        if not ok:
            raise ConvmapsError(
                f"explain cannot take {name or _FLATTEN} ({type(module).__name__}) apart; it "
                "follows Conv2d, Linear, eval BatchNorm2d, ReLU, Dropout, max and average "
                "pools and Flatten")


@dataclass
class _Run:
    """One image's forward pass through a chain: every step's output, batch axis dropped."""

    steps: list[tuple[str, nn.Module]]
    outs: list[Tensor]  # outs[0] is the image, outs[k + 1] step k's output
    depth: int
    top: int

    def name(self, k: int) -> str:
        return INPUT if k < 0 else self.steps[k][0] or _FLATTEN


def _sorted(terms: list[Term]) -> list[Term]:
    return sorted(terms, key=lambda t: -abs(t.value))  # stable: ties keep the input order


def _at(t: Tensor, channel: int, position: tuple[int, int] | None) -> float:
    return float(t[channel] if position is None else t[channel, position[0], position[1]])


def _conv(conv: nn.Conv2d, x: Tensor, c: int, pos: tuple[int, int]) -> tuple[float, list[Term]]:
    prods = window_products(conv, x, c, pos)  # (C_in/groups, kh, kw)
    rows, cols = window_taps(conv, pos)
    h, w = x.shape[-2:]
    inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
    # The child's tap: the largest |w * x| inside the input (argmax: the first of equals).
    size = prods.abs().masked_fill(~inside.to(prods.device), -1.0).flatten(1)
    taps = size.argmax(1).tolist()
    c0 = c // (conv.out_channels // conv.groups) * (conv.in_channels // conv.groups)
    kw = prods.shape[-1]
    terms = [Term(c0 + i, float(v), (int(rows[t // kw]), int(cols[t % kw])))
             for i, (v, t) in enumerate(zip(prods.sum((1, 2)).tolist(), taps, strict=True))]
    bias = 0.0 if conv.bias is None else float(conv.bias[c])
    return bias, terms


def _linear(lin: nn.Linear, x: Tensor, c: int) -> tuple[float, list[Term]]:
    dtype = torch.promote_types(torch.promote_types(x.dtype, lin.weight.dtype), torch.float32)
    prods = lin.weight[c].detach().to(dtype) * x.to(dtype)
    bias = 0.0 if lin.bias is None else float(lin.bias[c])
    return bias, [Term(j, v) for j, v in enumerate(prods.tolist())]


def _batchnorm(bn: nn.BatchNorm2d, x: Tensor, c: int, pos: tuple[int, int] | None
               ) -> tuple[float, list[Term]]:
    assert bn.running_mean is not None and bn.running_var is not None
    dtype = torch.promote_types(x.dtype, torch.float32)
    scale = (bn.running_var[c].to(dtype) + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight[c].to(dtype)
    shift = -bn.running_mean[c].to(dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias[c].to(dtype)
    return float(shift), [Term(c, float(scale * _at(x, c, pos)), pos)]


def _avgpool(pool: nn.Module, x: Tensor, c: int, pos: tuple[int, int]) -> list[Term]:
    h, w = x.shape[-2:]
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        oh, ow = _out_size(pool.output_size, (h, w))
        # torch's adaptive windows: [floor(i*H/oh), ceil((i+1)*H/oh)).
        ys = range(pos[0] * h // oh, -(-(pos[0] + 1) * h // oh))
        xs = range(pos[1] * w // ow, -(-(pos[1] + 1) * w // ow))
    else:
        assert isinstance(pool, nn.AvgPool2d)
        (kh, kw), (sh, sw) = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
        ys = range(pos[0] * sh, pos[0] * sh + kh)
        xs = range(pos[1] * sw, pos[1] * sw + kw)
    n = len(ys) * len(xs)
    window = x[c, ys.start:ys.stop, xs.start:xs.stop] / n
    return [Term(c, float(window[i, j]), (y, xx))
            for i, y in enumerate(ys) for j, xx in enumerate(xs)]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _out_size(size: int | None | Sequence[int | None], hw: tuple[int, int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) or size is None else tuple(size)
    return (pair[0] or hw[0], pair[1] or hw[1])  # None keeps the input's size


def _terms(run: _Run, k: int, c: int, pos: tuple[int, int] | None
           ) -> tuple[float, list[Term]]:
    """Step k's unit as (bias, terms), its input being run.outs[k]."""
    module, x, y = run.steps[k][1], run.outs[k], run.outs[k + 1]
    if isinstance(module, nn.Conv2d):
        assert pos is not None
        return _conv(module, x, c, pos)
    if isinstance(module, nn.Linear):
        return _linear(module, x, c)
    if isinstance(module, nn.BatchNorm2d):
        return _batchnorm(module, x, c, pos)
    if isinstance(module, _PASS):
        return 0.0, [Term(c, _at(y, c, pos), pos)]
    if isinstance(module, nn.MaxPool2d):
        assert pos is not None
        flat = int(switches(module, x[c:c + 1])[0, pos[0], pos[1]])
        at = (flat // x.shape[-1], flat % x.shape[-1])
        return 0.0, [Term(c, _at(x, c, at), at)]
    if isinstance(module, nn.Flatten):
        index = torch.unravel_index(torch.tensor(c), tuple(x.shape))
        ch, where = int(index[0]), tuple(int(i) for i in index[1:])
        cell = (where[0], where[1]) if len(where) == 2 else None
        return 0.0, [Term(ch, _at(x, ch, cell), cell)]
    assert pos is not None
    return 0.0, _avgpool(module, x, c, pos)


def _node(run: _Run, k: int, c: int, pos: tuple[int, int] | None, level: int) -> Node:
    """The node of step k's output (k = -1: the image) at `level` (weighted nodes and pixels
    counted from 1 at the root)."""
    value = _at(run.outs[k + 1], c, pos)
    if k < 0:
        return Node(INPUT, c, pos, value, 0.0, [Term(c, value, pos)], INPUT)
    module = run.steps[k][1]
    bias, terms = _terms(run, k, c, pos)
    terms = _sorted(terms)
    node = Node(run.name(k), c, pos, value, bias, terms, type(module).__name__)
    weighted = isinstance(module, _WEIGHTED)
    below = level + 1 if weighted else level
    if below > run.depth:
        return node
    if weighted and k > 0:
        chosen = terms[:run.top]
    elif weighted:  # the pixels: every colour channel
        chosen = terms
    else:
        chosen = terms[:1]
    node.children = [_node(run, k - 1, t.channel, t.position, below) for t in chosen]
    return node


def explainable(model: nn.Module, unit: Unit) -> tuple[list[tuple[str, nn.Module]], int]:
    """The model's chain and the step whose output is the unit's module.

    Raises:
        ConvmapsError: the model is not a chain (residual adds, concatenations), or a module on
            the way to the unit cannot be taken apart.
    """
    try:
        steps = chain.steps(model)
    except ConvmapsError as e:
        raise ConvmapsError(f"explain: {e}; residual and concatenating models are not "
                            "supported") from None
    ends = chain.ends(steps)
    if unit.module not in ends:
        raise ConvmapsError(f"unit {unit}: {unit.module} is not a step of the chain")
    k = ends[unit.module]
    _check(steps[:k + 1])
    return steps, k


def explain(model: nn.Module, image: Tensor, unit: Unit, depth: int = 3, top: int = 3) -> Node:
    """The tree of `unit` on one image `(C, H, W)`: its value as an exact sum, followed down the
    `top` largest terms of each conv and linear node for `depth` levels.

    Without a position, a unit of a (C, H, W) output is at its channel's strongest position
    (the first maximum). Values are the model's own activations (its dtype, at least float32
    for the terms); the model runs in eval mode, its state given back.

    Raises:
        ConvmapsError: the model is not a chain, a module on the way cannot be taken apart, or
            depth or top is below 1.
    """
    if depth < 1 or top < 1:
        raise ConvmapsError(f"--depth and --top must be at least 1 (got {depth}, {top})")
    steps, k = explainable(model, unit)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # A fresh copy: a batch row's view sits at another alignment, and BLAS may round
            # differently there, so an image's tree would depend on its batch.
            outs = [image.detach().clone()]
            for _, module in steps[:k + 1]:
                x = outs[-1].unsqueeze(0)
                # An in-place ReLU would overwrite the kept output of the step before it.
                outs.append(module(x.clone() if getattr(module, "inplace", False) else x)[0])
            out = outs[-1]
            pos = unit.position
            if pos is None and out.dim() == 3:
                flat = int(out[unit.channel].flatten().argmax())  # the first maximum
                pos = (flat // out.shape[-1], flat % out.shape[-1])
            return _node(_Run(steps, outs, depth, top), k, unit.channel, pos, 1)
    finally:
        model.train(training)
