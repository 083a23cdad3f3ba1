"""Explain: one unit's value as an exact sum of terms, followed down the biggest terms.

A conv output is the sum of its per-input-channel kernel maps plus the bias, so a unit
`MODULE:C@Y,X` of a conv is `bias + sum_i k_i`, `k_i` input channel i's kernel-map value at
(Y, X). A `Node` records that sum (every term, sorted by |value|) and, as its children, the
nodes of the `top` largest terms one level down, at the tap of each with the largest |w * x|.
Other operations are sums too, of one or a few terms:

- Linear: the terms `w_j x_j` of every input j, and the bias;
- eval BatchNorm2d, an affine map: one term `scale * x` (same channel and position), the bias
  `shift`;
- ReLU (module or function), ReLU6: one term, the output (the input where it passed, clipped
  to 6 by a ReLU6; 0 where it was cut); Dropout and Identity in eval: the input;
- MaxPool2d: one term, the input at its switch (the position the pool chose);
- AvgPool2d, AdaptiveAvgPool2d (module or function): the window's inputs, each divided by
  the window's size;
- Flatten (module or `torch.flatten`): one term, the input at the (channel, y, x) the flat
  index came from;
- a residual add: one term per branch (same channel and position), each a child;
- a concatenation along channels: one term, the branch that holds the channel;
- the input image: a pixel is its own one term (a leaf).

So `bias + sum(terms) == value` at every node. A single-term node has that term as its one
child, an average pool its largest; an add has every branch. Depth counts the conv and linear
nodes on a path (and the pixels): a weighted node at level `depth` has no children; below a
first conv the children are every colour channel of its pixels. The model is read as the
graph `torch.fx` traces of it, so chains (LeNet, AlexNet, VGG), ResNets and MobileNetV2 work;
a model that does not trace, or an operation on the way to the unit that is not a sum of its
inputs (a multiplication, SiLU, …), is refused in one line.

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

import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from convmaps.core import graph
from convmaps.core.decompose import window_products, window_taps
from convmaps.core.deconv import Unit
from convmaps.core.graph import Op, ancestors, arg
from convmaps.core.pooling import switches
from convmaps.errors import ConvmapsError

__all__ = ["INPUT", "Node", "Term", "Window", "explain", "explainable", "nodes", "recipe"]

INPUT = "input"  # the module name of the image's pixel nodes
_WEIGHTED = (nn.Conv2d, nn.Linear)  # the modules that count as a level of depth
_GATES = (nn.ReLU, nn.ReLU6, nn.Dropout, nn.Identity)  # one term: their output
_MODULES = (*_WEIGHTED, *_GATES, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d,
            nn.AdaptiveAvgPool2d, nn.Flatten)
_ADD = (operator.add, torch.add)
_RELU = (torch.relu, F.relu)
_FUNCTIONS = (*_ADD, *_RELU, torch.flatten, torch.cat, F.adaptive_avg_pool2d)
_FOLLOWS = ("Conv2d, Linear, eval BatchNorm2d, ReLU, ReLU6, Dropout, max and average pools, "
            "flatten, residual adds and concatenations")


@dataclass(frozen=True)
class Term:
    """One term of a node's sum: input `channel`'s contribution `value`, the position in the
    input its child is at (a conv's largest tap, a pool's cell; None for 1-D inputs), and the
    input it comes from (`source`: a module's or operation's name, "input" for the image)."""

    channel: int
    value: float
    position: tuple[int, int] | None = None
    source: str = ""


@dataclass(frozen=True)
class Window:
    """A conv term tap by tap: `taps[i][j]` is `w * x` at input row `rows[i]`, column
    `cols[j]` (outside the input: the conv's padding, 0 for zeros); the taps sum to the term's
    value, input channel `channel`'s kernel-map value at the node's position."""

    channel: int
    rows: list[int]
    cols: list[int]
    taps: list[list[float]]


@dataclass
class Node:
    """One unit: `value == bias + sum(t.value for t in terms)`; `terms` sorted by |value|
    (ties: the input order), `children` the nodes of the largest; a conv node's `windows`
    are its `top` largest terms (every colour channel at the pixels) tap by tap."""

    module: str  # a module's name (`name@k` for its k-th call after the first), an operation's
    channel: int
    position: tuple[int, int] | None
    value: float
    bias: float
    terms: list[Term]
    kind: str  # the module's type name or the operation's, "input" for pixels
    children: list[Node] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)


def nodes(root: Node) -> list[Node]:
    """Every node of the tree, depth first."""
    out = [root]
    for child in root.children:
        out += nodes(child)
    return out


def recipe(trees: Sequence[Node]) -> list[tuple[str, int, int]]:
    """The lower units a unit's trees go through: (module, channel, in how many of the trees),
    most frequent first (ties: first seen). Only weighted units count (conv, linear: the
    nodes whose terms are channels of the layer below), not the root itself."""
    counts: Counter[tuple[str, int]] = Counter()
    for tree in trees:
        counts.update({(n.module, n.channel) for n in nodes(tree)[1:]
                       if n.kind in ("Conv2d", "Linear")})
    return [(m, c, n) for (m, c), n in counts.most_common()]


# --- the graph ---------------------------------------------------------------------------------


def _supported(op: Op) -> bool:
    m, n = op.what, op.node
    if isinstance(m, nn.Module):
        if not isinstance(m, _MODULES):
            return False
        if isinstance(m, nn.BatchNorm2d):
            return m.running_var is not None and m.running_mean is not None
        if isinstance(m, nn.AvgPool2d):
            return m.padding in (0, (0, 0)) and m.divisor_override is None and not m.ceil_mode
        if isinstance(m, nn.Flatten):
            return m.start_dim == 1 and m.end_dim == -1
        return True
    if n.op != "call_function" or m not in _FUNCTIONS:
        return False
    if m in _ADD:
        return "alpha" not in n.kwargs and len(n.args) == 2
    if m is torch.flatten:
        return arg(n, 1, "start_dim", 0) == 1 and arg(n, 2, "end_dim", -1) == -1
    if m is torch.cat:
        return arg(n, 1, "dim", 0) == 1
    return True


def explainable(model: nn.Module, unit: Unit) -> tuple[list[Op], int]:
    """The model's traced operations and the one whose output is the unit's module.

    Raises:
        ConvmapsError: the model does not trace into a graph, or an operation on the way to
            the unit cannot be taken apart into a sum.
    """
    ops = graph.ops(model, "explain")
    ends = [i for i, op in enumerate(ops) if unit.module in op.stack]
    if not ends:
        raise ConvmapsError(f"unit {unit}: {unit.module} runs no operation of the traced graph")
    k = ends[-1]  # a container's output: the last operation run inside it
    if (i := graph.reread(ops)) is not None and i in ancestors(ops, k):
        raise ConvmapsError(f"explain cannot follow {ops[i].name}: it writes over its input in "
                            "place, and a later operation reads that input again")
    for i in ancestors(ops, k):
        if not _supported(ops[i]):
            raise ConvmapsError(f"explain cannot take {ops[i].name} ({ops[i].kind}) apart; it "
                                f"follows {_FOLLOWS}")
    return ops, k


# --- the terms of one node ---------------------------------------------------------------------


@dataclass
class _Run:
    """One image's forward pass: every operation's output, batch axis dropped."""

    ops: list[Op]
    outs: dict[int, Tensor]  # op index -> its output; -1: the image
    depth: int
    top: int
    index: dict[fx.Node, int] = field(init=False)  # graph node -> its op
    by_name: dict[str, int] = field(init=False)  # an op's name -> the op

    def name(self, k: int) -> str:
        return INPUT if k < 0 else self.ops[k].name

    def __post_init__(self) -> None:
        self.index = {op.node: i for i, op in enumerate(self.ops)}
        self.by_name = {INPUT: -1}
        for i, op in enumerate(self.ops):
            self.by_name.setdefault(op.name, i)

    def of(self, a: fx.Node) -> int:
        """The op that computes graph node `a` (-1: the image)."""
        return self.index.get(a, -1)


def _sorted(terms: list[Term]) -> list[Term]:
    return sorted(terms, key=lambda t: -abs(t.value))  # stable: ties keep the input order


def _at(t: Tensor, channel: int, position: tuple[int, int] | None) -> float:
    return float(t[channel] if position is None else t[channel, position[0], position[1]])


_Taps = tuple[Tensor, list[int], list[int], int]  # a conv's products, rows, cols, first channel


def _conv(conv: nn.Conv2d, x: Tensor, c: int, pos: tuple[int, int]
          ) -> tuple[float, list[Term], _Taps]:
    prods = window_products(conv, x, c, pos)  # (C_in/groups, kh, kw)
    rows, cols = window_taps(conv, pos)
    h, w = x.shape[-2:]
    inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
    # The child's tap: the largest |w * x| inside the input (argmax: the first of equals).
    size = prods.abs().masked_fill(~inside.to(prods.device), -1.0).flatten(1)
    taps = size.argmax(1).tolist()
    c0 = c // (conv.out_channels // conv.groups) * (conv.in_channels // conv.groups)
    kw = prods.shape[-1]
    ys, xs = rows.tolist(), cols.tolist()  # Python numbers: indexing a tensor per term is slow
    terms = [Term(c0 + i, v, (ys[t // kw], xs[t % kw]))
             for i, (v, t) in enumerate(zip(prods.sum((1, 2)).tolist(), taps, strict=True))]
    bias = 0.0 if conv.bias is None else float(conv.bias[c])
    return bias, terms, (prods, ys, xs, c0)


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



def _window(x: Tensor, c: int, ys: range, xs: range) -> list[Term]:
    """An average pool's terms: the window's inputs, each divided by its size."""
    window = x[c, ys.start:ys.stop, xs.start:xs.stop] / (len(ys) * len(xs))
    return [Term(c, float(window[i, j]), (y, xx))
            for i, y in enumerate(ys) for j, xx in enumerate(xs)]


def _adaptive(size: Any, x: Tensor, c: int, pos: tuple[int, int]) -> list[Term]:
    h, w = x.shape[-2:]
    pair = (size, size) if isinstance(size, int) or size is None else tuple(size)
    oh, ow = pair[0] or h, pair[1] or w  # None keeps the input's size
    # torch's adaptive windows: [floor(i*H/oh), ceil((i+1)*H/oh)).
    return _window(x, c, range(pos[0] * h // oh, -(-(pos[0] + 1) * h // oh)),
                   range(pos[1] * w // ow, -(-(pos[1] + 1) * w // ow)))


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _flatten(x: Tensor, c: int) -> list[Term]:
    index = torch.unravel_index(torch.tensor(c), tuple(x.shape))
    ch, where = int(index[0]), tuple(int(i) for i in index[1:])
    cell = (where[0], where[1]) if len(where) == 2 else None
    return [Term(ch, _at(x, ch, cell), cell)]


def _terms(run: _Run, k: int, c: int, pos: tuple[int, int] | None
           ) -> tuple[float, list[Term], _Taps | None]:
    """Op k's unit as (bias, terms, a conv's taps)."""
    op = run.ops[k]
    m, n = op.what, op.node
    x, y = run.outs[op.inputs[0]] if op.inputs else None, run.outs[k]
    if m in _ADD:  # every branch a term, same channel and position; a number is a bias
        branches = [a for a in n.args if isinstance(a, fx.Node)]
        bias = sum(float(a) for a in n.args if isinstance(a, (int, float)))
        return bias, [Term(c, _at(run.outs[run.of(a)], c, pos), pos, run.name(run.of(a)))
                      for a in branches], None
    if m is torch.cat:
        for a in arg(n, 0, "tensors", []):
            width = run.outs[run.of(a)].shape[0]
            if c < width:
                return 0.0, [Term(c, _at(run.outs[run.of(a)], c, pos), pos,
                                  run.name(run.of(a)))], None
            c -= width
        raise AssertionError("a channel beyond the concatenation")
    assert x is not None
    bias, terms, taps = 0.0, list[Term](), None
    if isinstance(m, nn.Conv2d):
        assert pos is not None
        bias, terms, taps = _conv(m, x, c, pos)
    elif isinstance(m, nn.Linear):
        bias, terms = _linear(m, x, c)
    elif isinstance(m, nn.BatchNorm2d):
        bias, terms = _batchnorm(m, x, c, pos)
    elif isinstance(m, _GATES) or m in _RELU:
        terms = [Term(c, _at(y, c, pos), pos)]
    elif isinstance(m, nn.MaxPool2d):
        assert pos is not None
        flat = int(switches(m, x[c:c + 1])[0, pos[0], pos[1]])
        at = (flat // x.shape[-1], flat % x.shape[-1])
        terms = [Term(c, _at(x, c, at), at)]
    elif isinstance(m, nn.Flatten) or m is torch.flatten:
        terms = _flatten(x, c)
    else:
        assert pos is not None
        if isinstance(m, nn.AvgPool2d):
            (kh, kw), (sh, sw) = _pair(m.kernel_size), _pair(m.stride or m.kernel_size)
            terms = _window(x, c, range(pos[0] * sh, pos[0] * sh + kh),
                            range(pos[1] * sw, pos[1] * sw + kw))
        else:
            size = m.output_size if isinstance(m, nn.AdaptiveAvgPool2d) else \
                arg(n, 1, "output_size", None)
            terms = _adaptive(size, x, c, pos)
    source = run.name(op.inputs[0])
    return bias, [Term(t.channel, t.value, t.position, source) for t in terms], taps


def _windows(taps: _Taps, terms: list[Term]) -> list[Window]:
    prods, rows, cols, c0 = taps
    chosen = prods[[t.channel - c0 for t in terms]].tolist()  # one copy to the host a node
    return [Window(t.channel, rows, cols, w) for t, w in zip(terms, chosen, strict=True)]


def _node(run: _Run, k: int, c: int, pos: tuple[int, int] | None, level: int) -> Node:
    """The node of op k's output (k = -1: the image) at `level` (weighted nodes and pixels
    counted from 1 at the root)."""
    value = _at(run.outs[k], c, pos)
    if k < 0:
        return Node(INPUT, c, pos, value, 0.0, [Term(c, value, pos)], INPUT)
    op = run.ops[k]
    bias, terms, taps = _terms(run, k, c, pos)
    terms = _sorted(terms)
    weighted = isinstance(op.what, _WEIGHTED)
    # a weighted node's largest terms; at the pixels every colour channel
    largest = terms if terms and terms[0].source == INPUT else terms[:run.top]
    node = Node(op.name, c, pos, value, bias, terms, op.kind,
                windows=[] if taps is None else _windows(taps, largest))
    below = level + 1 if weighted else level
    if below > run.depth:
        return node
    if weighted:
        chosen = largest
    elif op.what in _ADD:  # every branch
        chosen = terms
    else:
        chosen = terms[:1]
    node.children = [_node(run, run.by_name[t.source], t.channel, t.position, below)
                     for t in chosen]
    return node


def explain(model: nn.Module, image: Tensor, unit: Unit, depth: int = 3, top: int = 3,
            traced: tuple[list[Op], int] | None = None) -> Node:
    """The tree of `unit` on one image `(C, H, W)`: its value as an exact sum, followed down the
    `top` largest terms of each conv and linear node for `depth` levels.

    Without a position, a unit of a (C, H, W) output is at its channel's strongest position
    (the first maximum). Values are the model's own activations (its dtype, at least float32
    for the terms); the model runs in eval mode, its state given back. `traced`:
    `explainable(model, unit)` of the eval-mode model, made once for many images and units of
    one module (tracing costs about a sixth of a tree).

    Raises:
        ConvmapsError: the model does not trace, an operation on the way cannot be taken
            apart, or depth or top is below 1.
    """
    if depth < 1 or top < 1:
        raise ConvmapsError(f"--depth and --top must be at least 1 (got {depth}, {top})")
    training = model.training
    model.eval()
    try:
        ops, k = traced if traced is not None else explainable(model, unit)  # the eval graph
        with torch.no_grad():
            # A fresh copy: a batch row's view sits at another alignment, and BLAS may round
            # differently there, so an image's tree would depend on its batch.
            full = graph.run(ops, image.detach().clone().unsqueeze(0), upto=k)
            outs = {i: t[0] for i, t in full.items()}
            out = outs[k]
            pos = unit.position
            if pos is None and out.dim() == 3:
                flat = int(out[unit.channel].flatten().argmax())  # the first maximum
                pos = (flat // out.shape[-1], flat % out.shape[-1])
            return _node(_Run(ops, outs, depth, top), k, unit.channel, pos, 1)
    finally:
        model.train(training)
