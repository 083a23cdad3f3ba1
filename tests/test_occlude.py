"""The `occlude` job and command: files, every map against full forward passes recomputed here
and against Captum, ownership, resume, shards and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from convmaps.cli import app
from convmaps.core.models import load_model
from convmaps.io.images import decode
from convmaps.jobs.occlude import logit_drop, run_occlude
from convmaps.options import OccludeOptions

from .conftest import logged, refused_in_one_line, sharded_like_one, write_image

runner = CliRunner()


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def _occluded_outputs(model, x, patch, stride, fill, module):
    """Every occluded copy of x through the whole model, one at a time: logits and `module`'s
    output summed over space (kept by a hook before any in-place op)."""
    kept = []
    hook = model.get_submodule(module).register_forward_hook(
        lambda _, __, out: kept.append(out.detach().sum((2, 3))[0].clone()))
    h, w = x.shape[1:]
    ys = [i * stride for i in range(-(-(h - patch) // stride) + 1)]  # Captum's grid
    xs = [i * stride for i in range(-(-(w - patch) // stride) + 1)]
    logits = []
    try:
        for y in ys:
            row = []
            for x0 in xs:
                occ = x.clone()
                occ[:, y:y + patch, x0:x0 + patch] = fill
                with torch.no_grad():
                    row.append(model(occ[None])[0])
            logits.append(torch.stack(row))
    finally:
        hook.remove()
    logits_t = torch.stack(logits)
    with torch.no_grad():
        clear = model(x[None])[0]
    sums = torch.stack(kept).reshape(*logits_t.shape[:2], -1)
    return logits_t, clear, sums


def test_lenet_maps_equal_full_passes_recomputed_here(tmp_path):
    out = tmp_path / "o"
    m = run_occlude(OccludeOptions(model="lenet", out=str(out), patch=8, stride=5, fill=-0.5,
                                   workers=0, batch_size=7))
    loaded = load_model("lenet")
    assert len(m["inputs"]) == 8
    for e in m["inputs"]:
        assert e["status"] == "ok"
        assert sorted(e["files"]) == ["occlusion.safetensors", "png/occlusion.png"]
        maps, meta = _read(out / e["key"] / "occlusion.safetensors")
        x = loaded.preprocess(decode(e["source"]))
        logits, clear, sums = _occluded_outputs(loaded.model, x, 8, 5, -0.5, "C5")
        target = int(clear.argmax())
        assert meta["target"] == str(target) and meta["patch"] == "8" and meta["fill"] == "-0.5"
        assert maps["probability"].shape == (5, 5) == maps["top_class"].shape  # 28 px: 0..20
        torch.testing.assert_close(maps["probability"], logits.softmax(-1)[..., target],
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(maps["top_class"], logits.argmax(-1))
        assert maps["top_class"].dtype == torch.int64
        # logit drop: per pixel, the mean over the patches covering it, by a plain loop here
        drops = clear[target] - logits[..., target]
        want = torch.zeros(28, 28)
        for py in range(28):
            for px in range(28):
                cover = [drops[i, j] for i, y in enumerate(range(0, 21, 5))
                         for j, x0 in enumerate(range(0, 21, 5))
                         if y <= py < y + 8 and x0 <= px < x0 + 8]
                want[py, px] = sum(cover) / len(cover) if cover else 0.0
        torch.testing.assert_close(maps["logit_drop"], want, rtol=1e-4, atol=1e-5)
        # the default unit: C5's channel with the largest maximum on the unoccluded image
        (key,) = [k for k in maps if k.startswith("unit/")]
        channel = int(key.rsplit("/", 1)[1])
        with torch.no_grad():
            c5 = loaded.model[:7](x[None])[0]
        assert channel == int(c5.amax((1, 2)).argmax()) and key.startswith("unit/C5/")
        torch.testing.assert_close(maps[key], sums[..., channel], rtol=1e-5, atol=1e-5)


def test_logit_drop_equals_captum_occlusion():
    from captum.attr import Occlusion

    model = load_model("lenet").model
    torch.manual_seed(0)
    x = torch.randn(1, 1, 28, 28)
    for patch, stride in ((8, 5), (5, 3), (4, 4), (9, 2)):
        want = Occlusion(model).attribute(x, sliding_window_shapes=(1, patch, patch),
                                          strides=(1, stride, stride), baselines=0.0,
                                          target=3, perturbations_per_eval=16)
        from convmaps.core.occlusion import occlude

        got = occlude(model, x[0], patch, stride)
        drops = got.clear[3] - got.logits[..., 3]
        torch.testing.assert_close(logit_drop(drops, (28, 28), patch, stride), want[0, 0],
                                   rtol=1e-4, atol=1e-5)


def test_alexnet_runs_are_byte_identical_and_exact(tmp_path):
    """AlexNet's in-place ReLUs: two runs give the same bytes, and the maps equal full passes."""
    write_image(tmp_path / "in" / "a.png", (230, 240))
    args = ["occlude", "alexnet", str(tmp_path / "in"), "-w", "none", "--patch", "64",
            "--stride", "64", "--unit", "features.3:7", "--no-png"]
    for name in ("o1", "o2"):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    one, two = (tmp_path / n / "a.png" / "occlusion.safetensors" for n in ("o1", "o2"))
    assert one.read_bytes() == two.read_bytes()
    maps, meta = _read(one)
    loaded = load_model("alexnet", "none")
    x = loaded.preprocess(decode(tmp_path / "in" / "a.png"))
    logits, clear, sums = _occluded_outputs(loaded.model, x, 64, 64, 0.0, "features.3")
    assert maps["top_class"].shape == (4, 4)  # 224 px: 0, 64, 128, 192 (cut at the edge)
    target = int(clear.argmax())
    torch.testing.assert_close(maps["probability"], logits.softmax(-1)[..., target],
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(maps["unit/features.3/7"], sums[..., 7], rtol=1e-4,
                               atol=1e-4 * float(sums[..., 7].abs().max()))


def test_resume_ownership_and_overwrite(tmp_path):
    out = tmp_path / "o"
    args = ["occlude", "lenet", "--out", str(out), "--patch", "10", "--stride", "9"]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "0 image(s) written, 8 already done" in again.output
    other = runner.invoke(app, [*args[:-1], "6"])
    assert other.exit_code == 1 and "--overwrite" in " ".join(other.output.split())
    replaced = runner.invoke(app, [*args[:-1], "6", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    maps, meta = _read(out / "0_t-shirt-top.png" / "occlusion.safetensors")
    assert meta["stride"] == "6" and maps["probability"].shape == (4, 4)


def test_a_dump_beside_occlusion_maps_leaves_them_alone(tmp_path):
    out = tmp_path / "o"
    assert runner.invoke(app, ["occlude", "lenet", "--out", str(out), "--patch", "10",
                               "--stride", "9"]).exit_code == 0
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(app, ["dump", "lenet", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
    folder = out / "0_t-shirt-top.png"
    assert (folder / "occlusion.safetensors").is_file() and (folder / "png/occlusion.png").is_file()
    assert (folder / "activations.safetensors").is_file()
    m = json.loads((out / "manifest.json").read_text())
    assert all("occlusion.safetensors" not in e["files"] for e in m["inputs"])


def test_shards_give_the_bytes_of_one_process(tmp_path):
    args = ["occlude", "lenet", "--patch", "10", "--stride", "9", "--workers", "0",
            "--batch-size", "3"]  # batches of images: 3 + 3 + 2, so each shard has some
    sharded_like_one(args, tmp_path, "occlusion.json")


@pytest.mark.parametrize("extra,words", [
    (["--target", "10"], "--target '10': give top or a class index below 10"),
    (["--target", "cat"], "give top or a class index"),
    (["--unit", "C3:1@2,2"], "summed over space"),
    (["--unit", "F6:1"], "summed over space"),
    (["--unit", "C3:99"], "C3"),
    (["--patch", "29"], "does not fit"),
])
def test_bad_options_are_one_line(tmp_path, extra, words):
    refused_in_one_line(["occlude", "lenet", "--out", str(tmp_path / "o"), *extra], words)
    assert not (tmp_path / "o" / "occlusion.json").exists()


def test_progress_in_a_log_and_a_figure_that_says_what_it_shows(tmp_path):
    log = logged(["occlude", "lenet", "--out", str(tmp_path / "o"), "--patch", "10", "--stride",
                  "9"])
    assert "occlude: 8/8 images" in log
    from PIL import Image

    with Image.open(tmp_path / "o" / "0_t-shirt-top.png" / "png" / "occlusion.png") as img:
        assert img.width > 3 * 224 and img.height > 224  # four panels over a title line


def test_the_manifest_says_how_the_maps_were_computed(tmp_path):
    write_image(tmp_path / "in" / "a.png", (60, 60))
    for model, method, patch in (("lenet", "incremental (each op", "14"),
                                 ("resnet18", "incremental (each op", "112"),
                                 ("shufflenet_v2_x0_5", "incremental (each op of the traced "
                                  "graph recomputes the box a patch can change; no rule for "
                                  "chunk, contiguous, floordiv, getitem, transpose, view: run "
                                  "in full)", "112")):
        out = tmp_path / model
        args = ["occlude", model, str(tmp_path / "in"), "--out", str(out), "--patch", patch,
                "--stride", patch, "--no-png"]
        result = runner.invoke(app, args + (["-w", "none"] if model != "lenet" else []))
        assert result.exit_code == 0, result.output
        m = json.loads((out / "occlusion.json").read_text())
        assert m["method"].startswith(method)
        assert method.split(" (")[0] in result.output
