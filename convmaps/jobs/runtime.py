"""Runtime: where and how a job computes — its device (one per torchrun rank), compute threads,
decoding workers, and which batches are its shard's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from convmaps.errors import ConvmapsError

__all__ = ["batches", "default_threads", "default_workers", "memory_format", "resolve_device",
           "resolve_shard", "threads", "usable_cores"]


def resolve_device(name: str) -> torch.device:
    """The device a run computes on, made current and proven by allocating on it (a typo, a
    GPU index that is not there, or a backend this build lacks is one line, not a traceback
    mid-run). Under torchrun a bare `cuda` is `cuda:<LOCAL_RANK>`, set before anything touches
    CUDA, so no rank opens a context on GPU 0 and the loader's pin-memory thread follows."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConvmapsError(f"--device {name!r}: {str(e).splitlines()[0]}") from e
    if device.type == "meta":
        raise ConvmapsError("--device meta holds no values; use cpu or a GPU such as cuda")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", _env_int("LOCAL_RANK", 0))  # one GPU per process
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, AttributeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConvmapsError(f"--device {name}: not usable here ({first})") from e
    return device


def _env_int(name: str, default: int) -> int:
    """A torch.distributed variable (WORLD_SIZE, RANK, LOCAL_RANK) as an integer."""
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ConvmapsError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_shard(spec: str | None) -> tuple[int, int]:
    """`--shard I/N`, else torchrun's RANK/WORLD_SIZE, else the whole input (0, 1)."""
    if spec is None:
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        if world > 1 and not 0 <= rank < world:
            raise ConvmapsError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return (rank, world) if world > 1 else (0, 1)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not int(m[1]) < int(m[2]):
        raise ConvmapsError(f"--shard {spec!r}: write I/N with 0 <= I < N, e.g. 0/4 … 3/4")
    return int(m[1]), int(m[2])


def default_workers() -> int:
    """Decoding processes when --workers is not given: a quarter of the CPU cores this process
    may use, at most 8. On 2 cores that is none: the batched forward pass keeps both cores
    busy, and a decoding process would only compete with it."""
    return min(8, usable_cores() // 4)


def default_threads() -> int:
    """Compute threads when --threads is not given: every usable core but one, at least one.

    torch's OpenMP threads spin while they wait for each other; when another process holds a
    core, a thread per core stalls every GEMM behind the one that lost its core (kernel maps:
    4.2 s against 0.2 s per image on a shared 2-core box). One core left free keeps that from
    happening and costs little when the machine is quiet (`benchmarks/bench_kernel_maps.py
    --busy` measures both)."""
    return max(1, usable_cores() - 1)


def usable_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def memory_format(device: torch.device) -> torch.memory_format:
    # oneDNN convolutions run 10-15% faster in channels-last layout (AlexNet and VGG16 on the
    # CPU); saved maps are made contiguous on the way to disk whatever the layout.
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `n` (default: `default_threads()`), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or default_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def batches(count: int, size: int, shard: tuple[int, int]) -> list[list[int]]:
    """This shard's batches, at fixed positions in the sorted inputs: an image is always
    computed with the same neighbours (CPU kernels give batch-dependent low bits), so a resumed
    or sharded run is byte-identical to one uninterrupted process. Shard I of N takes every
    N-th batch."""
    size = max(1, size)
    every = [list(range(i, min(i + size, count))) for i in range(0, count, size)]
    return every[shard[0]::shard[1]]
