"""Ranking: per channel, the k images whose maximum over space is largest, as a stream.

The order is total: value descending, then input index ascending; within an image the
position is the first maximum (smallest flat index). The running top-k of a module is a
`(C, k)` table merged with each batch, so memory stays `O(C * k)` however many images pass.

    >>> running = empty(2)
    >>> out = torch.tensor([[[[0., 3.], [3., 1.]], [[0., 0.], [0., 0.]]]])  # 1 image, 2 channels
    >>> running = update(running, out, torch.tensor([7]), k=9)
    >>> running.values.tolist(), running.images.tolist(), running.flat.tolist()
    ([[3.0], [0.0]], [[7], [7]], [[1], [0]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TopK", "combine", "crop", "empty", "maxima", "merge", "positions", "ranked", "update"]



@dataclass(frozen=True)
class TopK:
    """A module's top-k so far: row c holds channel c's best entries, best first."""

    values: Tensor  # (C, k) float32
    images: Tensor  # (C, k) int64: input indices
    flat: Tensor  # (C, k) int64: flat index of the maximum in the (H, W) map; 0 for 1-D

    @property
    def k(self) -> int:
        return int(self.values.shape[1])

    def to(self, device: torch.device | str) -> TopK:
        return TopK(self.values.to(device), self.images.to(device), self.flat.to(device))


def empty(channels: int, device: torch.device | str = "cpu") -> TopK:
    """The top-k of no images: `channels` empty rows (on `device`)."""
    return TopK(torch.empty(channels, 0, device=device),
                torch.empty(channels, 0, dtype=torch.int64, device=device),
                torch.empty(channels, 0, dtype=torch.int64, device=device))


def maxima(out: Tensor) -> tuple[Tensor, Tensor]:
    """Each image's and channel's maximum over space and the first position holding it.

    Args:
        out: a module's output for a batch, `(N, C, H, W)`, or `(N, C)` for a 1-D output
            (whose values rank themselves, at position 0).

    Returns:
        values `(N, C)` float32 and flat positions `(N, C)` int64 (smallest index among ties,
        as `torch.max` along a dim documents).
    """
    if out.dim() == 2:
        return out.float(), torch.zeros(out.shape, dtype=torch.int64, device=out.device)
    if out.dim() != 4:
        raise ValueError(f"maxima takes (N, C, H, W) or (N, C), not {tuple(out.shape)}")
    values, flat = out.flatten(2).max(dim=2)
    return values.float(), flat


def ranked(values: Tensor, images: Tensor, flat: Tensor, k: int) -> TopK:
    """The first `k` entries of each row in the total order value descending, then image index
    ascending (each image at most once a row). torch.topk is not stable, so the order is built
    by two sorts: by image, then a stable sort by value."""
    by_image = images.argsort(dim=1, stable=True)
    values, images, flat = (t.gather(1, by_image) for t in (values, images, flat))
    best = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return TopK(values.gather(1, best), images.gather(1, best), flat.gather(1, best))


def merge(running: TopK, values: Tensor, flat: Tensor, images: Tensor, k: int) -> TopK:
    """`running` merged with a batch's maxima (`values`, `flat`: `(N, C)`) of the images
    `images` `(N,)`; at most `k` entries a row."""
    c, n = running.values.shape[0], values.shape[0]
    # on the device of `running` (a GPU keeps its top-k there: no copy per batch)
    return ranked(torch.cat([running.values, values.T.float().to(running.values.device)], 1),
                  torch.cat([running.images, images.to(running.images.device)[None].expand(c, n)],
                            1),
                  torch.cat([running.flat, flat.T.to(running.flat.device)], 1), k)


def update(running: TopK, out: Tensor, images: Tensor, k: int) -> TopK:
    """`running` after one batch of a module's output `out` for the images `images`."""
    values, flat = maxima(out)
    return merge(running, values, flat, images, k)


def combine(parts: Sequence[TopK], k: int) -> TopK:
    """One top-k from several (shards' partial results over disjoint images)."""
    return ranked(torch.cat([p.values for p in parts], 1), torch.cat([p.images for p in parts], 1),
                  torch.cat([p.flat for p in parts], 1), k)


def positions(flat: Tensor, width: int) -> Tensor:
    """Flat indices into maps of `width` columns -> `(..., 2)` (y, x)."""
    return torch.stack([flat // width, flat % width], dim=-1)


def crop(x: Tensor, box: Sequence[int], size: tuple[int, int], fill: float) -> Tensor:
    """The `box` (top, left, bottom, right; half-open, may reach past the edges) of `x`
    `(C, H, W)`, as a `(C, *size)` tensor: `fill` where the box lies outside `x` or is smaller
    than `size`."""
    top, left, bottom, right = (int(v) for v in box)
    h, w = x.shape[-2:]
    out = x.new_full((x.shape[0], *size), fill)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(bottom, h), min(right, w)
    if y1 > y0 and x1 > x0:
        out[:, y0 - top:y1 - top, x0 - left:x1 - left] = x[:, y0:y1, x0:x1]
    return out
