"""ImageNet-scale bookkeeping: a dump manifest and a top-k manifest and checkpoint of N images
(synthetic entries, default 1.3 M): write, read back (checked), merge 2 shards, and the top-k
checkpoint's save and load. Reports seconds, file sizes and the peak memory of the process.

    python benchmarks/bench_scale.py [--images 1300000] [--out DIR]

No model runs: this measures what grows with the number of images, not with their pixels.
"""

from __future__ import annotations

import argparse
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

from convmaps.core.ranking import empty
from convmaps.io import layout
from convmaps.io import manifest as manifests
from convmaps.io.store import write_json


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(label: str, fn, *a):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = fn(*a)
    print(f"  {label:<38} {time.perf_counter() - start:7.2f} s   peak {peak_mib():7.0f} MiB")
    return result


def entries(n: int, files: list[str]) -> list[dict]:  # type: ignore[type-arg]
    sha = "ab" * 32
    top5 = [{"class": f"class {c}", "index": c, "probability": 0.2} for c in range(5)]
    return [manifests.entry(f"train/n{i // 1300:08d}/{i}.JPEG",
                            f"/data/imagenet/train/n{i // 1300:08d}/{i}.JPEG", sha, "ok", files,
                            top5 if files else None) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=1_300_000)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="convmaps-scale-", dir=a.out))
    n = a.images
    print(f"{n:,} images on {platform.machine()} ({platform.platform()}), "
          f"{len(__import__('os').sched_getaffinity(0))} cores")
    header = {"run": "0123456789abcdef", "inputs_id": "fedcba9876543210", "model": "alexnet"}
    try:
        for what, files in (("dump", [layout.ACTIVATIONS, layout.SWITCHES]), ("topk", [])):
            print(f"{what} manifest:")
            made = timed("build entries", entries, n, files)
            m = manifests.build(header, made)
            timed("write manifest.json", write_json, root / layout.MANIFEST, m)
            size = (root / layout.MANIFEST).stat().st_size
            print(f"  {'file size':<38} {size / 1e6:7.1f} MB ({size / n:.0f} B an image)")
            timed("read (checked)", manifests.read, root)
            half = n // 2
            for i, part in enumerate((made[:half], made[half:])):
                write_json(root / layout.shard_manifest(i, 2), manifests.build(header, part))
            timed("merge 2 shard manifests", manifests.merge, root, header, 2,
                  (e["key"] for e in made), [])
            del made, m
        print("topk checkpoint (entries as tensors):")
        import convmaps.jobs.topk as job

        class _Plan:  # what _save_state/_load_state read of a plan
            folder = root / "topk"
            fingerprint = header["run"]
            sources = [type("S", (), {"key": str(i), "path": Path(str(i))})() for i in range(n)]
            shard = (0, 1)

        plan = _Plan()
        plan.header = header  # type: ignore[attr-defined]
        topk = job.Topk()
        topk.keys, topk.shapes = ["features.0"], {"features.0": (64, 55, 55)}
        topk.layout = layout.TopkLayout(("features.0",), (0,), False)
        topk.options = type("O", (), {"k": 9, "batch_size": 64})()  # type: ignore[assignment]
        plan.job = topk  # type: ignore[attr-defined]
        state = job._State({"features.0": empty(64)}, {}, done=n // 64)
        state.entries = {i: {"key": str(i), "source": str(i), "sha256": "ab" * 32,
                             "status": "ok", "files": []} for i in range(n)}
        timed("save", job._save_state, plan, state, (0, 1))
        path = root / "topk" / topk.layout.state_file(0, 1)
        size = path.stat().st_size
        print(f"  {'file size':<38} {size / 1e6:7.1f} MB ({size / n:.0f} B an image)")
        back = timed("load (checked)", job._load_state, plan, (0, 1))
        assert back is not None and len(back.entries) == n
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
