"""The `invariance` job and command: every distance and probability against a recomputation
here (affine applied here, outputs taken by hooks written here), determinism on AlexNet's
in-place ReLUs, shards, resume, ownership, errors, progress, plots and the report page."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torchvision.transforms.v2 import functional as F  # noqa: N812
from typer.testing import CliRunner

from convmaps.cli import app
from convmaps.core.invariance import amounts
from convmaps.core.models import load_model
from convmaps.errors import ConvmapsError
from convmaps.io.images import decode
from convmaps.jobs.engine import plan_job, run_job
from convmaps.jobs.invariance import Invariance
from convmaps.options import InvarianceOptions

from .conftest import write_image

runner = CliRunner()


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def _outputs(model, batch, names):
    """Each named module's output for `batch` (copied at once: a later in-place ReLU must not
    change it) and the model's logits."""
    kept: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def keep(name):
        def hook(module, args, out):  # returns None: a returned value would replace `out`
            kept.setdefault(name, out.detach().clone())
        return hook

    hooks = [modules[n].register_forward_hook(keep(n)) for n in names]
    try:
        with torch.no_grad():
            logits = model.eval()(batch)
    finally:
        for h in hooks:
            h.remove()
    return kept, logits


def _expected(model, x, transform, values, names):
    """Distances (T, L) and probabilities (T,), one image and one amount at a time."""
    base, logits = _outputs(model, x[None], names)
    top = int(logits[0].argmax())
    dist, prob = [], []
    for a in values:
        moved = F.affine(x, angle=a if transform == "rotate" else 0.0,
                         translate=[0.0, a if transform == "translate" else 0.0],
                         scale=a if transform == "scale" else 1.0, shear=[0.0, 0.0],
                         interpolation=F.InterpolationMode.BILINEAR, fill=0.0)
        got, out = _outputs(model, moved[None], names)
        dist.append([float(torch.sqrt(((got[n] - base[n]) ** 2).sum())) for n in names])
        prob.append(float(out[0].softmax(-1)[top]))
    return torch.tensor(dist), torch.tensor(prob), top


def _run(out: Path, **opts) -> dict:
    o = InvarianceOptions(out=str(out), workers=0, **opts)
    return run_job(plan_job(o, Invariance())).manifest


def test_lenet_curves_equal_a_recomputation_here(tmp_path):
    out = tmp_path / "o"
    m = _run(out, steps=5, batch_size=3)
    loaded = load_model("lenet")
    modules = ["C1", "C3", "C5", "F6", "OUTPUT"]  # every conv and linear layer, in order
    assert m["modules"] == modules and m["transforms"] == ["translate", "scale", "rotate"]
    got, meta = _read(out / "invariance" / "invariance.safetensors")
    assert json.loads(meta["modules"]) == modules and meta["run"] == m["run"]
    assert got["amounts/translate"].tolist() == [-8, -4, 0, 4, 8]  # 60 px of 224, at 28
    assert got["amounts/rotate"].tolist() == [0, 72, 144, 216, 288]
    assert got["images"].tolist() == list(range(8))
    for t in ("translate", "scale", "rotate"):
        assert got[f"distance/{t}"].shape == (8, 5, 5) and got[f"probability/{t}"].shape == (8, 5)
        assert got[f"distance/{t}"].dtype == torch.float32
    for n, e in enumerate(m["inputs"]):
        x = loaded.preprocess(decode(e["source"]))
        for t in ("translate", "scale", "rotate"):
            dist, prob, top = _expected(loaded.model, x, t, got[f"amounts/{t}"].tolist(),
                                        modules)
            torch.testing.assert_close(got[f"distance/{t}"][n], dist, rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(got[f"probability/{t}"][n], prob, rtol=1e-4, atol=1e-5)
            assert int(got["top_class"][n]) == top


def test_alexnet_in_place_relus_exact_and_byte_identical(tmp_path):
    write_image(tmp_path / "in" / "a.png", (230, 240))
    args = ["invariance", "alexnet", str(tmp_path / "in"), "-w", "none", "--steps", "2",
            "-t", "rotate", "--layers", "features.0,features.3,classifier.6", "--workers", "0"]
    for name in ("o1", "o2"):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    one, two = (tmp_path / n / "invariance" for n in ("o1", "o2"))
    for f in ("invariance.safetensors", "manifest.json", "png/rotate.png"):
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    got, _ = _read(one / "invariance.safetensors")
    loaded = load_model("alexnet", "none")
    x = loaded.preprocess(decode(tmp_path / "in" / "a.png"))
    # features.0 is followed by an in-place ReLU: a capture that missed it would see its output
    dist, prob, _ = _expected(loaded.model, x, "rotate", [0.0, 180.0],
                              ["features.0", "features.3", "classifier.6"])
    torch.testing.assert_close(got["distance/rotate"][0], dist, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got["probability/rotate"][0], prob, rtol=1e-4, atol=1e-6)


def test_shards_give_the_bytes_of_one_process(tmp_path):
    opts = {"steps": 3, "transforms": ["translate", "scale"], "batch_size": 3}
    _run(tmp_path / "one", **opts)
    for i in range(3):
        _run(tmp_path / "three", shard=f"{i}/3", **opts)
    one, three = tmp_path / "one" / "invariance", tmp_path / "three" / "invariance"
    assert sorted(p.relative_to(one) for p in one.rglob("*")) == \
        sorted(p.relative_to(three) for p in three.rglob("*"))
    for f in ("invariance.safetensors", "manifest.json", "png/translate.png", "png/scale.png"):
        assert (one / f).read_bytes() == (three / f).read_bytes(), f
    assert not (three / "partial").exists()


def test_resume_goes_on_from_the_checkpoint(tmp_path):
    opts = {"steps": 3, "transforms": ["scale"], "batch_size": 2, "png": False}
    _run(tmp_path / "whole", **opts)

    class Killed(Exception):
        pass

    calls: list[int] = []

    def die_after_two(n: int) -> None:
        calls.append(n)
        if len(calls) == 2:
            raise Killed

    def plan():
        return plan_job(InvarianceOptions(out=str(tmp_path / "cut"), workers=0,
                                          checkpoint_seconds=0, **opts), Invariance())

    with pytest.raises(Killed):
        run_job(plan(), die_after_two)
    assert not (tmp_path / "cut" / "invariance" / "invariance.safetensors").exists()
    resumed: list[int] = []
    again = plan()
    run_job(again, resumed.append)
    assert len(again.finished) >= 4 and sum(resumed) == 8 - len(again.finished)
    whole, cut = (tmp_path / n / "invariance" for n in ("whole", "cut"))
    assert (whole / "invariance.safetensors").read_bytes() == \
        (cut / "invariance.safetensors").read_bytes()
    done = runner.invoke(app, ["invariance", "lenet", "-t", "scale", "--steps", "3",
                               "--no-png", "--out", str(tmp_path / "cut")])
    assert done.exit_code == 0 and "over 8 image(s)" in done.output


def test_other_options_refused_unless_overwrite(tmp_path):
    out = tmp_path / "o"
    args = ["invariance", "lenet", "-t", "scale", "--steps", "3", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    (out / "invariance" / "notes.txt").write_text("mine")
    other = runner.invoke(app, [*args[:-4], "--steps", "4", "--out", str(out)])
    assert other.exit_code == 1 and "--overwrite" in " ".join(other.output.split())
    replaced = runner.invoke(app, [*args[:-4], "--steps", "4", "--out", str(out), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    got, _ = _read(out / "invariance" / "invariance.safetensors")
    assert got["amounts/scale"].shape == (4,)
    assert (out / "invariance" / "notes.txt").read_text() == "mine"  # not convmaps': kept


def test_a_symlink_inside_out_invariance_is_refused(tmp_path):
    out = tmp_path / "o"
    (out / "invariance").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (out / "invariance" / "png").symlink_to(tmp_path / "elsewhere")
    result = runner.invoke(app, ["invariance", "lenet", "--out", str(out)])
    assert result.exit_code == 1 and "symlink" in result.output
    assert not list((tmp_path / "elsewhere").iterdir())


@pytest.mark.parametrize("extra,code,words", [
    (["-t", "shear"], 1, "--transform shear: choose translate, scale, rotate"),
    (["--steps", "1"], 2, "Invalid value for '--steps': Input should be greater than or equal "
     "to 2"),
    (["--layers", "nope"], 1, "nope"),
    (["--layers", "relu1"], 0, ""),  # any module may be compared
])
def test_bad_options_are_one_line(tmp_path, capsys, extra, code, words):
    from convmaps.cli import main

    assert main(["invariance", "lenet", "--out", str(tmp_path / "o"), "--steps", "2",
                 "--no-png", *extra]) == code
    if code:
        _, err = capsys.readouterr()
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
        assert not (tmp_path / "o").exists()


def test_steps_below_two_from_python_is_refused(tmp_path):
    with pytest.raises(ConvmapsError, match="steps must be at least 2, not 1"):
        _run(tmp_path / "o", steps=1)


def test_amounts_are_the_papers_ranges():
    assert amounts("translate", 5, (224, 224)).tolist() == [-60, -30, 0, 30, 60]
    assert [round(a, 2) for a in amounts("scale", 9, (224, 224)).tolist()] == \
        [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8]
    assert amounts("rotate", 4, (28, 28)).tolist() == [0, 90, 180, 270]  # 360 left out


def test_progress_plots_report_and_show(tmp_path):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "convmaps", "invariance", "lenet", "--out",
                           str(out), "--steps", "4", "--workers", "0"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "invariance: 8/8 images" in proc.stderr and "\x1b[" not in proc.stderr
    from PIL import Image

    for t in ("translate", "scale", "rotate"):
        with Image.open(out / "invariance" / "png" / f"{t}.png") as img:
            assert img.width >= 2 * 360 and img.height >= 220  # two panels under a title
    for extra in ([], ["--standalone"]):
        assert runner.invoke(app, ["report", str(out), *extra]).exit_code == 0
        page = (out / "report" / "invariance.html").read_text()
        pictures = re.findall(r'<img src="([^"]+)"', page)
        assert len(pictures) == 3
        assert all((out / "report" / p).is_file() for p in pictures)
        assert 'href="invariance.html"' in (out / "report" / "index.html").read_text()
    shown = runner.invoke(app, ["show", str(out)])
    assert shown.exit_code == 0 and "invariance of lenet" in shown.output
    assert "distance/rotate" in shown.output
