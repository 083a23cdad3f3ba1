"""`convmaps dump` of every AlexNet activation for a folder of photos against the plain
script a user would write (and torchlens, when installed), in one run; medians and ratios.

    python benchmarks/bench_dump.py [--images 100] [--repeats 3] [--workers 2] [--photos DIR]
                                    [--png-only] [--out DIR]
    python benchmarks/bench_dump.py --floor [--models alexnet,resnet18] [--images 32]
                                    [--repeats 3] [--workers W] [--threads T] [--out DIR]

- plain:    `alexnet(weights=AlexNet_Weights.DEFAULT)`, PIL decode + `weights.transforms()`,
            batched forward with a cloning hook on every leaf module, `safetensors.torch.
            save_file` per image.
- torchlens: the same model and decoding, `torchlens.trace(model, batch)` (torchlens 2.x; it
            saves every layer) per batch, then `save_file` per image (skipped when torchlens
            is not installed).
- convmaps: `plan_dump` + `run_dump` with --no-switches --no-png (the same tensors), then
            with PNG grids on, to show what PNG adds. Besides the whole call, the work beyond
            start-up (`run_dump` alone, without loading the model in `plan_dump`) is timed,
            and PNG's cost is reported on it too.

`--floor` times no whole processes (importing torch hides the work): for each of `--models`,
the dump's work beyond a one-photo run (run_dump on N photos minus run_dump on 1, the model
loaded beforehand) against the same difference for (a) a decode + forward-only loop and (b)
that loop plus writing the same tensor bytes raw, one folder per photo. See `floor.py`.

`--png-only` runs only the two convmaps methods (a few minutes on 2 cores with --images 16).
`--out DIR` writes every method's files under DIR (default: the temp folder, `$TMPDIR` or /tmp):
where files are created is part of what PNGs cost (21 more files per AlexNet image), so a
tmpfs such as /dev/shm shows convmaps' own work, and the disk a job will use shows the rest.

Every method loads the pretrained weights through torchvision's weights API and cache. When
the real file is not in your TORCH_HOME cache, a seeded random state dict is put in a temporary
cache under the same file name (speed does not depend on the values). Without --photos it makes
photo-sized JPEGs (500x375, varied content) in a temp folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from convmaps.jobs.dump import plan_dump, run_dump
from convmaps.options import DumpOptions

BATCH = 8


def make_photos(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        # Mandelbrot crops with coloured gradients: compressible like photos, all different.
        x0, y0 = -2 + (i % 10) * 0.1, -1.2 + (i // 10 % 10) * 0.08
        m = Image.effect_mandelbrot((500, 375), (x0, y0, x0 + 2.5, y0 + 2.0), 40 + i % 50)
        g = Image.linear_gradient("L").resize((500, 375)).rotate(i * 7)
        img = Image.merge("RGB", (m, g, Image.eval(m, lambda v: 255 - v)))  # noqa: B023
        paths.append(folder / f"photo{i:04d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


WEIGHTS = torchvision.models.AlexNet_Weights.DEFAULT


def cached_weights(tmp: Path, arch: str = "alexnet") -> str:
    """Use the real pretrained file if it is cached; else a seeded stand-in in a temp cache."""
    name = os.path.basename(torchvision.models.get_model_weights(arch).DEFAULT.url)
    if (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file():
        return "pretrained weights from the torch hub cache"
    if "CONVMAPS_BENCH_HUB" not in os.environ:  # one temporary cache for every model
        os.environ["CONVMAPS_BENCH_HUB"] = os.environ["TORCH_HOME"] = str(tmp / "torch")
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(arch).state_dict(), folder / name)
    return "seeded stand-in weights in a temporary torch hub cache"


def plain(files: list[Path], out: Path) -> None:
    model = torchvision.models.alexnet(weights=WEIGHTS).eval()
    tf = WEIGHTS.transforms()
    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    acts: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def keep(m: nn.Module, i: object, o: torch.Tensor) -> None:
            acts[name] = o.detach().clone()  # clone: the next in-place ReLU would overwrite it

        return keep

    handles = [m.register_forward_hook(hook(n)) for n, m in leaves]
    for start in range(0, len(files), BATCH):
        batch = files[start : start + BATCH]
        x = torch.stack([tf(Image.open(f).convert("RGB")) for f in batch])
        with torch.no_grad():
            model(x)
        for i, f in enumerate(batch):
            tensors = {k: v[i].contiguous() for k, v in acts.items()}
            save_file(tensors, out / f"{f.name}.safetensors")
    for h in handles:
        h.remove()


def lens(files: list[Path], out: Path) -> None:
    import torchlens as tl

    model = torchvision.models.alexnet(weights=WEIGHTS).eval()
    tf = WEIGHTS.transforms()
    for start in range(0, len(files), BATCH):
        batch = files[start : start + BATCH]
        x = torch.stack([tf(Image.open(f).convert("RGB")) for f in batch])
        log = tl.trace(model, x)
        outs = {lay: log[lay].out for lay in log.layer_labels}
        for i, f in enumerate(batch):
            tensors = {lay: t[i].clone() for lay, t in outs.items()  # output aliases the last layer
                       if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == len(batch)}
            save_file(tensors, out / f"{f.name}.safetensors")


def convmaps(files: list[Path], out: Path, png: bool, workers: int | None) -> float:
    """Returns the seconds of work beyond start-up (run_dump without plan_dump)."""
    o = DumpOptions(model="alexnet", inputs=[str(files[0].parent)], out=str(out),
                    switches=False, png=png, batch_size=BATCH, workers=workers, resume=False)
    plan = plan_dump(o)
    start = time.perf_counter()
    run_dump(plan)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, help="convmaps' --workers (default: its own)")
    ap.add_argument("--photos", type=Path)
    ap.add_argument("--png-only", action="store_true",
                    help="only convmaps with and without PNG (what PNG costs)")
    ap.add_argument("--out", type=Path, help="where outputs are written (default: temp folder)")
    ap.add_argument("--floor", action="store_true",
                    help="the dump's work beyond a one-photo run against a forward-only loop\n"
                         "and that loop writing the same bytes raw (see floor.py)")
    ap.add_argument("--models", default="alexnet,resnet18", help="with --floor: architectures")
    ap.add_argument("--threads", type=int,
                    help="with --floor: torch threads, every method (default: convmaps' own)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="convmaps-bench-"))
    if a.photos:
        files = sorted(p for p in a.photos.iterdir() if p.suffix.lower() in (".jpg", ".png"))
        files = files[: a.images]
    else:
        files = make_photos(tmp / "photos", a.images)
    if a.floor:
        from floor import run as floor_run  # benchmarks/ is on the path of this script

        a.batch = BATCH
        try:
            floor_run(a, files, tmp, cached_weights)
        finally:
            shutil.rmtree(tmp)
        return
    weights = cached_weights(tmp)
    methods: dict[str, Callable[[Path], float | None]] = {
        "plain": lambda out: plain(files, out),
        "convmaps": lambda out: convmaps(files, out, False, a.workers),
        "convmaps+png": lambda out: convmaps(files, out, True, a.workers),
    }
    if a.png_only:
        del methods["plain"]
    else:
        try:
            import torchlens  # noqa: F401

            methods["torchlens"] = lambda out: lens(files, out)
        except ImportError:
            print("(torchlens not installed: pip install torchlens to include it)")
    times: dict[str, list[float]] = {k: [] for k in methods}
    work: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(a.repeats):
        for name, fn in methods.items():  # interleaved, so drift hits every method alike
            out = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=a.out or tmp))
            start = time.perf_counter()
            beyond = fn(out)
            times[name].append(time.perf_counter() - start)
            if beyond is not None:
                work[name].append(beyond)
            shutil.rmtree(out)
    med = {k: statistics.median(v) for k, v in times.items()}
    run = {k: statistics.median(v) for k, v in work.items() if v}
    workers = "default" if a.workers is None else a.workers
    print(f"AlexNet, every activation, {len(files)} photos, batch {BATCH}, workers {workers}, "
          f"{a.repeats} repeats, {weights}; median seconds (images/s):")
    for k, v in med.items():
        beyond = f"; beyond start-up {run[k]:6.2f}" if k in run else ""
        print(f"  {k:13s} {v:7.2f}  ({len(files) / v:5.1f}/s){beyond}")
    if "plain" in med:
        print(f"convmaps / plain       = {med['convmaps'] / med['plain']:.2f}  (goal <= 0.9)")
    if "torchlens" in med:
        print(f"convmaps / torchlens   = {med['convmaps'] / med['torchlens']:.2f}  (goal <= 0.65)")
    print(f"PNG adds               = {med['convmaps+png'] / med['convmaps'] - 1:+.0%}")
    each = [f"{p / q:.2f}" for p, q in zip(work["convmaps+png"], work["convmaps"], strict=True)]
    print(f"with / without PNG, beyond start-up = {run['convmaps+png'] / run['convmaps']:.2f}"
          f"  (goal <= 2.0; repeat by repeat: {' '.join(each)}; outputs in {a.out or tmp})")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
