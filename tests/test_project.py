"""The `project` job and command: files, exactness against autograd and the dump, boxes,
accumulation and ownership."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from convmaps.cli import app
from convmaps.core.models import load_model
from convmaps.errors import ConvmapsError
from convmaps.io.images import decode
from convmaps.jobs.dump import plan_dump, run_dump
from convmaps.jobs.project import run_project
from convmaps.options import DumpOptions, Mode, ProjectOptions

from .conftest import write_image

runner = CliRunner()


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def test_lenet_projections_match_autograd_and_the_dump(tmp_path):
    out = tmp_path / "o"
    run_dump(plan_dump(DumpOptions(model="lenet", out=str(out), png=False, workers=0)))
    m = run_project(ProjectOptions(model="lenet", units=["C3:5", "OUTPUT:7", "0:2@3,4"],
                                   mode=Mode.gradient, out=str(out)))
    loaded = load_model("lenet")
    for e in m["inputs"]:
        assert e["status"] == "ok"
        folder = out / e["key"]
        maps, meta = _read(folder / "projections.safetensors")
        assert sorted(maps) == ["gradient/C1/2@3,4", "gradient/C3/5", "gradient/OUTPUT/7"]
        assert sorted(e["files"]) == sorted(
            ["projections.safetensors"] + [f"png/projections/{k}.png" for k in maps])
        acts = load_file(folder / "activations.safetensors")
        # the unit is the channel's first spatial maximum in the dump's own activations
        c3 = acts["C3"][5]
        y, x = divmod(int(c3.flatten().argmax()), c3.shape[1])
        assert meta["gradient/C3/5.position"] == f"{y},{x}"
        assert float(meta["gradient/C3/5.value"]) == pytest.approx(float(c3[y, x]), rel=1e-6)
        # gradient mode is exactly autograd's gradient of the unit, recomputed here
        image = loaded.preprocess(decode(e["source"]))[None].requires_grad_(True)
        model = load_model("lenet").model
        unit = model[:4](image)[0, 5, y, x]  # C1 relu1 S2 C3
        (grad,) = torch.autograd.grad(unit, image)
        torch.testing.assert_close(maps["gradient/C3/5"], grad[0], rtol=1e-5, atol=1e-7)
        (grad,) = torch.autograd.grad(model(image)[0, 7], image)
        torch.testing.assert_close(maps["gradient/OUTPUT/7"], grad[0], rtol=1e-5, atol=1e-7)
        assert meta["gradient/OUTPUT/7.box"] == "0,0,28,28"
        png = Image.open(folder / "png" / "projections" / "gradient" / "C3" / "5.png")
        assert "convmaps-range" in png.info


@pytest.mark.parametrize("mode", list(Mode))
def test_support_lies_inside_the_receptive_field_box(tmp_path, mode):
    from convmaps.core.fields import fields

    img = write_image(tmp_path / "a.png", size=(96, 80))
    m = run_project(ProjectOptions(model="alexnet", weights="none", inputs=[str(img)],
                                   units=["features.3:1", "features.8:7", "features.12:3@2,2"],
                                   mode=mode, out=str(tmp_path / "o"), png=False))
    maps, meta = _read(tmp_path / "o" / m["inputs"][0]["key"] / "projections.safetensors")
    rf = fields(load_model("alexnet", "none").model, (3, 224, 224))
    reached = 0
    for key, t in maps.items():
        module = key.split("/")[1]
        y, x = (int(v) for v in meta[f"{key}.position"].split(","))
        top, left, bottom, right = rf[module].box(y, x)
        assert meta[f"{key}.box"] == f"{top},{left},{bottom},{right}"
        ys, xs = t.abs().sum(0).nonzero(as_tuple=True)
        if not len(ys):  # guided/gradient masks can stop a deep unit's signal altogether
            continue
        reached += 1
        assert top <= int(ys.min()) and int(ys.max()) < bottom, key
        assert left <= int(xs.min()) and int(xs.max()) < right, key
    assert reached >= 2


def test_alexnet_command_from_the_issue(tmp_path):
    img = write_image(tmp_path / "photo.jpg", size=(120, 90))
    result = runner.invoke(app, ["project", "alexnet", str(img), "--weights", "none",
                                 "--unit", "features.10:5", "--unit", "classifier.6:281",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "o" / "photo.jpg"
    maps, meta = _read(folder / "projections.safetensors")
    assert set(maps) == {"deconvnet/features.10/5", "deconvnet/classifier.6/281"}
    assert maps["deconvnet/features.10/5"].shape == (3, 224, 224)
    assert maps["deconvnet/features.10/5"].dtype == torch.float32
    assert (maps["deconvnet/features.10/5"] < 0).any()  # a deconvnet projection is signed
    assert (folder / "png/projections/deconvnet/features.10/5.png").is_file()
    assert (folder / "png/projections/deconvnet/classifier.6/281.png").is_file()
    assert meta["deconvnet/classifier.6/281.position"] == ""


def test_projections_accumulate_and_belong_to_one_network(tmp_path):
    out = str(tmp_path / "o")
    run_project(ProjectOptions(model="lenet", units=["C3:5"], out=out, png=False))
    run_project(ProjectOptions(model="lenet", units=["C3:5", "C1:0"], mode=Mode.guided,
                               out=out, png=False))
    key = json.loads((tmp_path / "o" / "projections.json").read_text())["inputs"][0]["key"]
    maps, _ = _read(tmp_path / "o" / key / "projections.safetensors")
    assert sorted(maps) == ["deconvnet/C3/5", "guided/C1/0", "guided/C3/5"]
    other = ProjectOptions(model="lenet", weights="none", units=["C3:5"], out=out, png=False)
    with pytest.raises(ConvmapsError, match="--overwrite"):
        run_project(other)
    other.resume = False
    run_project(other)
    maps, meta = _read(tmp_path / "o" / key / "projections.safetensors")
    assert sorted(maps) == ["deconvnet/C3/5"] and meta["weights"] == "none"


def test_a_dump_of_another_network_is_never_mixed_with_projections(tmp_path):
    out = tmp_path / "o"
    run_dump(plan_dump(DumpOptions(model="lenet", out=str(out), png=False, workers=0)))
    with pytest.raises(ConvmapsError, match="holds a dump of lenet"):
        run_project(ProjectOptions(model="lenet", weights="none", units=["C3:5"], out=str(out)))
    # projections of the same network survive a dump redone with --overwrite
    run_project(ProjectOptions(model="lenet", units=["C3:5"], out=str(out), png=False))
    run_dump(plan_dump(DumpOptions(model="lenet", out=str(out), png=False, workers=0,
                                   layers="C1", resume=False)))
    assert len(list(out.glob("*/projections.safetensors"))) == 8


@pytest.mark.parametrize("args,words", [
    (["--unit", "C3:16"], "0-15"),
    (["--unit", "C3:1@10,0"], "0-9"),
    (["--unit", "nope:1"], "nope"),
    (["--unit", "C3"], "MODULE:C"),
    ([], "--unit"),
])
def test_bad_units_are_one_line(tmp_path, args, words):
    result = runner.invoke(app, ["project", "lenet", *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert words in result.output and result.output.count("\n") == 1, result.output


def test_alexnet_projections_are_byte_identical_and_leave_the_model_alone(tmp_path):
    from convmaps.core.deconv import output_shapes, parse_unit, project

    img = write_image(tmp_path / "a.png", size=(80, 64))
    for out in ("one", "two"):
        run_project(ProjectOptions(model="alexnet", weights="none", inputs=[str(img)],
                                   units=["features.8:3", "features.12:1"],
                                   out=str(tmp_path / out)))
    one = {p.relative_to(tmp_path / "one"): p.read_bytes() for p in (tmp_path / "one").rglob("*")
           if p.is_file()}
    two = {p.relative_to(tmp_path / "two"): p.read_bytes() for p in (tmp_path / "two").rglob("*")
           if p.is_file()}
    assert one == two and len(one) == 4  # projections, two figures, projections.json
    model = load_model("alexnet", "none").model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [(m.training, getattr(m, "inplace", None)) for m in model.modules()]
    shapes = output_shapes(model, (3, 224, 224))
    project(model, torch.zeros(3, 224, 224), [parse_unit("features.8:3", model, shapes)])
    assert [(m.training, getattr(m, "inplace", None)) for m in model.modules()] == flags
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_image_that_became_unreadable_loses_its_projections(tmp_path):
    img = write_image(tmp_path / "in" / "a.png")
    out = tmp_path / "o"
    run_project(ProjectOptions(model="lenet", inputs=[str(tmp_path / "in")], units=["C3:1"],
                               out=str(out)))
    assert (out / "a.png" / "projections.safetensors").is_file()
    img.write_bytes(b"not any more")
    m = run_project(ProjectOptions(model="lenet", inputs=[str(tmp_path / "in")], units=["C3:1"],
                                   out=str(out)))
    assert m["inputs"][0]["status"].startswith("skipped: ") and m["inputs"][0]["files"] == []
    assert not (out / "a.png").exists()


@pytest.mark.parametrize("dtype", [torch.uint16, torch.float8_e4m3fn, "shape"])
def test_a_projections_file_of_odd_tensors_is_not_extended(tmp_path, dtype):
    from safetensors.torch import save_file

    out = tmp_path / "o"
    o = ProjectOptions(model="lenet", units=["C1:0"], out=str(out), png=False)
    run_project(o)
    path = next(out.glob("*/projections.safetensors"))
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    odd = {k: (v[0] if dtype == "shape" else v.to(dtype)) for k, v in tensors.items()}
    save_file(odd, path, meta)
    o.units = ["C3:1"]  # another unit: the image's file is extended, unless it is not ours
    run_project(o)
    maps, _ = _read(path)
    assert list(maps) == ["deconvnet/C3/1"] and maps["deconvnet/C3/1"].dtype == torch.float32
