"""Kernel maps of every AlexNet conv, three ways, timed in one run (medians, as ratios).

    python benchmarks/bench_kernel_maps.py [--images 4] [--repeats 5] [--device cpu] [--busy]

- forward: the plain forward pass through `features` (the part every method pays).
- floor:   the same forward pass plus writing as many bytes as the kernel maps take, raw,
           to a file.
- recipe:  the forum recipe: hooks keep each conv's input, a grouped conv with groups=C_in and
           the weight permuted to (C_in*C_out, 1, kh, kw), the result permuted back, and
           `safetensors.torch.save_file` of all of them.
- convmaps: `trace` + `decompose.kernel_map_chunks` streamed by `store.write_safetensors`,
           as `convmaps dump --kernels` does (chunks of DumpOptions.chunk_bytes).
- recipe-compute / convmaps-compute: the maps alone, written nowhere (inputs captured
           beforehand), to separate computing from writing.

- convmaps-all-cores: convmaps with one torch thread per core (torch's own default), to show
           what convmaps' `--threads` default (every core but one) avoids on a busy machine.

Every method but convmaps-all-cores runs with convmaps' default thread count (`--threads`).
`--busy` keeps one CPU-bound process spinning beside the benchmark, as a shared machine has.

Work = time beyond the plain forward pass. Goals (issue 4): convmaps work <= 0.5x the
recipe's, and convmaps total within 1.3x of the floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from convmaps.core import decompose
from convmaps.core.capture import trace
from convmaps.core.models import build
from convmaps.io.store import TensorSpec, parse_bytes, write_safetensors
from convmaps.jobs.runtime import default_threads, threads
from convmaps.options import DumpOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests/
from tests.reference import forum_kernel_maps  # noqa: E402


def _convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [n for n, _ in _convs(model)]
    return {k: v[0] for k, v in trace(model, x, [], names).inputs.items()}


def _kernel_bytes(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Bytes of each conv's float32 kernel maps for one image, from its real output shape."""
    convs = dict(_convs(model))
    outputs = trace(model, x, list(convs)).outputs
    return {name: convs[name].in_channels // convs[name].groups * out[0].numel() * 4
            for name, out in outputs.items()}


def forward(model: nn.Module, x: torch.Tensor, out: Path) -> None:
    with torch.no_grad():
        model.features(x)  # type: ignore[operator]


def floor(model: nn.Module, x: torch.Tensor, out: Path, nbytes: int) -> None:
    forward(model, x, out)
    block = bytes(64 << 20)
    with open(out, "wb") as f:
        left = nbytes
        while left:
            n = min(left, len(block))
            f.write(memoryview(block)[:n])
            left -= n


def recipe(model: nn.Module, x: torch.Tensor, out: Path) -> None:
    inputs = _inputs(model, x)
    maps = {name: forum_kernel_maps(conv, inputs[name]).contiguous()
            for name, conv in _convs(model)}
    save_file(maps, out)


def convmaps(model: nn.Module, x: torch.Tensor, out: Path, chunk: int = 64 << 20,
             nbytes: dict[str, int] | None = None) -> None:
    inputs = _inputs(model, x)
    specs, streams = [], []
    for name, conv in _convs(model):
        sample = decompose.kernel_maps(conv, inputs[name], filters=slice(0, 1))
        specs.append(TensorSpec(name, torch.float32, (conv.out_channels, *sample.shape[1:])))
        assert nbytes is None or specs[-1].nbytes == nbytes[name]
        streams.append((name, decompose.kernel_map_chunks(conv, inputs[name], chunk)))

    def chunks():
        for name, it in streams:
            for _, t in it:
                yield name, t

    write_safetensors(out, specs, chunks(), sync=False)  # as `dump` writes them


def recipe_compute(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    for name, conv in _convs(model):
        forum_kernel_maps(conv, inputs[name]).contiguous()


def convmaps_compute(model: nn.Module, inputs: dict[str, torch.Tensor], chunk: int) -> None:
    for name, conv in _convs(model):
        for _ in decompose.kernel_map_chunks(conv, inputs[name], chunk):
            pass


def _time(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk", default=DumpOptions.chunk_bytes, help="convmaps' chunk size")
    ap.add_argument("--threads", type=int, default=None, help="default: convmaps' own default")
    ap.add_argument("--busy", action="store_true", help="a competing CPU-bound process runs")
    args = ap.parse_args()
    busy = None
    if args.busy:  # bounded: it ends by itself after an hour if this process is killed
        busy = subprocess.Popen([sys.executable, "-c",
                                 "import time\nend = time.time() + 3600\n"
                                 "while time.time() < end: pass"])
    try:
        run(args)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def run(args: argparse.Namespace) -> None:
    chunk = parse_bytes(args.chunk)
    torch.manual_seed(0)
    model = build("alexnet").eval().to(args.device)
    images = [torch.randn(1, 3, 224, 224, device=args.device) for _ in range(args.images)]
    per_conv = _kernel_bytes(model, images[0])
    nbytes = sum(per_conv.values())
    tmp = Path(tempfile.mkdtemp(prefix="convmaps-bench-"))
    captured = {id(x): _inputs(model, x) for x in images}
    methods: dict[str, Callable[[torch.Tensor, Path], None]] = {
        "forward": lambda x, p: forward(model, x, p),
        "floor": lambda x, p: floor(model, x, p, nbytes),
        "recipe": lambda x, p: recipe(model, x, p),
        "convmaps": lambda x, p: convmaps(model, x, p, chunk, per_conv),
        "recipe-compute": lambda x, p: recipe_compute(model, captured[id(x)]),
        "convmaps-compute": lambda x, p: convmaps_compute(model, captured[id(x)], chunk),
        "convmaps-all-cores": lambda x, p: convmaps(model, x, p, chunk, per_conv),
    }
    n_threads = args.threads or default_threads()
    cores = len(os.sched_getaffinity(0))

    def timed(name: str, fn: Callable[[], None]) -> float:
        with threads(cores if name == "convmaps-all-cores" else n_threads):
            return _time(fn)

    for fn in methods.values():  # warm-up: allocator, kernels, page cache
        fn(images[0], tmp / "warm")
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():  # interleaved, so drift hits every method alike
            total = 0.0
            for i, x in enumerate(images):
                path = tmp / f"{name}-{i}.bin"
                total += timed(name, lambda: fn(x, path))  # noqa: B023
                path.unlink(missing_ok=True)
            times[name].append(total / len(images))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"AlexNet, all 5 convs, {nbytes / 1e6:.1f} MB of kernel maps per image, "
          f"{args.images} images x {args.repeats} repeats on {args.device}, chunks of "
          f"{args.chunk}, {n_threads} thread(s) of {cores} cores"
          f"{', beside a busy process' if args.busy else ''}; median s/image:")
    for k, v in med.items():
        print(f"  {k:16s} {v:7.3f}")
    work = {k: med[k] - med["forward"] for k in ("floor", "recipe", "convmaps")}
    print(f"convmaps work / recipe work = {work['convmaps'] / work['recipe']:.2f}  (goal <= 0.5)")
    print(f"convmaps / floor            = {med['convmaps'] / med['floor']:.2f}  (goal <= 1.3)")
    print(f"convmaps work / floor work  = {work['convmaps'] / work['floor']:.2f}")
    print(f"one thread per core / convmaps' threads = "
          f"{med['convmaps-all-cores'] / med['convmaps']:.2f}")
    ratio = med["convmaps-compute"] / med["recipe-compute"]
    print(f"computing alone: convmaps / recipe = {ratio:.2f}")


if __name__ == "__main__":
    main()
