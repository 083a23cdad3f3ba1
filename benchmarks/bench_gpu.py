"""Throughput on a GPU (or any device): convmaps `dump`, `topk` and `project` against a plain
inference loop on the same device, in images/s (goals: dump >= 0.8x, topk >= 0.9x), and the
device synchronisations per batch each job makes.

    python benchmarks/bench_gpu.py [--device cuda] [--models alexnet,resnet50] [--images 512]
                                   [--batch-size 64] [--layers pool] [--workers 8] [--repeats 3]
                                   [--jobs dump,topk,project]

- forward:  what a user's plain inference loop does with the same inputs: a DataLoader with
            the same workers decoding with PIL + `weights.transforms()`, pinned memory,
            `non_blocking` copies, `model(x)` under `inference_mode`; nothing captured or saved.
- dump:     `dump` with `--layers LAYERS`, float16, no PNG, no switches.
- topk:     `topk` of every conv, k 9, `--project none`, no PNG (the streaming pass).
- project:  `project` of one unit of the last conv for every image, no PNG.

Synchronisations: each job runs once more under `torch.cuda.set_sync_debug_mode("warn")`,
which warns at every operation that waits for the GPU; the warnings are counted and divided
by the number of batches (CUDA only).

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


def job(kind: str, arch: str, folder: Path, out: Path, device: str, batch: int, workers: int,
        layers: str) -> float:
    """Seconds for one convmaps job (planning and loading the model not counted, as for
    forward)."""
    from convmaps.jobs.dump import Dump
    from convmaps.jobs.engine import plan_job, run_job
    from convmaps.jobs.project import Project
    from convmaps.jobs.topk import Topk
    from convmaps.options import ProjectOptions, TopkOptions

    common = {"model": arch, "inputs": [str(folder)], "out": str(out), "batch_size": batch,
              "workers": workers, "device": device, "resume": False, "png": False}
    if kind == "dump":
        plan = plan_job(DumpOptions(**common, layers=layers, switches=False,
                                    dtype=DType.float16, max_bytes="1TB"), Dump())
    elif kind == "topk":
        plan = plan_job(TopkOptions(**common, project="none", max_bytes="1TB"), Topk())
    else:
        last = [r.name for r in plan_job(TopkOptions(**{**common, "out": str(out / "probe")},
                                                     project="none"), Topk()).table
                if r.type == "Conv2d"][-1]
        plan = plan_job(ProjectOptions(**common, units=[f"{last}:0"]), Project())
    start = time.perf_counter()
    run_job(plan)
    if torch.cuda.is_available() and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def syncs(kind: str, *args: Any) -> int | None:
    """Synchronisations one run of `kind` makes (CUDA only; None elsewhere)."""
    if not (torch.cuda.is_available() and torch.device(args[2]).type == "cuda"):
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            job(kind, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="alexnet,resnet50")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--layers", default="pool", help="what dump saves (a --layers SPEC)")
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jobs", default="dump,topk,project")
    a = ap.parse_args()
    device = torch.device(a.device)
    tmp = Path(tempfile.mkdtemp(prefix="convmaps-bench-"))
    files = make_photos(tmp / "photos", a.images)
    kinds = a.jobs.split(",")
    goals = {"dump": 0.8, "topk": 0.9}
    batches = -(-len(files) // a.batch_size)
    try:
        for arch in a.models.split(","):
            source = cached_weights(tmp, arch)
            weights = torchvision.models.get_model_weights(arch).DEFAULT
            model = torchvision.models.get_model(arch, weights=weights).eval().to(device)
            tf = weights.transforms()
            times: dict[str, list[float]] = {k: [] for k in ["forward", *kinds]}
            forward(model, tf, files[: a.batch_size], device, a.batch_size, a.workers)  # warm-up
            args = (arch, tmp / "photos", tmp / "out", a.device, a.batch_size, a.workers,
                    a.layers)
            for _ in range(a.repeats):
                times["forward"].append(forward(model, tf, files, device, a.batch_size, a.workers))
                for kind in kinds:
                    times[kind].append(job(kind, *args))
                    shutil.rmtree(tmp / "out")
            rate = {k: len(files) / statistics.median(v) for k, v in times.items()}
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else a.device
            print(f"{arch} on {name}, {len(files)} photos, batch {a.batch_size}, workers "
                  f"{a.workers}, dump --layers {a.layers}, {source}; median of {a.repeats}:")
            print(f"  forward   {rate['forward']:8.1f} images/s")
            for kind in kinds:
                n = syncs(kind, *args)
                shutil.rmtree(tmp / "out", ignore_errors=True)
                goal = f", goal >= {goals[kind]}x" if kind in goals else ""
                per = f"{n / batches:.1f} syncs/batch" if n is not None else "syncs: CUDA only"
                print(f"  {kind:<9} {rate[kind]:8.1f} images/s  "
                      f"({rate[kind] / rate['forward']:.2f}x{goal}; {per})")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
