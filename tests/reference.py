"""Independent references for tests and benchmarks: ways others compute what convmaps does.

The benchmarks import this module too (`benchmarks/bench_kernel_maps.py` puts the repository
root on `sys.path`), so it needs nothing but torch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["forum_kernel_maps"]


def forum_kernel_maps(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """The common forum recipe for kernel maps, `(C_out, C_in, H_out, W_out)` per image.

    A depthwise conv (groups = C_in) whose weight is the filters regrouped by input channel,
    `(C_in*C_out, 1, kh, kw)`, then the result permuted back. Done right, the bias stays out of
    the maps. Only groups=1 with zeros padding; it pads through `F.conv2d` itself,
    independently of `convmaps.core.decompose`. Accepts `(C, H, W)` or `(N, C, H, W)`.

    Raises:
        NotImplementedError: for grouped convs or non-zero padding modes.
    """
    if conv.groups != 1 or conv.padding_mode != "zeros":
        raise NotImplementedError(
            "forum_kernel_maps handles groups=1 with zeros padding only; use kernel_maps"
        )
    batched = x.dim() == 4
    x4 = (x if batched else x.unsqueeze(0)).detach()
    weight = conv.weight.detach()
    c_out, c_in, kh, kw = weight.shape
    y = F.conv2d(
        x4,
        weight.transpose(0, 1).reshape(c_in * c_out, 1, kh, kw),  # channel-major order
        None,
        conv.stride,
        conv.padding,
        conv.dilation,
        c_in,
    )
    maps = y.unflatten(1, (c_in, c_out)).transpose(1, 2).contiguous()
    return maps if batched else maps[0]

