"""Invariance (Zeiler & Fergus, Fig. 5): how far each module's output moves, and how the top
class's probability changes, as an input is translated, scaled or rotated.

Tensors in, tensors out, no files. Every transform is applied to the *preprocessed* input with
`torchvision.transforms.v2.functional.affine` (bilinear, fill 0, about the centre), so anyone
can recompute it:

- `translate`: a vertical shift by `amount` pixels (positive: down), as in the paper's
  "vertical translation"; the picture leaving the frame is cut, and what comes in is 0 (the
  data set's mean colour in normalised units);
- `scale`: a zoom by the factor `amount` about the centre (1: unchanged);
- `rotate`: a rotation by `amount` degrees about the centre (anticlockwise).

    >>> import torch
    >>> from convmaps.core.invariance import amounts, transformed
    >>> [round(a, 2) for a in amounts("scale", 5, (224, 224)).tolist()]
    [1.0, 1.2, 1.4, 1.6, 1.8]
    >>> amounts("translate", 5, (28, 28)).tolist()
    [-8.0, -4.0, 0.0, 4.0, 8.0]
    >>> transformed(torch.ones(1, 4, 4), "translate", [0.0, 2.0]).shape
    torch.Size([2, 1, 4, 4])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from convmaps.core.capture import trace

__all__ = ["Invariance", "TRANSFORMS", "amounts", "invariance", "transformed"]

# The paper's ranges (Fig. 5): vertical translation -60..60 px of a 224 px input, scale
# 1..1.8, rotation over a full turn.
_TRANSLATE_PX = 60
_PAPER_SIDE = 224
_SCALE = (1.0, 1.8)
_TURN = 360.0


# The transforms of Zeiler & Fergus's Fig. 5, in their order. Plain names, not a StrEnum:
# a member called `translate` would shadow `str.translate`.
TRANSFORMS = ("translate", "scale", "rotate")


def _check(transform: str) -> str:
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose {', '.join(TRANSFORMS)}")
    return transform


def amounts(transform: str, steps: int, size: tuple[int, int]) -> Tensor:
    """The `steps` amounts (float32) of a transform, the paper's range: `translate` from -s to s
    pixels, s = 60 for a 224 px high input and in proportion for others (rounded: 8 for
    LeNet's 28); `scale` 1 to 1.8; `rotate` 0 up to 360 degrees, 360 itself left out (it is the
    original again), so that the largest amount, which the plots normalise by, moves the input.

    Raises:
        ValueError: fewer than 2 steps, or an unknown transform.
    """
    if steps < 2:
        raise ValueError(f"steps must be at least 2, not {steps}")
    t = _check(transform)
    if t == "translate":
        s = round(_TRANSLATE_PX * size[0] / _PAPER_SIDE)
        return torch.linspace(-s, s, steps, dtype=torch.float32)
    if t == "scale":
        return torch.linspace(*_SCALE, steps, dtype=torch.float32)
    return torch.linspace(0, _TURN, steps + 1, dtype=torch.float32)[:-1]


def transformed(x: Tensor, transform: str, values: Sequence[float]) -> Tensor:
    """The copies of one preprocessed input `x` (C, H, W) under each amount: (T, C, H, W)."""
    from torchvision.transforms.v2 import functional as F  # noqa: N812

    t = _check(transform)
    copies = []
    for a in values:
        a = float(a)
        copies.append(F.affine(
            x, angle=a if t == "rotate" else 0.0,
            translate=[0.0, a if t == "translate" else 0.0],
            scale=a if t == "scale" else 1.0, shear=[0.0, 0.0],
            interpolation=F.InterpolationMode.BILINEAR, fill=0.0))
    return torch.stack(copies)


@dataclass(frozen=True)
class Invariance:
    """One image under one transform's amounts (T of them), for modules in order (L of them)."""

    distance: Tensor  # float32 (T, L): ||f(x_t) - f(x)||_2 of each module's flattened output
    probability: Tensor  # float32 (T,): the original top class's probability on x_t
    top: Tensor  # int64 (): the original top class (a tensor: read on the device, no sync)


def invariance(model: nn.Module, x: Tensor, transform: str,
               values: Sequence[float], modules: Sequence[str]) -> Invariance:
    """How each module of `modules` and the top class's probability respond to a transform of
    one preprocessed input `x` (C, H, W) by each of `values`.

    The original and its T copies run as one batch of 1 + T (its shape fixed by T alone, so a
    result never depends on which other images ran beside it); module outputs are taken with
    `capture.trace`, in-place ReLUs switched off, and the model's output is its logits.
    """
    batch = torch.cat([x[None], transformed(x, transform, values).to(x.dtype)])
    got = trace(model, batch, [*modules, ""]).outputs
    logits = got[""].float().flatten(1)
    top = logits[0].argmax()
    probability = logits.softmax(-1)[1:].index_select(1, top.view(1)).squeeze(1)
    distance = torch.stack([
        (got[m][1:].float().flatten(1) - got[m][:1].float().flatten(1)).norm(dim=1)
        for m in modules], dim=1) if modules else logits.new_zeros(len(values), 0)
    return Invariance(distance.float().contiguous(), probability.float().contiguous(), top)
