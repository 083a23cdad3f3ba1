"""torchrun with 2 CPU processes (gloo): every image done once, one merged result, outputs
identical to a single-process run, for dump and topk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from convmaps.core.models import build

from .conftest import write_image
from .test_dump import _files

pytestmark = [pytest.mark.slow,  # each spawns torchrun and its processes: ~9 s
              pytest.mark.skipif(shutil.which("torchrun") is None,
                                 reason="torchrun is not on PATH")]


def _single_and_torchrun(tmp_path: Path, command: str, args: list[str]) -> tuple[Path, Path]:
    """OUT of one process and OUT of `torchrun --nproc-per-node 2`, same command and args."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    single = subprocess.run([sys.executable, "-m", "convmaps", command, *args, "--out",
                             str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(
        ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "convmaps", command, *args,
         "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    return tmp_path / "one", tmp_path / "two"


def test_torchrun_two_processes_match_one(tmp_path):
    photos = tmp_path / "photos"
    for i in range(7):
        write_image(photos / f"{'ab'[i % 2]}/img{i}.png", seed=i)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    ckpt = tmp_path / "lenet.safetensors"
    save_file(build("lenet").state_dict(), ckpt, {"arch": "lenet"})
    one, two = _single_and_torchrun(tmp_path, "dump", [
        str(ckpt), str(photos), "--batch-size", "2", "--kernels", "C3", "--png-cap", "2"])
    assert not list(two.glob("manifest.shard-*"))
    assert _files(one) == _files(two)


def test_torchrun_topk_two_processes_match_one(tmp_path):
    photos = tmp_path / "photos"
    for i in range(7):
        write_image(photos / f"img{i}.png", seed=i)
    one, two = _single_and_torchrun(tmp_path, "topk", [
        "lenet", str(photos), "--batch-size", "2", "-k", "3", "--layers", "C1,F6",
        "--png-cap", "1", "--workers", "0"])
    files = _files(one)
    assert "topk/C1.safetensors" in files and not any("partial" in k for k in files)
    assert _files(two) == files
