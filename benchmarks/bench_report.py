"""How long `convmaps report` takes for a dump of many images (the issue: a 1,000-image dump's
site builds in seconds), and how big its pages are.

    python benchmarks/bench_report.py [--images 1000] [--repeats 3]

It dumps the bundled LeNet over N small generated pictures (with PNGs, as a user would before
a report), then builds the report: once cold (every input picture drawn) and `--repeats` times
warm (pictures kept from the last build, as on a rebuild). Medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from convmaps.jobs.dump import plan_dump, run_dump
from convmaps.options import DumpOptions
from convmaps.report import build_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="convmaps-bench-report-"))
    rng = np.random.default_rng(0)
    (root / "in").mkdir()
    for i in range(args.images):
        pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        Image.fromarray(pixels, "L").save(root / "in" / f"{i:05d}.png")
    start = time.perf_counter()
    run_dump(plan_dump(DumpOptions(model="lenet", inputs=[str(root / "in")], out=str(root / "o"),
                                   batch_size=64)))
    dumped = time.perf_counter() - start
    start = time.perf_counter()
    build_report(root / "o")
    cold = time.perf_counter() - start
    warm = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        build_report(root / "o")
        warm.append(time.perf_counter() - start)
    pages = list((root / "o" / "report").rglob("*.html"))
    sizes = sorted(p.stat().st_size for p in pages)
    print(f"LeNet dump of {args.images} images with PNGs: {dumped:.1f} s")
    print(f"report, cold (input pictures drawn): {cold:.2f} s")
    print(f"report, warm (median of {args.repeats}): {statistics.median(warm):.2f} s")
    print(f"{len(pages)} pages, median {sizes[len(sizes) // 2] / 1e3:.1f} kB, largest "
          f"{sizes[-1] / 1e3:.1f} kB (pictures are referenced, not inlined)")


if __name__ == "__main__":
    main()
