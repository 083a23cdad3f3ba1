"""Dump throughput on a GPU (or any device): convmaps `dump` with selected layers saved,
against a plain inference loop on the same device, in images/s (issue 5, goal >= 0.8x).

    python benchmarks/bench_gpu.py [--device cuda] [--models alexnet,vgg16] [--images 512]
                                   [--batch-size 64] [--layers pool] [--workers 8] [--repeats 3]

- forward:  what a user's plain inference loop does with the same inputs: a DataLoader with
            the same workers decoding with PIL + `weights.transforms()`, pinned memory,
            `non_blocking` copies, `model(x)` under `inference_mode`; nothing captured or saved.
- convmaps: `run_dump` with `--layers LAYERS`, float16, no PNG, no switches.

Model loading is timed for neither: this measures the steady flow of images.

Both load the weights through torchvision's weights API (a seeded stand-in file in a temporary
cache when the real one is not cached). `--device cpu --images 32` is a quick smoke run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from bench_dump import cached_weights, make_photos
from PIL import Image

from convmaps.jobs.dump import plan_dump, run_dump
from convmaps.jobs.runtime import default_workers
from convmaps.options import DType, DumpOptions


class _Photos(torch.utils.data.Dataset[Any]):
    def __init__(self, files: list[Path], transform: torch.nn.Module):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        return self.transform(Image.open(self.files[i]).convert("RGB"))


def forward(model: torch.nn.Module, transform: Any, files: list[Path], device: torch.device,
            batch: int, workers: int) -> float:
    """Seconds for the plain inference loop over `files` (model already loaded)."""
    loader = torch.utils.data.DataLoader(_Photos(files, transform), batch_size=batch,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    start = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            model(x.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def convmaps(arch: str, folder: Path, out: Path, device: str, batch: int, workers: int,
             layers: str) -> float:
    """Seconds for `run_dump` (planning and loading the model not counted, as for forward)."""
    o = DumpOptions(model=arch, inputs=[str(folder)], out=str(out), layers=layers,
                    switches=False, png=False, dtype=DType.float16, batch_size=batch,
                    workers=workers, device=device, resume=False, max_bytes="1TB")
    plan = plan_dump(o)
    start = time.perf_counter()
    run_dump(plan)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="alexnet,vgg16")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--layers", default="pool", help="what convmaps saves (a --layers SPEC)")
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    device = torch.device(a.device)
    tmp = Path(tempfile.mkdtemp(prefix="convmaps-bench-"))
    files = make_photos(tmp / "photos", a.images)
    try:
        for arch in a.models.split(","):
            source = cached_weights(tmp, arch)
            weights = torchvision.models.get_model_weights(arch).DEFAULT
            model = torchvision.models.get_model(arch, weights=weights).eval().to(device)
            tf = weights.transforms()
            times: dict[str, list[float]] = {"forward": [], "convmaps": []}
            forward(model, tf, files[: a.batch_size], device, a.batch_size, a.workers)  # warm-up
            for _ in range(a.repeats):
                times["forward"].append(forward(model, tf, files, device, a.batch_size, a.workers))
                out = tmp / "out"
                times["convmaps"].append(convmaps(arch, tmp / "photos", out, a.device,
                                                  a.batch_size, a.workers, a.layers))
                shutil.rmtree(out)
            rate = {k: len(files) / statistics.median(v) for k, v in times.items()}
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else a.device
            print(f"{arch} on {name}, {len(files)} photos, batch {a.batch_size}, workers "
                  f"{a.workers}, --layers {a.layers}, {source}; median of {a.repeats}:")
            print(f"  forward   {rate['forward']:8.1f} images/s")
            print(f"  convmaps  {rate['convmaps']:8.1f} images/s  "
                  f"({rate['convmaps'] / rate['forward']:.2f}x, goal >= 0.8x)")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
