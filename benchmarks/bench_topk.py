"""`convmaps topk` of every AlexNet conv over a folder of photos against a plain decode +
preprocess + forward loop over the same folder, in one run; medians and ratios.

    python benchmarks/bench_topk.py [--images 40] [--repeats 3] [--workers 0] [--photos DIR]
                                    [--proj-k 2] [--device cpu]

- plain:      `alexnet(weights=AlexNet_Weights.DEFAULT)` loaded beforehand; PIL decode +
              `weights.transforms()`, batched forward under `torch.no_grad()`. Nothing kept.
- topk:       `run_topk` (top-9 of features.0/3/6/8/10, `--project none --no-png`) after
              `plan_topk`: the work beyond start-up (model load, layer table, receptive fields
              are the plan's), the same batch size and decoding workers.
- topk+png:   the same with the figures (the winners are decoded again for their patches).
- projections: once, top-`--proj-k` with `--project deconvnet --no-png`; the time beyond
              `topk` of the same k, per projected unit (C x k units of every conv).

Weights as in bench_dump.py: the real cached file when there is one, else a seeded stand-in
in a temporary torch hub cache. Without --photos it makes ~40 photo-sized JPEGs in a temp folder.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from bench_dump import cached_weights, make_photos
from PIL import Image

from convmaps.jobs.runtime import threads
from convmaps.jobs.topk import plan_topk, run_topk
from convmaps.options import TopkOptions

BATCH = 8


def plain(files: list[Path], device: str) -> Callable[[], None]:
    """Start-up (the model) outside the timed loop, as for topk's plan."""
    weights = torchvision.models.AlexNet_Weights.DEFAULT
    model = torchvision.models.alexnet(weights=weights).eval().to(device)
    tf = weights.transforms()

    def loop() -> None:
        with torch.no_grad(), threads(None):
            for start in range(0, len(files), BATCH):
                x = torch.stack([tf(Image.open(f).convert("RGB"))
                                 for f in files[start:start + BATCH]])
                model(x.to(device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return loop


def topk(folder: Path, out: Path, device: str, workers: int, **kw: object) -> Callable[[], None]:
    o = TopkOptions(model="alexnet", inputs=[str(folder)], out=str(out), layers="conv",
                    batch_size=BATCH, workers=workers, device=device, resume=False, **kw)
    plan = plan_topk(o)

    def work() -> None:
        run_topk(plan)

    return work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="topk's --workers (plain decodes "
                    "in the main process; 0 compares like with like)")
    ap.add_argument("--photos", type=Path)
    ap.add_argument("--proj-k", type=int, default=2, help="k of the projection timing")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="convmaps-bench-topk-"))
    weights = cached_weights(tmp)
    if a.photos:
        files = sorted(p for p in a.photos.iterdir() if p.suffix.lower() in (".jpg", ".png"))
        files = files[: a.images]
        folder = tmp / "photos"
        folder.mkdir()
        for f in files:
            shutil.copy(f, folder / f.name)
        files = sorted(folder.iterdir())
    else:
        folder = tmp / "photos"
        files = make_photos(folder, a.images)
    times: dict[str, list[float]] = {"plain": [], "topk": [], "topk+png": []}
    for _ in range(a.repeats):
        runs = {
            "plain": plain(files, a.device),
            "topk": topk(folder, tmp / "out", a.device, a.workers, k=9, project="none",
                         png=False),
            "topk+png": topk(folder, tmp / "out-png", a.device, a.workers, k=9, project="none",
                             png=True),
        }
        for name, fn in runs.items():  # interleaved, so drift hits every method alike
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"AlexNet, top-9 of every conv, {len(files)} photos, batch {BATCH}, workers "
          f"{a.workers}, device {a.device}, {a.repeats} repeats, {weights}; median seconds "
          "beyond start-up (images/s):")
    for k, v in med.items():
        print(f"  {k:9s} {v:7.2f}  ({len(files) / v:5.1f}/s)")
    print(f"topk / plain     = {med['topk'] / med['plain']:.2f}  (goal <= 1.3)")
    print(f"topk+png / plain = {med['topk+png'] / med['plain']:.2f}")

    k = a.proj_k
    base = topk(folder, tmp / "pk", a.device, a.workers, k=k, project="none", png=False)
    start = time.perf_counter()
    base()
    without = time.perf_counter() - start
    proj = topk(folder, tmp / "pk", a.device, a.workers, k=k, project="deconvnet", png=False)
    start = time.perf_counter()
    proj()
    with_proj = time.perf_counter() - start
    units = sum(m.out_channels for m in torchvision.models.alexnet().features
                if isinstance(m, torch.nn.Conv2d)) * min(k, len(files))
    print(f"projections (deconvnet, top-{k}, once): {with_proj:.2f} s against {without:.2f} s; "
          f"{units} units, {1000 * (with_proj - without) / units:.1f} ms extra per unit")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
