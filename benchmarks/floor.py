"""`bench_dump.py --floor`: the dump's work beyond a one-image run against two floors.

Importing torch and torchvision takes seconds, which hides the work in whole-process timings,
so every method here runs in this process and is timed twice, on N photos and on the first
photo alone; its "work" is the difference. Loading the model is never timed.

- dump:     `plan_dump` (not timed) + `run_dump` (timed), every module's output and the
            max-pools' switches, no PNG; workers, threads and batch as given.
- floor a:  decode + forward only: a DataLoader over the same photos (PIL decode,
            `weights.transforms()`, same batch size and workers), channels-last model and
            input, `torch.inference_mode()`, the same torch threads.
- floor b:  floor a plus writing the same bytes raw: forward hooks keep every module's output
            that the dump saves (the same keys, in-place modules switched off, and the outputs
            the model's own code modifies in place afterwards cloned, as the dump must), the
            pools' switches come from `F.max_pool2d_with_indices` on the pool's input, and per
            image `OUT/<photo>/activations.bin` and `switches.bin` get the tensors' bytes with
            plain `open(...).write(...)`, in the loop, in this thread.

The byte counts are checked once per model: floor b's files hold exactly the tensor bytes of
the dump's two safetensors files. Methods are interleaved within each repeat, after one
untimed warm-up of each (batch shapes, oneDNN primitive cache).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torch.nn.modules.utils import _pair

from convmaps.jobs.dump import plan_dump, run_dump
from convmaps.jobs.runtime import default_threads, default_workers, usable_cores
from convmaps.options import DumpOptions


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{platform.platform()}; {cpu}; {os.cpu_count()} cores ({usable_cores()} usable); "
            f"python {platform.python_version()}, torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}; load average {load}")


# --- the dump ---------------------------------------------------------------------------------


def dump_options(arch: str, folder: Path, out: Path, a: argparse.Namespace) -> DumpOptions:
    return DumpOptions(model=arch, inputs=[str(folder)], out=str(out), png=False,
                       workers=a.workers, threads=a.threads, batch_size=a.batch, resume=False,
                       max_bytes="1TB")


def saved_keys(arch: str, folder: Path, tmp: Path, a: argparse.Namespace
               ) -> tuple[list[str], list[str]]:
    """The activation and switch keys a dump saves (`module` or `module@call`)."""
    out = tmp / f"probe-{arch}"
    plan = plan_dump(dump_options(arch, folder, out, a))
    if plan.lock is not None:
        plan.lock.release()
    lay = plan.job.layout  # type: ignore[attr-defined]
    shutil.rmtree(out, ignore_errors=True)
    return list(lay.activations), list(lay.switches)


def dump(arch: str, folder: Path, out: Path, a: argparse.Namespace) -> float:
    plan = plan_dump(dump_options(arch, folder, out, a))  # loads the model: not timed
    gc.collect()
    start = time.perf_counter()
    run_dump(plan)
    return time.perf_counter() - start


def tensor_bytes(path: Path) -> int:
    """The bytes of a safetensors file's tensors (its size less the header)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0]
               for k, v in header.items() if k != "__metadata__")


# --- the floors -------------------------------------------------------------------------------


class Photos(torch.utils.data.Dataset[torch.Tensor]):
    def __init__(self, files: list[Path], tf: Callable[[Image.Image], torch.Tensor]):
        self.files, self.tf = files, tf

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as im:
            return self.tf(im.convert("RGB"))


class Hooked:
    """A torchvision model (channels-last, in-place modules off) whose forward hooks keep the
    dump's keys: outputs in `acts`, max-pool switches in `switches`, while `on`."""

    def __init__(self, arch: str, acts: list[str], switches: list[str]):
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        self.model = torchvision.models.get_model(arch, weights=weights).eval()
        self.model.to(memory_format=torch.channels_last)
        self.tf = weights.transforms()
        for m in self.model.modules():
            if hasattr(m, "inplace"):
                m.inplace = False
        self.keys, self.switch_keys = set(acts), set(switches)
        self.acts: dict[str, torch.Tensor] = {}
        self.switches: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.clone: set[str] = set()
        self.on = False
        modules = dict(self.model.named_modules())
        for name in {k.split("@")[0] for k in [*acts, *switches]}:
            modules[name].register_forward_hook(self._hook(name))
        self.clone = self._mutated()

    def _hook(self, name: str) -> Callable[..., None]:
        def keep(m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if not self.on:
                return
            n = self.calls.get(name, 0)
            self.calls[name] = n + 1
            key = name if n == 0 else f"{name}@{n}"
            if key in self.keys:
                self.acts[key] = out.clone() if key in self.clone else out
                if hasattr(self, "versions"):
                    self.versions[key] = out._version
            if key in self.switch_keys:
                assert isinstance(m, nn.MaxPool2d)
                self.switches[key] = F.max_pool2d_with_indices(
                    inputs[0], _pair(m.kernel_size), _pair(m.stride), _pair(m.padding),
                    _pair(m.dilation), m.ceil_mode)[1]

        return keep

    def forward(self, x: torch.Tensor) -> None:
        self.acts, self.switches, self.calls = {}, {}, {}
        self.on = True
        try:
            self.model(x)
        finally:
            self.on = False

    def _mutated(self) -> set[str]:
        """Kept outputs that the model's own code modifies in place afterwards (ResNet's
        `out += identity`): found once, on a random batch, by their version counters."""
        self.versions: dict[str, int] = {}
        with torch.no_grad():
            self.forward(torch.randn(2, 3, 224, 224).contiguous(memory_format=torch.channels_last))
        changed = {k for k, v in self.acts.items() if v._version != self.versions[k]}
        del self.versions  # inference tensors have no version counter
        return changed


def floor(h: Hooked, files: list[Path], out: Path | None, a: argparse.Namespace) -> float:
    """Floor a (`out` None): decode + forward. Floor b: plus the raw bytes per image."""
    gc.collect()
    before = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        start = time.perf_counter()
        loader = torch.utils.data.DataLoader(Photos(files, h.tf), batch_size=a.batch,
                                             num_workers=a.workers)
        with torch.inference_mode():
            for b, x in enumerate(loader):
                x = x.contiguous(memory_format=torch.channels_last)
                if out is None:
                    h.model(x)
                    continue
                h.forward(x)
                for i, f in enumerate(files[b * a.batch : (b + 1) * a.batch]):
                    folder = out / f.stem
                    folder.mkdir()
                    for name, store in (("activations.bin", h.acts), ("switches.bin", h.switches)):
                        with open(folder / name, "wb") as fh:
                            for t in store.values():
                                fh.write(t[i].contiguous().numpy().data)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(before)


# --- the comparison ---------------------------------------------------------------------------


def compare(arch: str, files: list[Path], tmp: Path, a: argparse.Namespace) -> None:
    folders = {}
    for n in sorted({1, min(a.batch, len(files)), len(files)}):
        folders[n] = tmp / f"{arch}-{n}"
        folders[n].mkdir()
        for f in files[:n]:
            shutil.copyfile(f, folders[n] / f.name)
    acts, switches = saved_keys(arch, folders[1], tmp, a)
    h = Hooked(arch, acts, switches)
    where = a.out or tmp

    def run(method: str, n: int) -> float:
        room = Path(tempfile.mkdtemp(prefix=f"{arch}-{method.replace(' ', '')}-", dir=where))
        out = room / "out"
        try:
            if method == "dump":
                return dump(arch, folders[n], out, a)
            if method == "floor b":
                out.mkdir()
            return floor(h, sorted(folders[n].iterdir()), out if method == "floor b" else None,
                         a)
        finally:
            shutil.rmtree(room)

    check_bytes(arch, h, folders[1], tmp, a)
    methods = ("dump", "floor a", "floor b")
    for m in methods:  # warm-up, untimed: both batch shapes, once each
        run(m, 1)
        run(m, min(a.batch, len(files)))
    whole: dict[str, list[float]] = {m: [] for m in methods}
    single: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(a.repeats):
        for m in methods:  # interleaved, so drift hits every method alike
            whole[m].append(run(m, len(files)))
            single[m].append(run(m, 1))
    work = {m: [p - q for p, q in zip(whole[m], single[m], strict=True)] for m in methods}
    med = {m: statistics.median(v) for m, v in work.items()}
    print(f"{arch}: {len(files)} photos vs 1, batch {a.batch}, workers {a.workers}, threads "
          f"{a.threads}, {a.repeats} repeats, outputs in {where}; seconds, median:")
    for m in methods:
        print(f"  {m:8s} work {med[m]:6.3f}  (N photos {statistics.median(whole[m]):6.3f}, "
              f"1 photo {statistics.median(single[m]):6.3f}; work by repeat "
              f"{' '.join(f'{x:.3f}' for x in work[m])})")
    for m, goal in (("floor b", "  (goal <= 1.15)"), ("floor a", "")):
        each = [p / q for p, q in zip(work["dump"], work[m], strict=True)]
        print(f"  dump work / {m} work = {med['dump'] / med[m]:.2f}{goal}; by repeat "
              f"{' '.join(f'{x:.2f}' for x in each)} (median {statistics.median(each):.2f})")


def check_bytes(arch: str, h: Hooked, one: Path, tmp: Path, a: argparse.Namespace) -> None:
    """Floor b writes exactly the tensor bytes of the dump's safetensors files."""
    ref, raw = tmp / f"{arch}-ref-dump", tmp / f"{arch}-ref-floor"
    raw.mkdir()
    dump(arch, one, ref, a)
    photos = sorted(one.iterdir())
    floor(h, photos, raw, a)
    theirs = sum(tensor_bytes(p) for p in ref.glob("*/*.safetensors"))
    ours = sum(p.stat().st_size for p in raw.glob("*/*.bin"))
    shutil.rmtree(ref)
    shutil.rmtree(raw)
    print(f"  tensor bytes per photo: dump {theirs:,}, floor b {ours:,} (floor b clones "
          f"{len(h.clone)} output(s) modified in place later: {', '.join(sorted(h.clone))})")
    assert theirs == ours, "floor b does not write the dump's bytes"


def run(a: argparse.Namespace, files: list[Path], tmp: Path,
        cached: Callable[[Path, str], str]) -> None:
    a.workers = default_workers() if a.workers is None else a.workers
    a.threads = default_threads() if a.threads is None else a.threads
    print(f"machine: {machine()}")
    for arch in a.models.split(","):
        weights = cached(tmp, arch)
        print(f"{arch}: {weights}")
        compare(arch, files, tmp, a)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
