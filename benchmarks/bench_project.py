"""Projecting 64 units of AlexNet `features.10` for one 224x224 image, timed in one run.

    python benchmarks/bench_project.py [--units 64] [--repeats 5] [--device cpu] [--memory]

- loop:       what a user would write: for each unit, a forward pass of the whole model with a
              hook that keeps features.10's output, then `torch.autograd.grad(unit, image)`.
- loop-cut:   the same loop, but each forward pass stops at features.10 (`features[:11]`): the
              strongest plain-autograd baseline.
- chain / autograd: `convmaps.core.deconv.project(..., batch_size=64)` with each method.

All in gradient mode (so that every variant computes the same maps; the check is printed) and
weights `none` (seeded). Goal (issue 10): convmaps <= 0.5x the loop's time. With `--memory`,
each batch size runs in its own process and the peak RSS that the call adds is printed: memory
grows with the batch size, not with the number of units.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from convmaps.core.deconv import Method, Mode, Unit, project
from convmaps.core.models import build

LAYER = "features.10"


def _strongest(out: torch.Tensor, channel: int) -> torch.Tensor:
    return out[0, channel].flatten().max()


def loop(model: nn.Module, image: torch.Tensor, channels: list[int]) -> list[torch.Tensor]:
    maps = []
    kept: list[torch.Tensor] = []

    def hook(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        kept.append(out)
        return out.clone()  # the next ReLU is in place: it must not overwrite `out`

    for c in channels:
        x = image[None].clone().requires_grad_(True)
        kept.clear()
        handle = model.get_submodule(LAYER).register_forward_hook(hook)
        try:
            model(x)
        finally:
            handle.remove()
        (grad,) = torch.autograd.grad(_strongest(kept[0], c), x)
        maps.append(grad[0])
    return maps


def loop_cut(model: nn.Module, image: torch.Tensor, channels: list[int]) -> list[torch.Tensor]:
    head = model.features[:11]  # type: ignore[index]
    maps = []
    for c in channels:
        x = image[None].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_strongest(head(x), c), x)
        maps.append(grad[0])
    return maps


def convmaps(method: Method, batch_size: int) -> Callable[..., list[torch.Tensor]]:
    def run(model: nn.Module, image: torch.Tensor, channels: list[int]) -> list[torch.Tensor]:
        units = [Unit(LAYER, c) for c in channels]
        got = project(model, image, units, Mode.gradient, batch_size, method)
        return [p.map for p in got]

    return run


def _setup(device: str) -> tuple[nn.Module, torch.Tensor]:
    model = build("alexnet").eval().to(device)
    image = torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    return model, image


def _status(key: str) -> float:
    """A /proc/self/status figure in MiB (Linux)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) / 2**10


def _child(batch_size: int, units: int, device: str, method: str) -> None:
    """Prints the peak RSS one projection call adds to a process that holds model and image."""
    model, image = _setup(device)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current RSS
    base = _status("VmRSS")
    convmaps(Method(method), batch_size)(model, image, list(range(units)))
    print(_status("VmHWM") - base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--units", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-method", default="auto", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _child(a.child, a.units, a.device, a.child_method)
        return
    model, image = _setup(a.device)
    channels = list(range(a.units))
    variants = {
        "loop": loop,
        "loop-cut": loop_cut,
        "chain": convmaps(Method.chain, a.units),
        "autograd": convmaps(Method.autograd, a.units),
    }
    reference = loop(model, image, channels)
    for name, fn in variants.items():  # warm-up, and every variant computes the same maps
        worst = max(float((m - r).abs().max() / r.abs().max())
                    for m, r in zip(fn(model, image, channels), reference, strict=True))
        print(f"{name:9s} max relative difference from loop: {worst:.1e}")
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.repeats):  # interleaved, so that load on the machine hits all alike
        for name, fn in variants.items():
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(model, image, channels)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"AlexNet {LAYER}, {a.units} units, one 224x224 image, {a.device}, "
          f"{torch.get_num_threads()} threads; median of {a.repeats} (s):")
    for k, v in med.items():
        print(f"  {k:9s} {v:7.3f}")
    for k in ("chain", "autograd"):
        print(f"{k} / loop = {med[k] / med['loop']:.2f}  (goal <= 0.5);  "
              f"{k} / loop-cut = {med[k] / med['loop-cut']:.2f}")
    if a.memory:
        print("memory one call adds (peak RSS over the RSS before it, MiB, one process each):")
        for method in ("chain", "autograd"):
            for bs in (1, 8, 32, a.units):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(bs), "--child-method", method,
                     "--units", str(a.units), "--device", a.device],
                    check=True, capture_output=True, text=True,
                ).stdout.split()[-1]
                print(f"  {method:9s} batch_size {bs:3d}: {float(out):7.0f}")


if __name__ == "__main__":
    main()
