"""Peak memory of decomposing every VGG16 conv for one image in float16 (issue 4: < 3 GiB),
next to the same dump without kernel maps, in one run.

    python benchmarks/peak_rss.py [--model vgg16] [--keep]

Each variant runs `convmaps dump` in its own process; peak RSS is that process's ru_maxrss.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: list[str]) -> tuple[float, float]:
    """(peak RSS in GiB, wall seconds) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "convmaps", *args], check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest child so far, so run the smaller variant first
    return max(peak, before) / 2**20, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="vgg16")
    ap.add_argument("--keep", action="store_true", help="keep the output folder")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="convmaps-rss-"))
    from PIL import Image

    Image.effect_mandelbrot((320, 240), (-2, -1.2, 1, 1.2), 60).convert("RGB").save(tmp / "a.jpg")
    common = ["dump", a.model, str(tmp / "a.jpg"), "-w", "none", "--no-png", "--dtype", "float16",
              "--max-bytes", "20GB"]
    base, t0 = run([*common, "--out", str(tmp / "base")])
    peak, t1 = run([*common, "--kernels", "conv", "--out", str(tmp / "kernels")])
    written = (tmp / "kernels" / "a.jpg" / "kernels.safetensors").stat().st_size
    print(f"{a.model}, every conv, float16: {written / 1e9:.2f} GB of kernel maps in {t1:.0f} s")
    print(f"peak RSS without kernel maps {base:.2f} GiB, with {peak:.2f} GiB "
          f"(+{(peak - base) * 1024:.0f} MiB; goal < 3 GiB)")
    if not a.keep:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
