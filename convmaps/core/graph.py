"""A model's forward pass as the operations `torch.fx` traces, in the order they run: what
`explain` takes apart and incremental occlusion walks. Chains, ResNets (residual adds),
GoogLeNet and DenseNet (concatenations) and MobileNets trace; a model whose forward branches
on its input's values does not, and is refused in one line.

    >>> import torch
    >>> from convmaps.core.models import lenet5
    >>> net = lenet5().eval()
    >>> found = ops(net, "explain")
    >>> [op.name for op in found][:3], ends(found)["C3"]
    (['C1', 'relu1', 'S2'], 3)
    >>> outs = run(found, torch.zeros(1, 1, 28, 28))
    >>> tuple(outs[result(found)].shape)
    (1, 10)
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, fx, nn

from convmaps.errors import ConvmapsError

__all__ = ["Op", "ancestors", "arg", "call", "ends", "inplace", "last_inside", "ops", "reread",
           "result", "run"]


@dataclass
class Op:
    """One operation of the traced forward pass."""

    name: str  # a module's name (name@k for its k-th call again), else the graph node's name
    what: Any  # the module, the function, or the method's name
    node: fx.Node
    inputs: list[int]  # the ops it reads (-1: the image)
    stack: tuple[str, ...]  # the modules it runs inside, outermost first (itself included)
    value: Any = None  # a get_attr's attribute (a constant tensor the forward reads)

    @property
    def kind(self) -> str:
        if isinstance(self.what, nn.Module):
            return type(self.what).__name__
        return str(getattr(self.what, "__name__", self.what))


def ops(model: nn.Module, who: str) -> list[Op]:
    """The model's forward pass as operations in the order they run (traced in the mode the
    model is in: eval, for what convmaps does).

    Raises:
        ConvmapsError: `torch.fx` cannot trace it, or its forward takes more than one input
            (the message starts with `who`, the command).
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # tracing runs the model's own Python: anything may go wrong
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvmapsError(f"{who}: {type(model).__name__} cannot be traced into a graph "
                            f"by torch.fx ({reason[:120]})") from None
    index: dict[fx.Node, int] = {}
    found: list[Op] = []
    calls: Counter[str] = Counter()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if index:
                raise ConvmapsError(f"{who}: {type(model).__name__}'s forward takes more "
                                    "than one input")
            index[n] = -1
            continue
        if n.op == "output":
            continue
        name, what, value = n.name, n.target, None
        if n.op == "call_module":
            k = calls[n.target]
            calls[n.target] += 1
            name = n.target if k == 0 else f"{n.target}@{k}"
            what = model.get_submodule(n.target)
        elif n.op == "get_attr":
            what = f"attribute {n.target}"
            value = functools.reduce(getattr, n.target.split("."), gm)
        stack = tuple(n.meta.get("nn_module_stack", {}))
        if n.op == "call_module" and n.target not in stack:
            stack += (n.target,)
        index[n] = len(found)
        found.append(Op(name, what, n, [index[a] for a in n.all_input_nodes], stack, value))
    return found


def ancestors(found: Sequence[Op], k: int) -> list[int]:
    """The ops op k depends on, k included, in order."""
    seen, todo = {k}, [k]
    while todo:
        for i in found[todo.pop()].inputs:
            if i >= 0 and i not in seen:
                seen.add(i)
                todo.append(i)
    return sorted(seen)


def ends(found: Sequence[Op]) -> dict[str, int]:
    """Module name -> the op whose output is that module's output: the last op run inside it
    (a container's last; a module called twice, its last call)."""
    return last_inside([op.stack for op in found])


def last_inside(stacks: Sequence[Sequence[str]]) -> dict[str, int]:
    """Module name -> the last step that runs inside it, given each step's enclosing modules."""
    return {m: i for i, stack in enumerate(stacks) for m in stack}


def result(found: Sequence[Op]) -> int | None:
    """The op whose output the forward pass returns; None when it returns anything else (a
    tuple, the input)."""
    if not found:
        return None
    out = next(n for n in found[0].node.graph.nodes if n.op == "output").args[0]
    return next((i for i, op in enumerate(found) if op.node is out), None)


def arg(node: fx.Node, i: int, key: str, default: Any) -> Any:
    """A call's argument, given by position `i` or by name `key`."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


def inplace(op: Op) -> bool:
    """Whether the op writes over its input: an `inplace` flag (AlexNet's and VGG's ReLUs,
    GoogLeNet's F.relu), or torch's trailing underscore (`x.relu_()`, `torch.relu_`,
    `x.add_(y)`)."""
    if getattr(op.what, "inplace", False) or op.node.kwargs.get("inplace", False):
        return True
    name = op.node.target if op.node.op == "call_method" else \
        getattr(op.what, "__name__", "") if op.node.op == "call_function" else ""
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def reread(found: Sequence[Op]) -> int | None:
    """The first in-place op whose input a later op reads again (eager mode would hand that op
    the overwritten values, which a graph run that keeps every output does not); None when
    there is none (torchvision's models)."""
    readers: dict[int, list[int]] = {}
    for i, op in enumerate(found):
        for j in op.inputs:
            readers.setdefault(j, []).append(i)
    for i, op in enumerate(found):
        if inplace(op) and op.inputs and any(r > i for r in readers[op.inputs[0]]):
            return i
    return None


def run(found: Sequence[Op], x: Tensor, upto: int | None = None) -> dict[int, Tensor]:
    """Every op's output on `x` (the batch), or only those op `upto` depends on; -1: `x`.
    An in-place op reads a copy, so each output is kept as it was made."""
    index = {op.node: i for i, op in enumerate(found)}
    outs = {-1: x}
    for i in range(len(found)) if upto is None else ancestors(found, upto):
        op = found[i]
        copy = inplace(op)

        def read(a: fx.Node, copy: bool = copy) -> Tensor:
            t = outs[index.get(a, -1)]
            return t.clone() if copy else t

        outs[i] = call(op, fx.node.map_arg(op.node.args, read),
                       fx.node.map_arg(op.node.kwargs, read))
    return outs


def call(op: Op, args: Any, kwargs: Any) -> Any:
    """Op run on these arguments (a module, a function, or a method of the first)."""
    if op.node.op == "get_attr":
        return op.value
    if op.node.op == "call_method":
        return getattr(args[0], op.node.target)(*args[1:], **kwargs)  # type: ignore[arg-type]
    return op.what(*args, **kwargs)
