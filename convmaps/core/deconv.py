"""Projections: one unit's signal carried back down to the input image.

A *unit* is one value of a module's output (a channel at a position, or one entry of a 1-D
output). Its projection puts 1.0 at the unit, zero elsewhere in that module's output, and
carries this seed down to the input through each module's backward rule. Conv and linear use
their transposed weights (never the bias), max-pools send the signal to their switches (adding
where overlapping windows chose the same pixel), average pools spread it, eval BatchNorm
scales it, dropout passes it. ReLUs follow the mode:

- `gradient`: mask by the sign of the ReLU's forward input: exactly `torch.autograd.grad`.
- `deconvnet` (Zeiler & Fergus 2014): rectify the signal itself, whatever the forward did.
- `guided` (Springenberg et al. 2015): both.

Two independent implementations compute this. The *chain* is the textbook DeconvNet for
sequential models (LeNet, AlexNet, VGG): record each module's input and switches on the way
up, then go down module by module with explicit transposed operations. The *autograd* path
works for any model: autograd, with every ReLU call (module or functional, in-place or reused)
replaced during the forward pass by a function whose backward is the mode's rule. Both project
many units with one forward pass per image and one batched backward pass.

    >>> import torch
    >>> from convmaps.core.models import lenet5
    >>> net = lenet5().eval()
    >>> image = torch.rand(1, 28, 28)
    >>> shapes = output_shapes(net, (1, 28, 28))
    >>> units = [parse_unit("C3:4", net, shapes), parse_unit("OUTPUT:7", net, shapes)]
    >>> [tuple(p.map.shape) for p in project(net, image, units, Mode.guided)]
    [(1, 28, 28), (1, 28, 28)]
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from convmaps.core import chain
from convmaps.core.capture import select, trace
from convmaps.core.fields import _pair
from convmaps.core.pooling import switches
from convmaps.core.ranking import crop
from convmaps.errors import ConvmapsError
from convmaps.options import Mode

__all__ = [
    "Method",
    "Mode",
    "Projection",
    "Unit",
    "project_batch",
    "output_shapes",
    "parse_unit",
    "project",
    "project_each",
    "project_jobs",
]


class Method(StrEnum):
    """Which implementation computes projections: `chain` (sequential models only),
    `autograd` (any model), or `auto` (the chain where the model is one)."""

    auto = "auto"
    chain = "chain"
    autograd = "autograd"


@dataclass(frozen=True)
class Unit:
    """One value of a module's output: `channel` at `position` (y, x) for a (C, H, W) output,
    where `position=None` means the channel's strongest position in each image; or entry
    `channel` of a 1-D output (position None)."""

    module: str
    channel: int
    position: tuple[int, int] | None = None

    def __str__(self) -> str:
        at = f"@{self.position[0]},{self.position[1]}" if self.position is not None else ""
        return f"{self.module}:{self.channel}{at}"


@dataclass(frozen=True)
class Projection:
    """A unit's projection for one image: where the unit was (None for 1-D outputs), its forward
    value, and the map `(C_in, H, W)` in the input tensor's space and dtype.

    A trimmed projection (`trim=True`) holds only the unit's window, `(C_in, h, w)` with its
    top-left at `origin` in the input (negative, or reaching past the far edges, where the
    window does; zero there); the projection is zero outside it. Otherwise origin is (0, 0).
    """

    unit: Unit
    position: tuple[int, int] | None
    value: float
    map: torch.Tensor = field(repr=False)
    origin: tuple[int, int] = (0, 0)


# ---------------------------------------------------------------------------------- units


def _floating(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def output_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Every module's per-image output shape for an input of `input_shape` (C, H, W), from one
    forward pass on zeros. A module that runs k > 1 times also has keys `name@1` … `name@k-1`."""
    names = [name for name, _ in model.named_modules() if name]
    x = torch.zeros((1, *input_shape), dtype=_floating(model))
    return {k: tuple(v.shape[1:]) for k, v in trace(model, x, names).outputs.items()}


def _check_unit(unit: Unit, shape: tuple[int, ...], text: str) -> None:
    """Raises ConvmapsError when `unit` does not fit an output of per-image `shape`."""
    where = f"unit {text!r}: {unit.module} has output {shape}"
    if len(shape) == 1:
        if unit.position is not None:
            raise ConvmapsError(
                f"{where}, which is 1-D; write {unit.module}:I, I in 0-{shape[0] - 1}"
            )
        if not 0 <= unit.channel < shape[0]:
            raise ConvmapsError(f"{where}; the index must be in 0-{shape[0] - 1}")
        return
    if len(shape) != 3:
        raise ConvmapsError(f"{where}; units need a (C, H, W) or 1-D output")
    c, h, w = shape
    if not 0 <= unit.channel < c:
        raise ConvmapsError(f"{where}; the channel must be in 0-{c - 1}")
    if unit.position is not None:
        y, x = unit.position
        if not (0 <= y < h and 0 <= x < w):
            raise ConvmapsError(
                f"{where}; position ({y}, {x}) is outside it: y must be in 0-{h - 1}, "
                f"x in 0-{w - 1}"
            )


def parse_unit(text: str, model: nn.Module, out_shapes: Mapping[str, Sequence[int]]) -> Unit:
    """A UNIT (`MODULE:C`, `MODULE:C@Y,X`, or `MODULE:I` for a 1-D output) checked against the
    module's output shape. MODULE is a qualified name or a SPEC index.

    Args:
        out_shapes: per-image output shapes by module name, as `output_shapes` gives them.

    Raises:
        ConvmapsError: a malformed unit, a module that is not exactly one module, runs more than
            once per forward pass, or a channel or position out of range (the range is named).
    """
    m = re.fullmatch(r"\s*([^:\s]+)\s*:\s*(\d+)\s*(?:@\s*(\d+)\s*,\s*(\d+)\s*)?", text)
    if not m:
        raise ConvmapsError(
            f"unit {text!r} is not MODULE:C, MODULE:C@Y,X or MODULE:I (e.g. features.10:5@3,4)"
        )
    modules = dict(model.named_modules())
    if m[1] in modules:  # a name first: ResNet's module `relu` is also a SPEC type word
        name = m[1]
    else:
        layers = select(model, m[1], flag="--unit")
        if len(layers) != 1:
            raise ConvmapsError(
                f"unit {text!r}: {m[1]!r} names {len(layers)} modules "
                f"({', '.join(x.name for x in layers[:5])}…); name one"
            )
        name = layers[0].name
    if f"{name}@1" in out_shapes:
        raise ConvmapsError(
            f"unit {text!r}: {name} runs more than once per forward pass, so its output is "
            "ambiguous; name a module that runs once"
        )
    if name not in out_shapes:
        raise ConvmapsError(f"unit {text!r}: {name} gives no tensor output")
    position = (int(m[3]), int(m[4])) if m[3] is not None else None
    unit = Unit(name, int(m[2]), position)
    _check_unit(unit, tuple(out_shapes[name]), text)
    return unit


# ------------------------------------------------------------------------ shared pieces


def _relu_rule(mode: Mode, signal: torch.Tensor, positive: torch.Tensor | None) -> torch.Tensor:
    """A ReLU's backward rule; `positive` is `forward input > 0` (broadcastable to `signal`),
    which deconvnet does not read (None will do)."""
    if mode == Mode.deconvnet:
        return signal.clamp(min=0)
    assert positive is not None
    if mode == Mode.gradient:
        return torch.where(positive, signal, 0)
    return torch.where(positive, signal.clamp(min=0), 0)


def _call(module: nn.Module, x: torch.Tensor) -> Any:
    """`module(x)` in x's dtype and device: floating parameters and buffers are cast for the call
    only (no copy when they already match), so the module itself is never changed."""
    cast = {
        k: v.to(x.device, x.dtype) if v.is_floating_point() else v.to(x.device)
        for k, v in [*module.named_parameters(), *module.named_buffers()]
    }
    if all(cast[k] is v for k, v in [*module.named_parameters(), *module.named_buffers()]):
        return module(x)
    return functional_call(module, cast, (x,))


@dataclass
class _Slot:
    """One job in a chunk: projection number `job` of unit `unit`, in round `r` of the batched
    backward pass, for image `m` of the chunk's images."""

    job: int
    r: int
    m: int
    unit: Unit
    # filled in by _resolve on the unit module's output:
    index: tuple[int, ...] = ()  # the unit's index in one image's output
    position: tuple[int, int] | None = None
    value: float = math.nan


@dataclass
class _Chunk:
    images: list[int]  # indices of the images this chunk runs forward
    rounds: int  # seeds per image; the backward pass is batched over them
    slots: list[_Slot]


def _plan(jobs: Sequence[tuple[int, Unit]], batch_size: int, whole: bool = False
          ) -> list[_Chunk]:
    """Group jobs so each chunk runs its images forward once and all its seeds backward at once,
    with rounds * images <= batch_size (that product bounds the backward pass's memory). With
    `whole`, every job of an image goes in one chunk of at most batch_size images: the windowed
    chain goes down in slices of batch_size seeds, so each image runs forward once."""
    by_image: dict[int, list[int]] = {}
    for j, (image, _) in enumerate(jobs):
        by_image.setdefault(image, []).append(j)
    if whole:
        items = list(by_image.items())
        return [_chunk(items[i:i + batch_size], jobs) for i in range(0, len(items), batch_size)]
    pieces = [
        (image, js[i : i + batch_size])
        for image, js in by_image.items()
        for i in range(0, len(js), batch_size)
    ]
    chunks: list[_Chunk] = []
    group: list[tuple[int, list[int]]] = []
    for piece in pieces:
        rounds = max([len(piece[1]), *(len(js) for _, js in group)])
        if group and rounds * (len(group) + 1) > batch_size:
            chunks.append(_chunk(group, jobs))
            group = []
        group.append(piece)
    if group:
        chunks.append(_chunk(group, jobs))
    return chunks


def _chunk(group: list[tuple[int, list[int]]], jobs: Sequence[tuple[int, Unit]]) -> _Chunk:
    slots = [
        _Slot(j, r, m, jobs[j][1]) for m, (_, js) in enumerate(group) for r, j in enumerate(js)
    ]
    return _Chunk([image for image, _ in group], max(len(js) for _, js in group), slots)


def _resolve(out: torch.Tensor, slots: Sequence[_Slot]) -> None:
    """Fill in each slot's index, position and value from its module's output `out` (M, ...).
    Without a given position: the channel's maximum over space, ties to the first (flat) one."""
    for slot in slots:
        unit = slot.unit
        _check_unit(unit, tuple(out.shape[1:]), str(unit))
        position = unit.position
        if out.dim() == 2:
            slot.index = (unit.channel,)
        else:
            if position is None:
                plane = out[slot.m, unit.channel]
                flat = int(plane.flatten().argmax())  # argmax gives the first maximal index
                position = divmod(flat, plane.shape[1])
            slot.index = (unit.channel, *position)
        slot.position = position
        slot.value = float(out.detach()[(slot.m, *slot.index)])


def _seed(out: torch.Tensor, slots: Sequence[_Slot], rounds: int, first: int = 0
          ) -> torch.Tensor:
    """1.0 at each slot's unit in a zero `(rounds, *out.shape)` tensor, for the slots of rounds
    first .. first+rounds-1; `slots` are resolved."""
    seed = out.new_zeros((rounds, *out.shape))
    for slot in slots:
        if first <= slot.r < first + rounds:
            seed[(slot.r - first, slot.m, *slot.index)] = 1.0
    return seed


# --------------------------------------------------------------------- (a) the chain


_CHAIN_TYPES = (
    nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.BatchNorm2d, nn.Dropout, nn.Identity, nn.Flatten,
)


def _chain_steps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model as the list of modules its forward pass runs one after the other.

    Raises:
        ConvmapsError: the model is not such a chain, or a module has no DeconvNet rule here.
    """
    try:
        steps = chain.steps(model)
    except ConvmapsError as e:
        raise ConvmapsError(f"{e}; use the autograd method") from None
    for name, module in steps:
        if not isinstance(module, _CHAIN_TYPES) or not _chain_rule_exists(module):
            raise ConvmapsError(
                f"{name} ({type(module).__name__}) has no rule in the DeconvNet chain; "
                "use the autograd method"
            )
    return steps


def _chain_rule_exists(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if isinstance(module, nn.AvgPool2d):
        return module.padding in (0, (0, 0)) and not module.ceil_mode and \
            module.divisor_override is None
    if isinstance(module, nn.BatchNorm2d):
        return module.running_var is not None
    if isinstance(module, nn.Flatten):
        return module.start_dim != 0
    return True


def _mean_matrix(starts: Sequence[int], ends: Sequence[int], n_in: int,
                 like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in): row i averages input cells starts[i] .. ends[i]-1 (1-D pooling)."""
    mat = like.new_zeros((len(starts), n_in))
    for i, (a, b) in enumerate(zip(starts, ends, strict=True)):
        mat[i, a:b] = 1.0 / (b - a)
    return mat


def _spread(signal: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Average pooling's transpose: a 2-D mean over a rectangle is the row mean of column means,
    so each output cell's signal goes back to its window by the two 1-D matrices."""
    return torch.einsum("...ij,ih,jw->...hw", signal, rows, cols)


def _unpool_add(signal: torch.Tensor, switches_: torch.Tensor, in_hw: Sequence[int]
                ) -> torch.Tensor:
    """Each pooled value's signal goes to the input pixel its switch names; where overlapping
    windows chose the same pixel, their signals add (max_unpool2d would keep only one, pytorch
    issue 80827). `signal` (R, M, C, h, w), `switches_` (M, C, h, w) flat per plane."""
    r, m, c = signal.shape[:3]
    index = switches_.flatten(2).expand(r, m, c, -1)
    out = signal.new_zeros((r, m, c, in_hw[0] * in_hw[1]))
    return out.scatter_add_(3, index, signal.flatten(3)).view(r, m, c, *in_hw)


def _down(module: nn.Module, signal: torch.Tensor, in_shape: Sequence[int],
          state: torch.Tensor | None, mode: Mode) -> torch.Tensor:
    """One step of the DeconvNet down pass: `signal` (R, M, *module output) -> (R, M, *input).

    `in_shape` is the module's input shape (M, ...); `state` what the up pass recorded: the
    ReLU's `input > 0`, or the max-pool's switches.
    """
    r, m = signal.shape[:2]
    like = signal
    if isinstance(module, nn.Conv2d):
        weight = module.weight.to(like)
        stride, dil = _pair(module.stride), _pair(module.dilation)
        pad = _pair(module.padding)  # _chain_rule_exists keeps str padding ('same') out
        k = weight.shape[-2:]
        # The transposed conv gives (out-1)*s - 2p + d(k-1) + 1 rows; a stride that does not
        # divide evenly left rows the forward pass never read (AlexNet conv1: 224 -> 55 -> 223)
        extra = [
            in_shape[2 + i] - ((signal.shape[3 + i] - 1) * stride[i] - 2 * pad[i]
                               + dil[i] * (k[i] - 1) + 1)
            for i in range(2)
        ]
        out = F.conv_transpose2d(signal.flatten(0, 1), weight, None, stride, pad, tuple(extra),
                                 module.groups, dil)
        return out.view(r, m, *out.shape[1:])
    if isinstance(module, nn.Linear):
        return signal @ module.weight.to(like)
    if isinstance(module, nn.ReLU):
        assert state is not None
        return _relu_rule(mode, signal, state)
    if isinstance(module, nn.MaxPool2d):
        assert state is not None
        return _unpool_add(signal, state, in_shape[-2:])
    if isinstance(module, nn.AdaptiveAvgPool2d):
        size = signal.shape[-2:]
        mats = []
        for n_in, n_out in zip(in_shape[-2:], size, strict=True):
            starts = [(i * n_in) // n_out for i in range(n_out)]
            ends = [-((-(i + 1) * n_in) // n_out) for i in range(n_out)]  # ceil
            mats.append(_mean_matrix(starts, ends, n_in, like))
        return _spread(signal, *mats)
    if isinstance(module, nn.AvgPool2d):
        kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        mats = [
            _mean_matrix([i * stride[d] for i in range(n_out)],
                         [i * stride[d] + kernel[d] for i in range(n_out)], n_in, like)
            for d, (n_in, n_out) in enumerate(zip(in_shape[-2:], signal.shape[-2:], strict=True))
        ]
        return _spread(signal, *mats)
    if isinstance(module, nn.BatchNorm2d):
        var = module.running_var.to(like)  # type: ignore[union-attr]
        scale = torch.rsqrt(var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.to(like)
        return signal * scale[:, None, None]
    if isinstance(module, nn.Flatten):
        return signal.reshape(r, m, *in_shape[1:])
    return signal  # Dropout (eval) and Identity pass the signal unchanged


_Placed = tuple[torch.Tensor, tuple[int, int]]  # a slot's map and its top-left in the input


def _chain_chunk(model: nn.Module, x: torch.Tensor, chunk: _Chunk, mode: Mode,
                 windowed: bool = True, batch_size: int | None = None) -> list[_Placed]:
    """DeconvNet by hand: each slot's map (C, h, w) and its top-left in the input, in
    `chunk.slots` order; resolves the slots. With `windowed`, units of (C, H, W) outputs go down
    on their windows only (`_down_windows`); the others, or all without it, over whole maps.
    The down pass takes at most `batch_size` seeds (default: all of them) at a time."""
    steps = _chain_steps(model)
    ends = chain.ends(steps)
    at: dict[int, list[_Slot]] = {}
    for slot in chunk.slots:
        if slot.unit.module not in ends:
            raise ConvmapsError(f"unit {slot.unit}: {slot.unit.module} is not in the chain")
        at.setdefault(ends[slot.unit.module], []).append(slot)
    last = max(at)
    # Up: run the modules in order, keeping what the down pass needs: each input's shape, each
    # ReLU's input sign and each max-pool's switches (taken before an in-place ReLU overwrites
    # its input), and each unit's resolved slot and output.
    records: list[tuple[torch.Size, torch.Tensor | None]] = []
    taps: list[_Taps | None] = []  # how each step's windows map down; None: not followed
    outs: dict[int, torch.Tensor] = {}  # step -> output, for units the whole maps carry down
    windows: dict[int, int] = {}  # step -> output channels, for units carried on windows
    with torch.no_grad():
        for i, (_, module) in enumerate(steps[: last + 1]):
            state = None
            if isinstance(module, nn.ReLU):
                state = x > 0
            elif isinstance(module, nn.MaxPool2d):
                state = switches(module, x)
            records.append((x.shape, state))
            in_shape = x.shape
            x = _call(module, x)
            if isinstance(x, tuple):
                x = x[0]
            taps.append(_taps(module, in_shape, x.shape))
            if i in at:
                _resolve(x, at[i])
                if windowed and all(t is not None for t in taps):
                    windows[i] = x.shape[1]
                else:
                    outs[i] = x
        placed: dict[int, _Placed] = {}  # id(slot) -> result
        size = batch_size or len(chunk.slots)
        for i, channels in windows.items():
            for j in range(0, len(at[i]), size):
                slots = at[i][j:j + size]
                maps, origins = _down_windows(steps, records, taps, slots, i, channels, mode, x)
                for slot, one, origin in zip(slots, maps, origins.tolist(), strict=True):
                    placed[id(slot)] = (one, (origin[0], origin[1]))
        if outs:
            # Down: from the deepest unit to the input, adding each unit's seed at its module;
            # rounds * images stay within batch_size
            rounds = max(1, size // len(chunk.images))
            for first in range(0, chunk.rounds, rounds):
                top = max(outs)
                signal = _seed(outs[top], at[top], rounds, first)
                for i in range(top, -1, -1):
                    if i != top and i in outs:
                        signal = signal + _seed(outs[i], at[i], rounds, first)
                    in_shape, state = records[i]
                    signal = _down(steps[i][1], signal, in_shape, state, mode)
                for slot in (s for i in outs for s in at[i] if first <= s.r < first + rounds):
                    placed[id(slot)] = (signal[slot.r - first, slot.m], (0, 0))
    return [placed[id(slot)] for slot in chunk.slots]


# ----------------------------------------------------------- (a') the chain on windows
#
# A unit's projection is zero outside its *window*: at its own module's output the unit alone;
# one step down, the input positions its window reads; and so on to the input. Every step of
# a conv/pool chain maps an output window [o, o+h) to the input window [o*s - p, o*s - p +
# (h-1)*s + d*(k-1) + 1) per axis: the same size for every unit of a module, so the units of a
# chunk go down together as (S, C, h, w) with an origin each. Where a window reaches past the
# map (padding) the signal is set to zero, which is what the whole-map pass drops there. This
# is receptive-field arithmetic, as in `fields`, but relative to the unit's module, at every
# step: fields() gives module outputs in input pixels only, so the steps are composed here.

_Taps = chain.Window
_SAME: _Taps = ((1, 1, 0, 1), (1, 1, 0, 1))


def _taps(module: nn.Module, in_shape: Sequence[int], out_shape: Sequence[int]) -> _Taps | None:
    """Per axis (kernel, stride, padding, dilation): output position o reads input positions
    o*stride - padding + t*dilation, t < kernel. None: a step windows do not follow (flatten,
    linear, adaptive pools of uneven windows), or one that is not (M, C, H, W) -> (M, C, h, w)."""
    if len(in_shape) != 4 or len(out_shape) != 4:
        return None
    if isinstance(module, (nn.ReLU, nn.BatchNorm2d, nn.Dropout, nn.Identity)):
        return _SAME
    if (axes := chain.window(module)) is not None:  # conv, max and average pools
        return axes
    if isinstance(module, nn.AdaptiveAvgPool2d):
        n_in, n_out = in_shape[-2:], out_shape[-2:]
        if all(a % b == 0 for a, b in zip(n_in, n_out, strict=True)):  # plain windows
            k0, k1 = n_in[0] // n_out[0], n_in[1] // n_out[1]
            return ((k0, k0, 0, 1), (k1, k1, 0, 1))
    return None


def _inside(origin: torch.Tensor, size: tuple[int, int], hw: Sequence[int]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each window's rows and columns (S, h) and (S, w), and where it lies inside an (H, W)
    map: bool (S, 1, h, w)."""
    rows = origin[:, :1] + torch.arange(size[0], device=origin.device)
    cols = origin[:, 1:] + torch.arange(size[1], device=origin.device)
    inside = ((rows >= 0) & (rows < hw[0]))[:, None, :, None] & \
        ((cols >= 0) & (cols < hw[1]))[:, None, None, :]
    return rows, cols, inside


def _window(t: torch.Tensor, m: torch.Tensor, origin: torch.Tensor, size: tuple[int, int]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Window `origin` + `size` of image m[i] of `t` (M, C, H, W) for each i: (S, C, h, w), and
    where it lies inside the map (outside, the values are the edge's: mask them)."""
    h, w = t.shape[-2:]
    rows, cols, inside = _inside(origin, size, (h, w))
    got = t[m[:, None, None], :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None]]
    # advanced indices come first, (S, h, w, C); contiguous again, as the convolutions want
    return got.permute(0, 3, 1, 2).contiguous(), inside


def _down_windows(steps: Sequence[tuple[str, nn.Module]],
                  records: Sequence[tuple[torch.Size, torch.Tensor | None]],
                  taps: Sequence[_Taps | None], slots: Sequence[_Slot], end: int,
                  channels: int, mode: Mode, like: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The down pass of `slots` (resolved units of step `end`'s (C, H, W) output) on their
    windows: maps (S, C_in, h, w), zero outside the image, and their origins (S, 2) (y, x)."""
    device = like.device
    m = torch.tensor([s.m for s in slots], device=device)
    origin = torch.tensor([s.position for s in slots], device=device)
    signal = like.new_zeros((len(slots), channels, 1, 1))
    signal[torch.arange(len(slots)), [s.unit.channel for s in slots]] = 1.0
    for i in range(end, -1, -1):
        module = steps[i][1]
        in_shape, state = records[i]
        t = taps[i]
        assert t is not None
        h, w = signal.shape[-2:]
        size = ((h - 1) * t[0][1] + t[0][3] * (t[0][0] - 1) + 1,
                (w - 1) * t[1][1] + t[1][3] * (t[1][0] - 1) + 1)
        below = origin * torch.tensor([t[0][1], t[1][1]], device=device) - \
            torch.tensor([t[0][2], t[1][2]], device=device)
        signal = _down_window(module, t, signal, origin, below, size, in_shape, state, m, mode)
        origin = below
    return signal, origin


def _down_window(module: nn.Module, t: _Taps, signal: torch.Tensor, origin: torch.Tensor,
                 below: torch.Tensor, size: tuple[int, int], in_shape: Sequence[int],
                 state: torch.Tensor | None, m: torch.Tensor, mode: Mode) -> torch.Tensor:
    """`_down` on windows: `signal` (S, C, h, w) at `origin` of the module's output -> (S, C_in,
    *size) at `below` of its input, zero outside the input map; `t` is the module's `_taps`."""
    if isinstance(module, nn.ReLU):
        positive = None
        if mode != Mode.deconvnet:  # deconvnet ignores the forward sign
            assert state is not None
            positive = _window(state, m, origin, size)[0]
        return _relu_rule(mode, signal, positive)  # outside the map the signal is zero already
    if isinstance(module, nn.BatchNorm2d):
        return _down(module, signal[None], in_shape, state, mode)[0]
    if isinstance(module, (nn.Dropout, nn.Identity)):
        return signal
    if isinstance(module, nn.MaxPool2d):
        assert state is not None
        picked, inside = _window(state, m, origin, (signal.shape[-2], signal.shape[-1]))
        width = in_shape[-1]
        local = (picked // width - below[:, 0, None, None, None]) * size[1] + \
            picked % width - below[:, 1, None, None, None]
        local = torch.where(inside, local, 0)  # outside the map the signal is zero
        s, c = signal.shape[:2]
        out = signal.new_zeros((s, c, size[0] * size[1]))
        return out.scatter_add_(2, local.flatten(2), signal.flatten(2)).view(s, c, *size)
    if isinstance(module, nn.Conv2d):
        weight, groups = module.weight.to(signal), module.groups
        stride, dilation = _pair(module.stride), _pair(module.dilation)
    else:  # average pools: a transposed conv of each channel with the window's mean
        groups = signal.shape[1]
        weight = signal.new_full((groups, 1, t[0][0], t[1][0]), 1 / (t[0][0] * t[1][0]))
        stride, dilation = (t[0][1], t[1][1]), (1, 1)
    out = _transposed(signal, weight, stride, dilation, groups)
    return torch.where(_inside(below, size, in_shape[-2:])[2], out, 0)


def _transposed(signal: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                dilation: tuple[int, int], groups: int) -> torch.Tensor:
    """`conv_transpose2d` without padding. A strided one runs as a stride-1 conv2d with one
    output channel per input channel and phase (y mod s, x mod s), put in place by a shuffle:
    on the CPU torch's own strided transposed conv took 3-4 times as long (AlexNet's conv1)."""
    if stride == (1, 1) or dilation != (1, 1) or groups != 1:
        return F.conv_transpose2d(signal, weight, None, stride, 0, 0, groups, dilation)
    c_out, c_in, k0, k1 = weight.shape
    (s0, s1), n, h, w = stride, signal.shape[0], signal.shape[2], signal.shape[3]
    j0, j1 = -(-k0 // s0), -(-k1 // s1)  # taps per phase
    # input row q*s + r gets tap j*s + r from signal row q - j: a full convolution per phase
    taps = F.pad(weight, (0, j1 * s1 - k1, 0, j0 * s0 - k0)).view(c_out, c_in, j0, s0, j1, s1)
    phases = taps.flip(2, 4).permute(1, 3, 5, 0, 2, 4).reshape(c_in * s0 * s1, c_out, j0, j1)
    out = F.conv2d(signal, phases, None, 1, (j0 - 1, j1 - 1))
    q0, q1 = out.shape[-2:]
    out = out.view(n, c_in, s0, s1, q0, q1).permute(0, 1, 4, 2, 5, 3).reshape(
        n, c_in, q0 * s0, q1 * s1)
    return out[..., :(h - 1) * s0 + k0, :(w - 1) * s1 + k1]


# ---------------------------------------------------------------------- (b) autograd


class _Rectifier(torch.autograd.Function):
    """A ReLU whose forward is the ReLU's own and whose backward is the mode's rule."""

    generate_vmap_rule = True  # the backward runs under torch.func.vmap, one seed per slice

    @staticmethod
    def forward(x: torch.Tensor, mode: Mode, inplace: bool) -> torch.Tensor:
        return torch.relu_(x) if inplace else torch.relu(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, ctx.mode, inplace = inputs
        if inplace:
            ctx.mark_dirty(x)
        # output > 0 exactly where the forward input was > 0; a mask of its own, so that later
        # in-place ops on the output cannot change it
        ctx.save_for_backward(output > 0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (positive,) = ctx.saved_tensors
        return _relu_rule(ctx.mode, grad, positive), None, None


def _relu_inplace(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
                  ) -> bool | None:
    """Whether a torch call is an in-place ReLU (True), another ReLU (False), or no ReLU."""
    if func is F.relu:
        return bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
    if func in (torch.relu_, torch.Tensor.relu_):
        return True
    if func in (torch.relu, torch.Tensor.relu):
        return False
    return None


class _RectifyReLUs(TorchFunctionMode):
    """While active, every ReLU call (nn.ReLU goes through F.relu; forward code may call F.relu,
    torch.relu, torch.relu_ or Tensor.relu_) becomes a `_Rectifier`. This replaces the function
    itself, so in-place and reused ReLUs need no special case (backward hooks on them are where
    other tools break)."""

    def __init__(self, mode: Mode) -> None:
        super().__init__()
        self.mode = mode

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        inplace = _relu_inplace(func, args, kwargs)
        if inplace is None:
            return func(*args, **kwargs)
        return _Rectifier.apply(args[0], self.mode, inplace)


class _Stop(Exception):
    """Ends the forward pass once every unit's module has run: nothing later matters."""


def _autograd_chunk(model: nn.Module, x: torch.Tensor, chunk: _Chunk, mode: Mode
                    ) -> list[_Placed]:
    """Autograd with rectified ReLUs: each slot's map (C, H, W) and origin (0, 0), in
    `chunk.slots` order; resolves the slots.

    One forward pass (`torch.func.vjp`), then the backward pass for all rounds of seeds at once
    (`torch.func.vmap` of the vjp, whose batching rules batch the convolutions' backward).
    """
    names = list(dict.fromkeys(slot.unit.module for slot in chunk.slots))
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or not n]
    if missing:
        raise ConvmapsError(f"no module named {', '.join(repr(n) for n in missing)}")

    def forward(inp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs: dict[str, torch.Tensor] = {}

        def hook(name: str) -> Any:
            def keep(module: nn.Module, args: Any, out: Any) -> Any:
                if name in outs:
                    return None  # a module that runs again: its first output is the unit's
                if not isinstance(out, torch.Tensor):
                    raise ConvmapsError(f"{name} gives no tensor output; units need one")
                outs[name] = out
                if len(outs) == len(names):
                    raise _Stop
                return out.clone()  # later in-place ops (a ReLU, `out += x`) change the copy

            return keep

        handles = [modules[n].register_forward_hook(hook(n)) for n in names]
        try:
            with _RectifyReLUs(mode):
                _call(model, inp.clone())  # a clone: an in-place first op must not hit `inp`
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(outs) != len(names):
            raise ConvmapsError(f"{', '.join(n for n in names if n not in outs)} did not run")
        return tuple(outs[n] for n in names)

    with torch.no_grad():  # torch.func differentiates anyway; no graph for the parameters
        outs, vjp = torch.func.vjp(forward, x)[:2]
        seeds = []
        for name, out in zip(names, outs, strict=True):
            slots = [s for s in chunk.slots if s.unit.module == name]
            _resolve(out, slots)
            seeds.append(_seed(out, slots, chunk.rounds))
        if chunk.rounds == 1:
            (grad,) = vjp(tuple(s[0] for s in seeds))
            grad = grad[None]
        else:
            (grad,) = torch.func.vmap(vjp)(tuple(seeds))
        return [(grad[s.r, s.m], (0, 0)) for s in chunk.slots]


# ------------------------------------------------------------------------ the driver


def _project_jobs(model: nn.Module, images: torch.Tensor, jobs: Sequence[tuple[int, Unit]],
                  mode: Mode, batch_size: int, method: Method, windowed: bool = True,
                  trim: bool = False) -> list[Projection]:
    mode, method = Mode(mode), Method(method)
    if batch_size < 1:
        raise ConvmapsError(f"batch_size must be at least 1, not {batch_size}")
    if not images.is_floating_point():
        raise ConvmapsError(f"images must be floating point, not {images.dtype}")
    if method == Method.auto:
        try:
            ends = chain.ends(_chain_steps(model))
            method = Method.chain if all(u.module in ends for _, u in jobs) else Method.autograd
        except ConvmapsError:
            method = Method.autograd
    results: list[Projection | None] = [None] * len(jobs)
    training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.inference_mode(False):
            by_chain = method == Method.chain
            for chunk in _plan(jobs, batch_size, whole=by_chain and windowed):
                x = images[chunk.images].clone()
                got = _chain_chunk(model, x, chunk, mode, windowed, batch_size) \
                    if method == Method.chain else _autograd_chunk(model, x, chunk, mode)
                for s, (one, origin) in zip(chunk.slots, got, strict=True):
                    if not trim and (origin != (0, 0) or one.shape[-2:] != images.shape[-2:]):
                        h, w = images.shape[-2:]  # the window put in place: zero elsewhere
                        one = crop(one, (-origin[0], -origin[1], h - origin[0], w - origin[1]),
                                   (h, w), 0.0)
                        origin = (0, 0)
                    results[s.job] = Projection(s.unit, s.position, s.value,
                                                one.detach().clone(), origin)
    finally:
        for module, flag in training:
            module.training = flag
    return [p for p in results if p is not None]


def project(model: nn.Module, image: torch.Tensor, units: Sequence[Unit],
            mode: Mode = Mode.deconvnet, batch_size: int = 32, method: Method = Method.auto,
            windowed: bool = True) -> list[Projection]:
    """Project each unit of one image (C, H, W) down to the input, in `units` order.

    One forward pass per `batch_size` units, and one batched backward pass for them; the
    computation runs in the image's dtype and device (parameters are cast for the call, so a
    float64 image gives float64 maps). The model is left as found; it runs in eval mode.

    Args:
        windowed: the chain carries each unit of a (C, H, W) output down on its window only
            (the positions its projection can reach at every step); False: over whole maps,
            the reference the windows are tested against. The autograd method ignores it.

    Raises:
        ConvmapsError: a unit that does not fit its module's output, or (method=chain) a model
            that is not a sequential chain.
    """
    if image.dim() != 3:
        raise ConvmapsError(f"project takes one image (C, H, W), not {tuple(image.shape)}")
    return _project_jobs(model, image[None], [(0, u) for u in units], mode, batch_size, method,
                         windowed)


def project_batch(model: nn.Module, images: torch.Tensor, units: Sequence[Unit],
                  mode: Mode = Mode.deconvnet, batch_size: int = 32,
                  method: Method = Method.auto, windowed: bool = True
                  ) -> list[list[Projection]]:
    """Project every unit of every image of `images` (N, C, H, W), as `project` does for one:
    a list per image, in `units` order."""
    if images.dim() != 4:
        raise ConvmapsError(f"project_batch takes images (N, C, H, W), not {tuple(images.shape)}")
    jobs = [(i, u) for i in range(len(images)) for u in units]
    got = _project_jobs(model, images, jobs, mode, batch_size, method, windowed)
    return [got[i * len(units):(i + 1) * len(units)] for i in range(len(images))]


def project_each(model: nn.Module, images: torch.Tensor, units: Sequence[Unit],
                 mode: Mode = Mode.deconvnet, batch_size: int = 32,
                 method: Method = Method.auto, windowed: bool = True) -> list[Projection]:
    """Project `units[i]` of `images[i]` (N, C, H, W) for every i, as `project` does. Each row
    runs forward on its own: where images recur, `project_jobs` runs each once."""
    if images.dim() != 4 or len(images) != len(units):
        raise ConvmapsError(
            f"project_each takes images (N, C, H, W) and N units, not {tuple(images.shape)} "
            f"and {len(units)}"
        )
    return _project_jobs(model, images, list(enumerate(units)), mode, batch_size, method,
                         windowed)


def project_jobs(model: nn.Module, images: torch.Tensor, jobs: Sequence[tuple[int, Unit]],
                 mode: Mode = Mode.deconvnet, batch_size: int = 32,
                 method: Method = Method.auto, windowed: bool = True, trim: bool = False
                 ) -> list[Projection]:
    """Project unit u of `images[i]` (N, C, H, W) for every job (i, u), as `project` does, in
    `jobs` order: each image runs forward once per chunk of its jobs, e.g. each channel's top
    images in a data set, where one image wins for many channels.

    Args:
        trim: each map on its unit's window only, its place in `Projection.origin` (the whole
            input for units the windows do not follow: 1-D outputs, or the autograd method).

    Raises:
        ConvmapsError: as `project`, or a job whose image is not in `images`.
    """
    if images.dim() != 4:
        raise ConvmapsError(f"project_jobs takes images (N, C, H, W), not {tuple(images.shape)}")
    bad = [i for i, _ in jobs if not 0 <= i < len(images)]
    if bad:
        raise ConvmapsError(f"job image {bad[0]} is not among the {len(images)} images")
    return _project_jobs(model, images, jobs, mode, batch_size, method, windowed, trim)
