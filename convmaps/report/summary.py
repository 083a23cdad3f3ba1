"""Summary statistics of saved tensors, in the spirit of lovely-tensors (`convmaps show`).

    >>> import torch
    >>> s = tensor_stats("x", torch.tensor([0.0, 1.0, 2.0, 3.0]))
    >>> (s.min, s.max, s.mean, s.zeros)
    (0.0, 3.0, 1.5, 0.25)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from convmaps.errors import ConvmapsError
from convmaps.io.layout import MANIFEST
from convmaps.io.manifest import read
from convmaps.io.store import check_regular

__all__ = ["Stats", "dump_stats", "file_stats", "tensor_stats"]


@dataclass(frozen=True)
class Stats:
    name: str
    shape: tuple[int, ...]
    dtype: str
    min: float
    max: float
    mean: float
    std: float
    zeros: float  # share of exact zeros among all values, 0..1
    count: int = 1  # how many tensors (images) went into these figures
    nans: int = 0  # NaN values, which min/max/mean/std leave out


@dataclass
class _Running:
    """Streaming min/max/mean/std/zeros over many tensors of one key, in float64 so that fp16
    maps do not overflow the sums.

    NaN values are counted and left out of min/max/mean/std (as numpy's nanmin ... nanstd), so
    the figures do not depend on where a NaN sits or in which image; with no other value they
    are NaN. The share of zeros is taken over all values.
    """

    shape: tuple[int, ...] = ()
    dtype: str = ""
    count: int = 0
    size: int = 0  # all values
    n: int = 0  # values that are not NaN
    total: float = 0.0
    squares: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf
    zeros: int = 0
    nans: int = 0

    def add(self, t: torch.Tensor) -> None:
        x = t.detach().to(torch.float64).reshape(-1)
        self.shape, self.dtype = tuple(t.shape), str(t.dtype).removeprefix("torch.")
        self.count += 1
        self.size += x.numel()
        self.zeros += int((x == 0).sum().item())
        nan = torch.isnan(x)
        if n_nan := int(nan.sum().item()):
            self.nans += n_nan
            x = x[~nan]
        if x.numel():
            self.n += x.numel()
            self.total += x.sum().item()
            self.squares += (x * x).sum().item()
            self.lo = min(self.lo, x.min().item())
            self.hi = max(self.hi, x.max().item())

    def stats(self, name: str) -> Stats:
        zeros = self.zeros / self.size if self.size else 0.0
        if not self.n:
            nan = float("nan")
            return Stats(name, self.shape, self.dtype, nan, nan, nan, nan, zeros, self.count,
                         self.nans)
        mean = self.total / self.n
        var = max(self.squares / self.n - mean * mean, 0.0) * self.n / max(self.n - 1, 1)
        return Stats(name, self.shape, self.dtype, self.lo, self.hi, mean, math.sqrt(var),
                     zeros, self.count, self.nans)


def tensor_stats(name: str, t: torch.Tensor) -> Stats:
    """Shape, dtype, min/max, mean/std (NaN left out), the share of zeros and the NaN count."""
    acc = _Running()
    acc.add(t)
    return acc.stats(name)


def _read(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        check_regular(path)  # a FIFO in its place would block safetensors forever
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                yield key, f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise ConvmapsError(f"{path} is not a readable safetensors file: {e}") from e


def file_stats(path: str | Path) -> list[Stats]:
    """Stats of every tensor in one safetensors file, one tensor in memory at a time."""
    return [tensor_stats(k, t) for k, t in _read(Path(path))]


def dump_stats(folder: str | Path, name: str = MANIFEST) -> dict[str, list[Stats]]:
    """Per file kind (activations, switches, …) and key: stats over every image of a dump (or,
    with `name` = projections.json, of the projections)."""
    folder = Path(folder)
    manifest = read(folder, name)
    if manifest is None:
        raise ConvmapsError(f"{folder} has no {name} (not a convmaps output folder)")
    running: dict[str, dict[str, _Running]] = {}
    for entry in manifest.get("inputs", []):
        for rel in entry.get("files", []):
            if rel.endswith(".safetensors"):
                per_key = running.setdefault(rel, {})
                for key, t in _read(folder / entry["key"] / rel):
                    per_key.setdefault(key, _Running()).add(t)
    # safetensors lists keys alphabetically; show them in model order instead.
    order = {row["name"]: i for i, row in enumerate(manifest.get("layers", []))}

    def rank(key: str) -> tuple[int, str]:
        return order.get(key.split("@")[0].removesuffix(".bias"), len(order)), key

    return {rel: [keys[k].stats(k) for k in sorted(keys, key=rank)]
            for rel, keys in running.items()}
