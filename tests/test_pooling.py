from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convmaps.core.pooling import switches, unpool


@pytest.mark.parametrize(
    "pool,size",
    [
        (nn.MaxPool2d(3, 2), (13, 13)),  # AlexNet
        (nn.MaxPool2d(3, 2), (55, 55)),
        (nn.MaxPool2d(2, 2), (14, 14)),  # VGG, LeNet
        (nn.MaxPool2d(2, 2), (7, 9)),  # odd size: last row/column dropped
        (nn.MaxPool2d(3, 2, padding=1), (10, 10)),
        (nn.MaxPool2d(2, 2, ceil_mode=True), (7, 7)),
        (nn.MaxPool2d(3, 2, padding=1, ceil_mode=True), (12, 11)),
        (nn.MaxPool2d((2, 3), (1, 2)), (8, 9)),
    ],
)
def test_switches_round_trip(pool, size):
    torch.manual_seed(0)
    x = torch.rand(2, 5, *size)  # non-negative, as after a ReLU
    idx = switches(pool, x)
    pooled, expected_idx = nn.MaxPool2d(pool.kernel_size, pool.stride, pool.padding,
                                        ceil_mode=pool.ceil_mode, return_indices=True)(x)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, expected_idx)
    back = unpool(pooled, idx, pool, x.shape)
    assert back.shape == x.shape
    # Pooling the unpooled map gives back the pooled map ...
    assert torch.equal(pool(back), pooled)
    # ... and every switch points at the input value that was the maximum.
    flat = x.flatten(2).gather(2, idx.flatten(2))
    assert torch.equal(flat.view_as(pooled), pooled)
    # Everything the switches do not point at is zero.
    assert int((back != 0).sum()) <= idx.numel()


def test_switches_without_batch_dim():
    x = torch.rand(3, 8, 8)
    pool = nn.MaxPool2d(2)
    idx = switches(pool, x)
    assert idx.shape == (3, 4, 4)
    assert torch.equal(F.max_unpool2d(pool(x)[None], idx[None], 2)[0].amax((1, 2)),
                       x.amax((1, 2)))


def test_dilated_pool_cannot_be_unpooled():
    pool = nn.MaxPool2d(2, dilation=2)
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="dilation"):
        unpool(pool(x), switches(pool, x), pool, x.shape)


def test_switches_of_a_channels_last_slice_are_the_contiguous_ones():
    """A dump on the CPU runs in channels-last layout and takes one image's slice of the
    batch: the switches must still be logical h*W+w positions, as for a contiguous map."""
    torch.manual_seed(1)
    x = torch.rand(2, 6, 13, 13)
    strided = x.contiguous(memory_format=torch.channels_last)[1]
    assert not strided.is_contiguous()
    pool = nn.MaxPool2d(3, 2)
    idx = switches(pool, strided)
    assert torch.equal(idx, F.max_pool2d_with_indices(x[1:2].clone(), 3, 2)[1][0])
    assert torch.equal(pool(unpool(pool(strided), idx, pool, strided.shape)), pool(x[1]))


def test_pooling_leaves_the_pool_as_found():
    pool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True).train()
    before = dict(vars(pool))
    x = torch.rand(2, 3, 9, 9)
    idx = switches(pool, x)
    unpool(pool(x), idx, pool, x.shape[-2:])
    assert vars(pool) == before and pool.training and not pool.return_indices
