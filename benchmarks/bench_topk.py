"""`convmaps topk` of every AlexNet conv over a folder of photos against a plain decode +
preprocess + forward loop over the same folder, in one run; medians and ratios. With
`--project MODE`: the projection phase alone, against the way it was done before.

    python benchmarks/bench_topk.py [--images 40] [--repeats 3] [--workers 0] [--photos DIR]
                                    [--device cpu]
    python benchmarks/bench_topk.py --project deconvnet [--k 4] [--images 8] [--repeats 3]
                                    [--channels N]
    python benchmarks/bench_topk.py --explain [--layers features.10] [--k 4] [--images 8]

- plain:      `alexnet(weights=AlexNet_Weights.DEFAULT)` loaded beforehand; PIL decode +
              `weights.transforms()`, batched forward under `torch.no_grad()`. Nothing kept.
- topk:       `run_topk` (top-9 of features.0/3/6/8/10, `--project none --no-png`) after
              `plan_topk`: the work beyond start-up (model load, layer table, receptive fields
              are the plan's), the same batch size and decoding workers.
- topk+png:   the same with the figures (the winners are decoded again for their patches).

`--project MODE` (top-`--k` of every conv, batch 8): one streaming pass ranks the photos, then
the projection phase (decode the winners again, project every entry, cut it to its box) runs
`--repeats` times each way, interleaved, from the same tables:
- before:     as topk did it before windows: 64 entries a call, one image row per entry
              (`project_each`: an image that wins for many channels runs forward once per
              entry), the whole-map chain (`windowed=False`), each full map cropped to its box.
- after:      topk's own `_projections`: each distinct winner runs forward once per call, each
              unit goes down on its window only, cut to its box from there.
Both must give the same projections (printed: the largest difference over the largest value).
`--channels N` projects only the first N channels of each conv (quicker, less faithful).

`--explain` (top-`--k` of `--layers`, batch 8, no projections or figures): `topk` against
`topk --explain`, interleaved; what `--explain` adds per entry (its k trees of every channel,
depth 2, top 3), against one forward pass of one image (batch 1, the same model).

Weights as in bench_dump.py: the real cached file when there is one, else a seeded stand-in
in a temporary torch hub cache. Without --photos it makes photo-sized JPEGs in a temp folder.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torchvision
from bench_dump import cached_weights, make_photos
from PIL import Image
from safetensors.torch import load_file

from convmaps.core.deconv import Unit, project_each
from convmaps.core.ranking import TopK, crop
from convmaps.jobs import topk as topk_job
from convmaps.jobs.engine import Plan
from convmaps.jobs.runtime import threads
from convmaps.jobs.topk import plan_topk, run_topk
from convmaps.options import Mode, TopkOptions

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


def topk(folder: Path, out: Path, device: str, workers: int, **kw: Any) -> Callable[[], None]:
    kw.setdefault("layers", "conv")
    o = TopkOptions(model="alexnet", inputs=[str(folder)], out=str(out), batch_size=BATCH,
                    workers=workers, device=device, resume=False, **kw)
    plan = plan_topk(o)

    def work() -> None:
        run_topk(plan)

    return work


def _before(plan: Plan, key: str, top: TopK, pos: torch.Tensor | None, boxes: torch.Tensor,
            size: tuple[int, int], images: topk_job._Winners, model: torch.nn.Module,
            rows: range) -> torch.Tensor:
    """topk's projections as they were computed before windows and shared forward passes."""
    k = top.k
    pairs = [(c, r) for c in rows for r in range(k)]
    out = torch.zeros(len(rows), k, plan.loaded.in_channels, *size)
    units = [Unit(key, c, None if pos is None else (int(pos[c, r, 0]), int(pos[c, r, 1])))
             for c, r in pairs]
    device = next(p.device for p in model.parameters())
    batch = torch.stack([images.tensor(int(top.images[c, r])) for c, r in pairs]).to(device)
    got = project_each(model, batch, units, Mode(plan.options.project), plan.options.batch_size,
                       windowed=False)
    for (c, r), p in zip(pairs, got, strict=True):
        out[c - rows.start, r] = crop(p.map.float().cpu(), boxes[c, r].tolist(), size, 0.0)
    return out


def projection_phase(a: argparse.Namespace, folder: Path, tmp: Path, weights: str) -> None:
    o = TopkOptions(model="alexnet", inputs=[str(folder)], out=str(tmp / "proj"), layers="conv",
                    k=a.k, batch_size=BATCH, workers=a.workers, device=a.device, resume=False,
                    project="none", png=False)
    first = plan_topk(o)
    run_topk(first)  # the streaming pass, once: its tables feed every timed phase
    job = topk_job._topk(first)
    manifest = json.loads((tmp / "proj" / "topk" / "manifest.json").read_text())
    tables = {}
    for key in job.keys:
        got = load_file(tmp / "proj" / "topk" / f"{key}.safetensors")
        width = job.shapes[key][2]
        flat = got["positions"][..., 0] * width + got["positions"][..., 1]
        c = got["values"].shape[0] if a.channels is None else min(a.channels,
                                                                  got["values"].shape[0])
        tables[key] = (TopK(got["values"][:c], got["images"][:c], flat[:c]),
                       got["positions"][:c], got["boxes"][:c])
    # the phase's own plan, in another folder (planning claims its OUT)
    plan = plan_topk(replace(o, project=a.project, out=str(tmp / "proj2")))
    job = topk_job._topk(plan)
    model = plan.loaded.model.eval().to(a.device)
    units = sum(t.values.numel() for t, _, _ in tables.values())

    def phase(project: Callable[..., torch.Tensor], entries: int) -> dict[str, torch.Tensor]:
        images = topk_job._Winners(plan, manifest)  # decoded afresh, as a run does
        maps = {}
        with torch.no_grad(), threads(None):
            for key, (top, pos, boxes) in tables.items():
                step = max(1, entries // top.k)
                maps[key] = torch.cat([
                    project(plan, key, top, pos, boxes, job.sizes[key], images, model,
                            range(c0, min(c0 + step, top.values.shape[0])))
                    for c0 in range(0, top.values.shape[0], step)])
        return maps

    runs = {"before": lambda: phase(_before, 64),
            "after": lambda: phase(topk_job._projections, topk_job._PROJECT_ENTRIES)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, dict[str, torch.Tensor]] = {}
    for _ in range(a.repeats):
        for name, fn in runs.items():  # interleaved, so drift hits both alike
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    worst = max(float((results["after"][k] - results["before"][k]).abs().max()
                      / results["before"][k].abs().max()) for k in tables)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"AlexNet projection phase ({a.project}), top-{a.k} of every conv, {len(tables)} "
          f"modules, {units} units, {len(plan.sources)} photos, batch {BATCH}, device "
          f"{a.device}, {a.repeats} repeats, {weights}; seconds (median; each repeat):")
    for k, v in med.items():
        each = " ".join(f"{t:.2f}" for t in times[k])
        print(f"  {k:7s} {v:7.2f}  ({1000 * v / units:5.1f} ms a unit; {each})")
    print(f"before / after = {med['before'] / med['after']:.2f}  (goal >= 3)")
    print(f"largest difference / largest value = {worst:.2e}  (goal <= 1e-5)")
    assert math.isfinite(worst)


def explain_phase(a: argparse.Namespace, folder: Path, tmp: Path, files: list[Path]) -> None:
    times: dict[str, list[float]] = {"topk": [], "topk --explain": [], "forward": []}
    model = torchvision.models.alexnet(weights=torchvision.models.AlexNet_Weights.DEFAULT)
    tf = torchvision.models.AlexNet_Weights.DEFAULT.transforms()
    x = tf(Image.open(files[0]).convert("RGB"))[None]
    entries = 0
    for _ in range(a.repeats):
        for name, explained in (("topk", False), ("topk --explain", True)):
            out = tmp / name.replace(" ", "")
            work = topk(folder, out, a.device, a.workers, k=a.k, project="none", png=False,
                        explain=explained, layers=a.layers)
            start = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - start)
            if explained:
                trees = list((out / "topk" / "explain").rglob("*.json"))
                entries = sum(len(json.loads(f.read_text())["entries"]) for f in trees)
        with torch.no_grad(), threads(None):
            for _ in range(5):  # (the median of the fifth, warm)
                start = time.perf_counter()
                model.eval()(x)
                forward = time.perf_counter() - start
        times["forward"].append(forward)
    med = {k: statistics.median(v) for k, v in times.items()}
    extra = (med["topk --explain"] - med["topk"]) / max(entries, 1)
    print(f"AlexNet, top-{a.k} of {a.layers}, {len(files)} photos, {a.repeats} repeats: "
          f"{entries} entries explained; median seconds")
    for k, v in med.items():
        print(f"  {k:15s} {v:8.3f}")
    print(f"--explain adds {extra * 1e3:.1f} ms an entry = {extra / med['forward']:.2f}x one "
          "forward pass (goal <= 2)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="topk's --workers (plain decodes "
                    "in the main process; 0 compares like with like)")
    ap.add_argument("--photos", type=Path)
    ap.add_argument("--project", choices=[m.value for m in Mode], help="time the projection "
                    "phase in this mode, before and after (not the streaming pass)")
    ap.add_argument("--k", type=int, default=4, help="with --project: the top-k projected")
    ap.add_argument("--channels", type=int, help="with --project: the first N channels only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--explain", action="store_true", help="time what topk --explain adds")
    ap.add_argument("--layers", default="features.10", help="with --explain: topk's --layers")
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
    if a.project:
        projection_phase(a, folder, tmp, weights)
        shutil.rmtree(tmp)
        return
    if a.explain:
        explain_phase(a, folder, tmp, files)
        shutil.rmtree(tmp)
        return
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

    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
