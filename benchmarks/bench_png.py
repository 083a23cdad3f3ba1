"""Drawing and encoding AlexNet's 21 activation PNGs of one photo, as a dump does it
(`render.draw(...).png()`, each with its title strip), per deflate level: what the default
level rests on.

    python benchmarks/bench_png.py [--photos 3] [--repeats 7]

Random-init (seeded) AlexNet, `bench_dump.make_photos` pictures, one compute thread; medians
of the per-photo sums. Speed does not depend on the weights' values much, the bytes do.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_dump import make_photos

from convmaps import render
from convmaps.core.capture import trace
from convmaps.core.models import load_model
from convmaps.io.images import decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--photos", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    loaded = load_model("alexnet", "none", None)
    model = loaded.model.to(memory_format=torch.channels_last)
    files = make_photos(Path(tempfile.mkdtemp(prefix="convmaps-png-")), a.photos)
    x = torch.stack([loaded.preprocess(decode(f)) for f in files])
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    got = trace(model, x.to(memory_format=torch.channels_last), leaves, [])
    draw: list[float] = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        images = [[render.draw("activation", got.outputs[k][i],
                               title=f"alexnet · {k} · {files[i].name}") for k in leaves]
                  for i in range(len(files))]
        draw.append((time.perf_counter() - start) / len(files))
    pixels = sum(pic.rows.shape[0] * (pic.rows.shape[1] - 1) for pic in images[0])
    print(f"AlexNet, {len(leaves)} modules, {pixels / 1e6:.2f} Mpx per photo; median of "
          f"{a.repeats}: drawing {statistics.median(draw) * 1e3:.1f} ms per photo")
    for level in (0, 1, 2, 3, 6):
        times, size = [], 0
        for _ in range(a.repeats):
            start = time.perf_counter()
            size = sum(len(pic.png(compress_level=level))
                       for row in images for pic in row) // len(files)
            times.append((time.perf_counter() - start) / len(files))
        print(f"  level {level}: {statistics.median(times) * 1e3:6.1f} ms, {size / 1024:6.0f} KiB"
              " per photo")


if __name__ == "__main__":
    main()
