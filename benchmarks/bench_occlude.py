"""Occlusion maps of one image by incremental inference against full forward passes, in one run.

    python benchmarks/bench_occlude.py [--model alexnet] [--size 224] [--patch 16] [--stride 4]
                                       [--batch-size 64] [--repeats 3]

- full:        every occluded image through the whole model, `--batch-size` at a time
               (`core.occlusion.occlude(..., incremental=False)`: batched as well as it goes).
- incremental: the same maps, each layer recomputing only the region the patch can change.
- captum:      `captum.attr.Occlusion(model).attribute(...)` with the same window, strides and
               baseline, `perturbations_per_eval` = `--batch-size` (when captum is installed:
               `pip install -e ".[test]"`). It computes the logit drop of one target only.
- theoretical: FLOPs of the full passes / FLOPs of the incremental ones, both counted by
               `torch.utils.flop_counter.FlopCounterMode` on the same calls (convs, linears).

Weights are seeded (`weights=None`): speed does not depend on them. The maps are checked equal.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from convmaps.core.occlusion import corners, occlude


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="alexnet")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.get_model(a.model, weights=None).eval()
    image = torch.randn(3, a.size, a.size)
    n = len(corners(a.size, a.patch, a.stride)) ** 2
    runs = {
        "full": lambda: occlude(model, image, a.patch, a.stride, batch_size=a.batch_size,
                                incremental=False),
        "incremental": lambda: occlude(model, image, a.patch, a.stride, batch_size=a.batch_size),
    }
    try:
        from captum.attr import Occlusion

        def captum() -> None:
            Occlusion(model).attribute(image[None], sliding_window_shapes=(3, a.patch, a.patch),
                                       strides=(3, a.stride, a.stride), baselines=0.0, target=0,
                                       perturbations_per_eval=a.batch_size)

        extra: dict[str, Callable[[], object]] = {"captum": captum}
    except ImportError:
        extra = {}
    flops = {}
    for name, run in runs.items():
        with FlopCounterMode(display=False) as counter:
            got = run()
        flops[name] = counter.get_total_flops()
        if name == "incremental":
            assert got.incremental
            print(f"incremental up to {got.full_from} (from there on in full)")
    times: dict[str, list[float]] = {name: [] for name in [*runs, *extra]}
    results = {}
    for _ in range(a.repeats):
        for name, run in [*runs.items(), *extra.items()]:  # alternated: the same machine load
            start = time.perf_counter()
            got = run()
            if name in runs:
                results[name] = got
            times[name].append(time.perf_counter() - start)
    scale = results["full"].logits.abs().max()
    error = (results["incremental"].logits - results["full"].logits).abs().max() / scale
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{a.model} at {a.size}, patch {a.patch}, stride {a.stride}: {n} positions, "
          f"batch {a.batch_size}, {a.repeats} repeats; largest difference {error:.1e} of the "
          "logits' range")
    for name, t in med.items():
        counted = f"{flops[name] / 1e9:9.1f} GFLOP" if name in flops else ""
        print(f"  {name:12s} median {t:7.2f} s  ({n / t:7.1f} positions/s, {1 / t:6.3f} "
              f"images/s for a whole map)  {counted}")
    speedup, ideal = med["full"] / med["incremental"], flops["full"] / flops["incremental"]
    print(f"  incremental: {speedup:.2f}x the full passes (theoretical {ideal:.2f}x, "
          f"{speedup / ideal:.0%} of it)"
          + (f"; {med['captum'] / med['incremental']:.2f}x captum" if "captum" in med else ""))


if __name__ == "__main__":
    main()
