"""jobs: the pieces every job shares (the jobs themselves test them end to end)."""

from __future__ import annotations

import os

import pytest

from convmaps.errors import ConvmapsError
from convmaps.jobs.runtime import batches, default_threads, default_workers, resolve_shard


@pytest.mark.parametrize("cores,workers", [(1, 0), (2, 0), (8, 2), (16, 4), (128, 8)])
def test_default_workers_follow_the_usable_cores(monkeypatch, cores, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_workers() == workers



@pytest.mark.parametrize("cores,threads", [(1, 1), (2, 1), (16, 15)])
def test_default_threads_leave_one_core_free(monkeypatch, cores, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_threads() == threads


def test_batches_keep_their_positions_whatever_the_shard():
    whole = batches(7, 3, (0, 1))
    assert whole == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches(7, 3, (0, 2)) + batches(7, 3, (1, 2)) == [whole[0], whole[2], whole[1]]


def test_shard_comes_from_the_option_then_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert resolve_shard(None) == (3, 4)
    assert resolve_shard(" 1 / 2 ") == (1, 2)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConvmapsError, match="outside WORLD_SIZE"):
        resolve_shard(None)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConvmapsError, match="not an integer"):
        resolve_shard(None)
