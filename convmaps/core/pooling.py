"""Pooling: max-pool switches (the argmax indices a pool chose) and unpooling with them.

    >>> import torch
    >>> pool = torch.nn.MaxPool2d(2)
    >>> x = torch.rand(3, 4, 4)
    >>> idx = switches(pool, x)
    >>> torch.equal(pool(unpool(pool(x), idx, pool, x.shape[-2:])), pool(x))
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from convmaps.core.fields import _pair

__all__ = ["switches", "unpool"]


def switches(pool: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    """The flat per-plane argmax indices `pool` chooses on its input `x` ((C,H,W) or (N,C,H,W)),
    int64, exactly as `MaxPool2d(return_indices=True)` gives them."""
    _, indices = F.max_pool2d_with_indices(
        x, _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding),
        _pair(pool.dilation), pool.ceil_mode,
    )
    return indices


def unpool(pooled: torch.Tensor, indices: torch.Tensor, pool: nn.MaxPool2d,
           input_size: Sequence[int]) -> torch.Tensor:
    """Place each maximum back where it came from (zeros elsewhere), at the pool's input size.

    `input_size` is needed because several input sizes pool to the same output size.
    """
    if pool.dilation not in (1, (1, 1)):
        raise ValueError("max_unpool2d has no dilation; a dilated pool cannot be unpooled")
    return F.max_unpool2d(
        pooled, indices, _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding),
        output_size=list(input_size)[-2:],
    )
