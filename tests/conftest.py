"""Shared fixtures: tiny models and images made by the tests themselves."""

from __future__ import annotations

import errno
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

FASHION = Path("/usr/share/datasets/fashion-mnist")
GOLDEN = Path(__file__).parent / "golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite the golden files under tests/golden/ from this run")


@pytest.fixture
def golden(request: pytest.FixtureRequest):
    """`golden(name, png)`: compare a PNG with tests/golden/<name>.png (its pixels, size and
    text chunks: zlib versions may pack the same picture differently); `pytest --update-golden`
    writes it instead, so that a layout change shows up as a picture diff in review."""
    import io

    from PIL import Image

    def check(name: str, png: bytes) -> None:
        path = GOLDEN / f"{name}.png"
        if request.config.getoption("--update-golden"):
            GOLDEN.mkdir(exist_ok=True)
            path.write_bytes(png)
            return
        assert path.is_file(), f"no golden file {path}: run pytest --update-golden and look at it"
        want, got = Image.open(path), Image.open(io.BytesIO(png))
        assert got.size == want.size, f"{name}: size {got.size} != golden {want.size}"
        assert got.convert("RGB").tobytes() == want.convert("RGB").tobytes(), (
            f"{name}: pixels differ from {path}; if the change is meant, "
            "run pytest --update-golden")
        assert {k: v for k, v in got.info.items() if k.startswith("convmaps-")} == \
            {k: v for k, v in want.info.items() if k.startswith("convmaps-")}

    return check


def release(path: Path) -> None:
    """Let every reader blocked on the FIFO at `path` go (it reads end-of-file)."""
    for _ in range(100):
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as e:  # ENXIO: no reader left; anything else: no FIFO left
            if e.errno != errno.ENXIO:
                raise
            return


@pytest.fixture
def fifo() -> Iterator[Callable[[Path], Path]]:
    """`fifo(path)` makes a named pipe at `path`; after the test, whatever still waits on one
    is let go, so that code that wrongly opens one fails its test instead of hanging."""
    made: list[Path] = []

    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        made.append(path)
        return path

    yield make
    for path in made:
        if path.exists() and not path.is_file():
            release(path)


def no_hang(fn: Callable[..., Any], *args: Any, seconds: float = 60, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, which must return (or raise) within `seconds`: a call stuck on
    opening a FIFO fails the test rather than hanging the run (unless it holds the GIL)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the test's thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} hung for {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture
def tiny_cnn() -> nn.Sequential:
    """Conv -> in-place ReLU -> max-pool -> conv -> ReLU -> flatten -> linear, like a
    miniature AlexNet (in-place ReLUs included, which is the trap capture must avoid)."""
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(3, 4, 3, padding=1)),
                ("relu1", nn.ReLU(inplace=True)),
                ("pool1", nn.MaxPool2d(3, 2)),
                ("conv2", nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False)),
                ("relu2", nn.ReLU(inplace=True)),
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(5 * 2 * 2, 7)),  # for 10x10 inputs
            ]
        )
    ).eval()


def write_image(path: Path, size: tuple[int, int] = (40, 32), mode: str = "RGB",
                seed: int = 0, fmt: str | None = None) -> Path:
    """A small random picture (deterministic per seed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB").convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def recompute(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An independent recomputation with torch.nn.functional, not the module's forward."""
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, module.weight, module.bias, module.stride, module.padding,
                        module.dilation, module.groups)
    if isinstance(module, nn.ReLU):
        return x.clamp(min=0)
    if isinstance(module, nn.MaxPool2d):
        return F.max_pool2d(x, module.kernel_size, module.stride, module.padding,
                            module.dilation, module.ceil_mode)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return F.adaptive_avg_pool2d(x, module.output_size)
    if isinstance(module, nn.Linear):
        return x.flatten(1) @ module.weight.T + module.bias
    if isinstance(module, (nn.Dropout, nn.Flatten)):
        return x.flatten(1) if isinstance(module, nn.Flatten) else x
    raise NotImplementedError(type(module))


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path opened (by `os.open` or `open`) while the test runs, in order."""
    import builtins

    paths: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def os_open(p: Any, *a: Any, **k: Any) -> Any:
        paths.append(str(p))
        return real_os_open(p, *a, **k)

    def py_open(p: Any, *a: Any, **k: Any) -> Any:
        paths.append(str(p))
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", py_open)
    return paths


def sharded_like_one(args: list[str], tmp: Path, manifest: str) -> dict[str, Any]:
    """Run a job command (`args`, without --out) in one process into tmp/one and as two shards
    into tmp/two; asserts the two give the same manifest and the same bytes in every file it
    lists, with no shard manifest left; returns the manifest."""
    from typer.testing import CliRunner

    from convmaps.cli import app

    runner = CliRunner()
    assert runner.invoke(app, [*args, "--out", str(tmp / "one")]).exit_code == 0
    for i in range(2):
        result = runner.invoke(app, [*args, "--out", str(tmp / "two"), "--shard", f"{i}/2"])
        assert result.exit_code == 0, result.output
        # each shard must have work of its own, or the merge of two halves goes untested
        written = re.search(r"(\d+) image\(s\) written", " ".join(result.output.split()))
        assert written and int(written[1]) > 0, result.output
    one = json.loads((tmp / "one" / manifest).read_text())
    two = json.loads((tmp / "two" / manifest).read_text())
    assert [e["key"] for e in one["inputs"]] == [e["key"] for e in two["inputs"]]
    for e in one["inputs"]:
        for f in e["files"]:
            assert (tmp / "one" / e["key"] / f).read_bytes() == \
                (tmp / "two" / e["key"] / f).read_bytes()
    assert not list((tmp / "two").glob(f"{manifest.removesuffix('.json')}.shard-*"))
    return one


def refused_in_one_line(args: list[str], words: str) -> None:
    """A command that exits 1 with one line saying `words`."""
    from typer.testing import CliRunner

    from convmaps.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and words in " ".join(result.output.split()), result.output


def logged(args: list[str]) -> str:
    """A command run as a process whose stderr is no terminal; returns its stderr, with no
    terminal escape in it."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "convmaps", *args], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stderr
    return proc.stderr
