from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from convmaps.cli import app
from convmaps.report.summary import dump_stats, file_stats, tensor_stats

NAN = float("nan")


def _expected(values: list[float]) -> tuple[float, float, float, float]:
    """min, max, mean, std (n - 1) of the non-NaN values, recomputed with the statistics
    module rather than torch."""
    import statistics

    finite = [v for v in values if not math.isnan(v)]
    return min(finite), max(finite), statistics.fmean(finite), statistics.stdev(finite)


@pytest.mark.parametrize("values", [
    [NAN, 1.0, -2.0, NAN, 0.0, 4.5],
    [1.0, -2.0, 0.0, 4.5, NAN],  # NaN last: today's min/max would differ by position
    [-2.0, NAN, NAN, 4.5, 1.0, 0.0],
])
def test_nan_is_counted_and_left_out_wherever_it_sits(values):
    s = tensor_stats("x", torch.tensor(values))
    lo, hi, mean, std = _expected(values)
    assert (s.min, s.max) == (lo, hi)
    assert s.mean == pytest.approx(mean, rel=1e-12) and s.std == pytest.approx(std, rel=1e-12)
    assert s.nans == sum(math.isnan(v) for v in values)
    assert s.zeros == pytest.approx(1 / len(values))  # a share of all values


def test_all_nan_gives_nan_figures_and_the_count():
    s = tensor_stats("x", torch.full((2, 3), NAN, dtype=torch.float16))
    assert all(math.isnan(v) for v in (s.min, s.max, s.mean, s.std))
    assert (s.nans, s.zeros) == (6, 0.0)


def test_dump_stats_over_images_do_not_depend_on_which_image_has_nan(tmp_path):
    images = {"a": [NAN, NAN], "b": [3.0, -1.0], "c": [NAN, 0.5]}
    for key, values in images.items():
        (tmp_path / key).mkdir()
        save_file({"m": torch.tensor(values)}, tmp_path / key / "activations.safetensors")
    entries = [{"key": k, "source": k, "status": "ok", "files": ["activations.safetensors"]}
               for k in images]
    (tmp_path / "manifest.json").write_text(json.dumps({"run": "test", "inputs": entries}))
    (s,) = dump_stats(tmp_path)["activations.safetensors"]
    lo, hi, mean, std = _expected([v for vs in images.values() for v in vs])
    assert (s.min, s.max, s.nans, s.count) == (lo, hi, 3, 3)
    assert s.mean == pytest.approx(mean) and s.std == pytest.approx(std)


def test_show_prints_nan_aware_figures_and_a_nan_column(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"x": torch.tensor([NAN, 2.0, -3.0, NAN]), "y": torch.tensor([1.0, 0.0])}, path)
    assert [s.nans for s in file_stats(path)] == [2, 0]
    result = CliRunner().invoke(app, ["show", str(path)])
    assert result.exit_code == 0, result.output
    assert "NaN" in result.output  # the column
    row = next(line for line in result.output.splitlines() if line.lstrip("│ ").startswith("x "))
    cells = [c.strip() for c in row.split("│") if c.strip()]
    assert cells[3:6] == ["-3", "2", "-0.5"] and cells[-1] == "2", cells


def test_show_of_a_dump_with_a_fifo_in_place_of_a_file_is_one_line(tmp_path, fifo):
    (tmp_path / "a").mkdir()
    save_file({"m": torch.ones(2)}, tmp_path / "a" / "activations.safetensors")
    fifo(tmp_path / "b" / "activations.safetensors")
    entries = [{"key": k, "source": k, "status": "ok", "files": ["activations.safetensors"]}
               for k in "ab"]
    (tmp_path / "manifest.json").write_text(json.dumps({"run": "test", "inputs": entries}))
    # a process, not a thread: safetensors would block on the FIFO holding the GIL
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run([sys.executable, "-m", "convmaps", "show", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "not a regular file but a named pipe" in run.stderr
    assert run.stderr.count("\n") == 1
