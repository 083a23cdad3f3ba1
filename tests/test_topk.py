"""Top-k: the streaming merge against brute force, the job against `dump`'s activations, rf's
boxes and autograd's projections; shards, resume, broken and changed images, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from convmaps.cli import app
from convmaps.core.models import build, load_model
from convmaps.core.ranking import combine, crop, empty, maxima, merge, positions, update
from convmaps.errors import ConvmapsError
from convmaps.io.images import decode
from convmaps.jobs.dump import plan_dump, run_dump
from convmaps.jobs.topk import plan_topk, run_topk
from convmaps.options import DumpOptions, TopkOptions

from .conftest import FASHION, write_image


def _brute(values: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """Per channel, the k best of (N, C) values: value descending, then index ascending, by
    Python's own sort."""
    vals, idx = [], []
    for c in range(values.shape[1]):
        order = sorted(range(values.shape[0]), key=lambda i: (-float(values[i, c]), i))[:k]
        vals.append([float(values[i, c]) for i in order])
        idx.append(order)
    return vals, idx


def _first_max(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H, W) -> each channel's max and the first flat index holding it, by comparison."""
    flat = a.flatten(1)
    v = flat.max(1).values
    first = [next(j for j in range(flat.shape[1]) if flat[c, j] == v[c]) for c in range(len(v))]
    return v, torch.tensor(first)


# --- the streaming merge ----------------------------------------------------------------------


def test_merge_is_the_total_order_whatever_the_batches():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (50, 6), generator=g).float()  # ties everywhere
    values[:, 5] = 0  # a dead channel: all zeros
    for split in ([50], [1] * 50, [7, 13, 30], [49, 1]):
        running, start = empty(6), 0
        for n in split:
            rows = slice(start, start + n)
            running = merge(running, values[rows], torch.zeros(n, 6, dtype=torch.int64),
                            torch.arange(start, start + n), k=5)
            assert running.values.shape == (6, min(5, start + n))  # O(C x k) whatever N
            start += n
        want_v, want_i = _brute(values, 5)
        assert running.values.tolist() == want_v and running.images.tolist() == want_i
    assert running.images[5].tolist() == [0, 1, 2, 3, 4]


def test_combine_of_shards_equals_one_pass():
    values = torch.randint(0, 3, (30, 4)).float()
    flat = torch.randint(0, 9, (30, 4))
    one = merge(empty(4), values, flat, torch.arange(30), k=7)
    parts = [merge(empty(4), values[i::3], flat[i::3], torch.arange(30)[i::3], k=7)
             for i in range(3)]
    both = combine(parts, 7)
    for a, b in zip((one.values, one.images, one.flat), (both.values, both.images, both.flat),
                    strict=True):
        assert torch.equal(a, b)


def test_maxima_first_position_and_1d():
    out = torch.zeros(2, 3, 4, 5)
    out[0, 0, 1, 2] = out[0, 0, 3, 0] = 5.0  # tie: (1, 2) comes first
    out[1, 1] = -1.0  # constant map: position 0
    v, flat = maxima(out)
    for n in range(2):
        want_v, want_f = _first_max(out[n])
        assert torch.equal(v[n], want_v) and torch.equal(flat[n], want_f)
    assert positions(flat, 5)[0, 0].tolist() == [1, 2]
    lin = torch.tensor([[1.0, -2.0]])
    v, flat = maxima(lin)
    assert torch.equal(v, lin) and flat.tolist() == [[0, 0]]


def test_crop_fills_outside():
    x = torch.arange(16.0).reshape(1, 4, 4)
    got = crop(x, (-1, 2, 2, 5), (3, 3), -9.0)
    want = F.pad(x, (1, 1, 1, 1), value=-9.0)[:, 0:3, 3:6]
    assert torch.equal(got, want)


@pytest.fixture
def fashion_test() -> torch.Tensor:
    if not FASHION.is_dir():
        pytest.skip(f"Debian package dataset-fashion-mnist not installed: no {FASHION}")
    from convmaps.jobs.train import load_split

    return load_split(FASHION, "test")[0]


def test_streaming_over_thousands_of_images_stays_c_by_k(fashion_test):
    from convmaps.jobs.train import normalise

    model = load_model("lenet").model
    x = normalise(fashion_test[:3000])
    k, running, seen = 9, empty(16), []
    with torch.no_grad():
        for start in range(0, len(x), 250):
            out = model[:5](x[start:start + 250])  # C1 ... relu3: post-ReLU, ties at zero
            running = update(running, out, torch.arange(start, start + len(out)), k)
            assert running.values.shape == running.images.shape == (16, k)
            seen.append(maxima(out)[0])
    want_v, want_i = _brute(torch.cat(seen), k)
    assert running.values.tolist() == want_v and running.images.tolist() == want_i


# --- the job ----------------------------------------------------------------------------------


def _topk(tmp_path: Path, inputs: list[Path], out: str = "out", **kw) -> dict:
    kw.setdefault("workers", 0)
    return run_topk(plan_topk(TopkOptions(inputs=[str(p) for p in inputs],
                                          out=str(tmp_path / out), **kw)))


def _read(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture
def fashion_pngs(tmp_path, fashion_test) -> Path:
    """A few hundred test images as PNGs, with exact duplicates and blank images (ties)."""
    from PIL import Image

    root = tmp_path / "fashion"
    root.mkdir()
    for i in range(240):
        Image.fromarray(fashion_test[i].numpy(), "L").save(root / f"{i:03d}.png")
    for i in range(0, 40, 4):
        shutil.copy(root / f"{i:03d}.png", root / f"{i:03d}-copy.png")
    for name in ("blank-a.png", "blank-b.png"):
        Image.new("L", (28, 28)).save(root / name)
    return root


def test_lenet_equals_brute_force_from_dump(tmp_path, fashion_pngs):
    layers = "C1,relu3,S4,F6"
    o = DumpOptions(model="lenet", inputs=[str(fashion_pngs)], out=str(tmp_path / "out"),
                    layers=layers, switches=False, png=False, workers=0, batch_size=16)
    dumped = run_dump(plan_dump(o))
    manifest = _topk(tmp_path, [fashion_pngs], layers=layers, k=6, project="none", png=False,
                     batch_size=16)
    keys = [e["key"] for e in manifest["inputs"]]
    assert keys == [e["key"] for e in dumped["inputs"]] == sorted(keys)
    acts = [_read(tmp_path / "out" / key / "activations.safetensors") for key in keys]
    for name in layers.split(","):
        got = _read(tmp_path / "out" / "topk" / f"{name}.safetensors")
        per_image = [_first_max(a[name]) if a[name].dim() == 3 else (a[name], None)
                     for a in acts]
        values = torch.stack([v for v, _ in per_image])
        want_v, want_i = _brute(values, 6)
        assert got["values"].tolist() == want_v, name
        assert got["images"].tolist() == want_i, name
        if per_image[0][1] is None:
            assert "positions" not in got
            assert (got["boxes"] == torch.tensor([0, 0, 28, 28])).all()
            continue
        w = acts[0][name].shape[-1]
        for c in range(values.shape[1]):
            for r, i in enumerate(want_i[c]):
                flat = int(per_image[i][1][c])
                assert got["positions"][c, r].tolist() == [flat // w, flat % w]
    ties = _read(tmp_path / "out" / "topk" / "relu3.safetensors")
    assert (ties["values"][:, :-1] == ties["values"][:, 1:]).any()  # ties were ranked


def test_alexnet_equals_brute_force_over_the_dump_and_plumbs_fields_boxes(tmp_path):
    """Values and images: an independent brute force over dump's activations. Boxes: a
    plumbing check only (topk passes `fields()`'s boxes through); the boxes themselves are
    checked independently, by perturbation, in test_fields."""
    from convmaps.core.fields import fields

    photos = tmp_path / "photos"
    for i in range(3):
        write_image(photos / f"p{i}.png", size=(48 + 8 * i, 40), seed=i)
    common = {"model": "alexnet", "weights": "none", "inputs": [str(photos)], "workers": 0,
              "batch_size": 2, "out": str(tmp_path / "out")}
    dumped = run_dump(plan_dump(DumpOptions(**common, layers="conv", switches=False, png=False)))
    run_topk(plan_topk(TopkOptions(**common, k=2, project="none", png=False)))
    model = build("alexnet")
    geometry = fields(model, (3, 224, 224))
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    acts = [_read(tmp_path / "out" / e["key"] / "activations.safetensors")
            for e in dumped["inputs"]]
    for name in convs:
        got = _read(tmp_path / "out" / "topk" / f"{name}.safetensors")
        values = torch.stack([_first_max(a[name])[0] for a in acts])
        want_v, want_i = _brute(values, 2)
        assert got["values"].tolist() == want_v and got["images"].tolist() == want_i
        for c in range(0, values.shape[1], 17):
            for r in range(2):
                y, x = got["positions"][c, r].tolist()
                assert tuple(got["boxes"][c, r].tolist()) == geometry[name].box(y, x)


def test_projections_are_autograd_gradients_cropped_to_boxes(tmp_path):

    manifest = _topk(tmp_path, [], layers="C3,F6", k=3, project="gradient", png=False)
    sources = [e["source"] for e in manifest["inputs"]]
    loaded = load_model("lenet")
    model = loaded.model
    for name in ("C3", "F6"):
        got = _read(tmp_path / "out" / "topk" / f"{name}.safetensors")
        bh, bw = got["projections"].shape[-2:]
        for c in (0, 5, 11):
            for r in range(3):
                x = loaded.preprocess(decode(sources[int(got["images"][c, r])]))[None]
                x.requires_grad_(True)
                out = dict(model.named_children())
                h = x
                for child, module in out.items():
                    h = module(h)
                    if child == name:
                        break
                if h.dim() == 4:
                    y, xx = got["positions"][c, r].tolist()
                    unit = h[0, c, y, xx]
                else:
                    unit = h[0, c]
                torch.testing.assert_close(float(unit.detach()), float(got["values"][c, r]),
                                           rtol=1e-5, atol=1e-5)
                (grad,) = torch.autograd.grad(unit, x)
                top, left, bottom, right = got["boxes"][c, r].tolist()
                pad = max(0, -top, -left, bottom - 28, right - 28)
                padded = F.pad(grad[0], (pad, pad, pad, pad))
                want = padded[:, top + pad:top + pad + bh, left + pad:left + pad + bw]
                torch.testing.assert_close(got["projections"][c, r], want, rtol=1e-4,
                                           atol=1e-6)


def test_plumbing_deconvnet_crops_are_project_of_that_unit(tmp_path):
    """A plumbing check (topk crops what `core.deconv.project` gives); beside it, the test
    above recomputes gradient-mode crops independently with torch.autograd."""
    from convmaps.core.deconv import Unit, project

    manifest = _topk(tmp_path, [], layers="C1,S4", k=2, project="deconvnet", png=False)
    sources = [e["source"] for e in manifest["inputs"]]
    loaded = load_model("lenet")
    for name in ("C1", "S4"):
        got = _read(tmp_path / "out" / "topk" / f"{name}.safetensors")
        bh, bw = got["projections"].shape[-2:]
        for c in range(got["values"].shape[0]):
            for r in range(2):
                x = loaded.preprocess(decode(sources[int(got["images"][c, r])]))
                y, xx = got["positions"][c, r].tolist()
                (p,) = project(loaded.model, x, [Unit(name, c, (y, xx))])
                top, left, bottom, right = got["boxes"][c, r].tolist()
                pad = max(0, -top, -left, bottom - 28, right - 28)
                padded = F.pad(p.map, (pad, pad, pad, pad))
                want = padded[:, top + pad:top + pad + bh, left + pad:left + pad + bw]
                torch.testing.assert_close(got["projections"][c, r], want, rtol=1e-4,
                                           atol=1e-6)


def _whole_map_crops(manifest: dict, folder: Path, name: str, loaded, mode: str,
                     channels: range) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored projections of `channels`, and the same entries computed independently: one
    image row per entry, over whole maps (the chain without windows), cropped to the boxes."""
    from convmaps.core.deconv import Method, Unit, project_each

    got = _read(folder / f"{name}.safetensors")
    sources = [e["source"] for e in manifest["inputs"]]
    k = got["values"].shape[1]
    pairs = [(c, r) for c in channels for r in range(k)]
    rows = torch.stack([loaded.preprocess(decode(sources[int(got["images"][c, r])]))
                        for c, r in pairs])
    spatial = "positions" in got
    units = [Unit(name, c, tuple(got["positions"][c, r].tolist()) if spatial else None)
             for c, r in pairs]
    whole = project_each(loaded.model, rows, units, mode, method=Method.chain, windowed=False)
    size = got["projections"].shape[-2:]
    want = torch.stack([crop(p.map, got["boxes"][c, r].tolist(), size, 0.0)
                        for (c, r), p in zip(pairs, whole, strict=True)])
    return got["projections"][list(channels)].flatten(0, 1), want


@pytest.mark.parametrize("mode", ["deconvnet", "guided", "gradient"])
def test_projections_equal_the_whole_map_chain_one_row_per_entry(tmp_path, mode):
    """Windows and one forward pass per distinct winner change nothing: every LeNet module's
    stored projections (a 1-D one included) are the whole-map chain's, image by image."""
    layers = "C1,S2,C3,S4,C5,F6"
    manifest = _topk(tmp_path, [], layers=layers, k=3, project=mode, png=False, batch_size=3)
    loaded = load_model("lenet")
    for name in layers.split(","):
        got, want = _whole_map_crops(manifest, tmp_path / "out" / "topk", name, loaded, mode,
                                     range(0, 6))
        assert want.abs().amax() > 0
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_alexnet_projections_equal_the_whole_map_chain(tmp_path):
    """AlexNet (weights none), winners that win many channels: the same, to 1e-5."""
    for i in range(3):
        write_image(tmp_path / "in" / f"{i}.png", size=(64, 48), seed=40 + i)
    manifest = run_topk(plan_topk(TopkOptions(
        model="alexnet", weights="none", layers="10", k=2, inputs=[str(tmp_path / "in")],
        out=str(tmp_path / "out"), batch_size=4, workers=0, png=False)))
    loaded = load_model("alexnet", weights="none")
    got, want = _whole_map_crops(manifest, tmp_path / "out" / "topk", "features.10", loaded,
                                 "deconvnet", range(0, 256, 51))
    assert want.abs().amax() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_float16_stores_the_float32_projections_rounded(tmp_path):
    common = {"layers": "C1,C3,F6", "k": 3, "png_cap": 2}
    _topk(tmp_path, [], out="f32", **common)
    result = CliRunner().invoke(app, ["topk", "lenet", "--out", str(tmp_path / "f16"),
                                      "--layers", "C1,C3,F6", "-k", "3", "--png-cap", "2",
                                      "--workers", "0", "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    for name in ("C1", "C3", "F6"):
        path = tmp_path / "f16" / "topk" / f"{name}.safetensors"
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["dtype"] == "float16"
            assert f.get_slice("projections").get_dtype() == "F16"
        half, full = _read(path), _read(tmp_path / "f32" / "topk" / f"{name}.safetensors")
        assert half["projections"].dtype == torch.float16
        assert torch.equal(half["projections"], full["projections"].half())
        assert half["projections"].abs().amax() > 0
        for key in ("values", "images", "boxes"):
            assert torch.equal(half[key], full[key]), key
        # the figures draw the float32 maps: the same pictures
        png = f"png/{name}/0.png"
        assert (tmp_path / "f16" / "topk" / png).read_bytes() == \
            (tmp_path / "f32" / "topk" / png).read_bytes()
        saved = (tmp_path / "f32" / "topk" / f"{name}.safetensors").stat().st_size - \
            path.stat().st_size  # half the projections' bytes, give or take the header's
        assert abs(saved - 2 * half["projections"].numel()) < 100
    bad = CliRunner().invoke(app, ["topk", "lenet", "--out", str(tmp_path / "o"),
                                   "--dtype", "float8"])
    assert bad.exit_code == 1 and "--dtype 'float8'" in bad.output


@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    for i in range(9):
        write_image(root / f"{'ab'[i % 2]}/img{i}.png", size=(20, 24), seed=i)
    return root


def test_shards_are_byte_identical_to_one_process(tmp_path, photos):
    opts = {"layers": "C1,C5,F6", "k": 4, "batch_size": 2, "png_cap": 2}
    _topk(tmp_path, [photos], out="one", **opts)
    one = _files(tmp_path / "one")
    assert "topk/C1.safetensors" in one and "topk/png/C1/1.png" in one
    assert "topk/png/C1.png" in one and not any("partial" in k for k in one)
    for n in (2, 3):
        results = [_topk(tmp_path, [photos], out=f"s{n}", shard=f"{i}/{n}", **opts)
                   for i in range(n)]
        assert not any(r["finished"] and len(r["inputs"]) == 9 for r in results[:-1])
        assert _files(tmp_path / f"s{n}") == one


def test_resume_goes_on_from_the_last_checkpoint(tmp_path, photos):
    opts = {"layers": "C1,C3", "k": 3, "batch_size": 2, "png": False}
    _topk(tmp_path, [photos], out="whole", **opts)

    class Killed(Exception):
        pass

    calls: list[int] = []

    def die_after_two(n: int) -> None:
        calls.append(n)
        if len(calls) == 2:
            raise Killed

    plan = plan_topk(TopkOptions(inputs=[str(photos)], out=str(tmp_path / "cut"), workers=0,
                                 checkpoint_seconds=0, **opts))
    with pytest.raises(Killed):
        run_topk(plan, on_progress=die_after_two)
    assert not (tmp_path / "cut" / "topk" / "C1.safetensors").exists()
    resumed: list[int] = []
    plan = plan_topk(TopkOptions(inputs=[str(photos)], out=str(tmp_path / "cut"), workers=0,
                                 checkpoint_seconds=0, **opts))
    run_topk(plan, on_progress=resumed.append)
    # the batches checkpointed before the kill (at least the two it reported) are not redone
    assert len(plan.finished) >= 4 and len(plan.finished) % 2 == 0
    assert sum(resumed) == 9 - len(plan.finished)
    assert _files(tmp_path / "cut") == _files(tmp_path / "whole")


def test_fewer_images_than_k_and_broken_images(tmp_path, photos):
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "text.png").write_text("hello")
    manifest = _topk(tmp_path, [photos], layers="C1,F6", k=20, png_cap=1)
    status = {e["key"]: e["status"] for e in manifest["inputs"]}
    assert status["empty.jpg"].startswith("skipped: empty")
    assert status["text.png"].startswith("skipped: not an image")
    ok = [i for i, e in enumerate(manifest["inputs"]) if e["status"] == "ok"]
    assert len(ok) == 9
    got = _read(tmp_path / "out" / "topk" / "C1.safetensors")
    assert got["values"].shape == (6, 9) and got["projections"].shape == (6, 9, 1, 5, 5)
    assert sorted(got["images"][0].tolist()) == ok
    with safe_open(str(tmp_path / "out" / "topk" / "C1.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["k"] == "9" and meta["mode"] == "deconvnet" and meta["model"] == "lenet"


def test_other_options_refused_unless_overwrite(tmp_path, photos):
    _topk(tmp_path, [photos], layers="C1", k=2, png=False)
    with pytest.raises(ConvmapsError, match="--overwrite"):
        _topk(tmp_path, [photos], layers="C1", k=3, png=False)
    (tmp_path / "out" / "topk" / "mine.txt").write_text("a user's file")
    _topk(tmp_path, [photos], layers="C3", k=3, png=False, resume=False)
    left = sorted(p.name for p in (tmp_path / "out" / "topk").iterdir())
    assert left == ["C3.safetensors", "manifest.json", "mine.txt"]


def test_changed_winner_is_one_line_error(tmp_path, photos):
    opts = {"layers": "C1", "k": 9, "batch_size": 2, "png": False}
    _topk(tmp_path, [photos], shard="0/2", **opts)
    write_image(photos / "a/img0.png", size=(20, 24), seed=99)  # in shard 0's first batch
    with pytest.raises(ConvmapsError, match="img0.png changed"):
        _topk(tmp_path, [photos], shard="1/2", **opts)


def test_recorded_value_that_does_not_reproduce_is_refused(tmp_path, photos):
    opts = {"layers": "C1", "k": 2, "batch_size": 2, "png": False}
    _topk(tmp_path, [photos], shard="0/2", **opts)
    state = tmp_path / "out" / "topk" / "partial" / "shard-0-of-2.safetensors"
    with safe_open(str(state), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["C1/values"] = tensors["C1/values"] + 1.0
    save_file(tensors, state, meta)
    with pytest.raises(ConvmapsError, match="when ranked"):
        _topk(tmp_path, [photos], shard="1/2", **opts)


def test_cli_topk_lenet_on_the_bundled_samples(tmp_path):
    result = CliRunner().invoke(app, ["topk", "lenet", "--out", str(tmp_path / "o"), "-k", "2",
                                      "--png-cap", "1", "--workers", "0"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "o" / "topk"
    m = json.loads((folder / "manifest.json").read_text())
    assert len(m["inputs"]) == 8 and m["finished"] and m["modules"] == ["C1", "C3", "C5"]
    assert {p.name for p in folder.glob("*.safetensors")} == {
        "C1.safetensors", "C3.safetensors", "C5.safetensors"}
    assert (folder / "png" / "C3" / "0.png").is_file() and (folder / "png" / "C3.png").is_file()
    bad = CliRunner().invoke(app, ["topk", "lenet", "--out", str(tmp_path / "o"),
                                   "--project", "bogus"])
    assert bad.exit_code == 1 and "--project 'bogus'" in bad.output


def test_alexnet_with_inplace_relus_is_byte_identical_however_split(tmp_path):
    """Determinism on a model with in-place ReLUs: two runs and a 2-shard run of AlexNet's
    features.0 top-k (with projections and figures) give the same bytes."""
    for i in range(4):
        write_image(tmp_path / "in" / f"{i}.png", size=(72, 56), seed=30 + i)

    def run(out: str, shard: str | None = None) -> None:
        run_topk(plan_topk(TopkOptions(model="alexnet", weights="none", layers="0", k=2,
                                       inputs=[str(tmp_path / "in")], out=str(tmp_path / out),
                                       batch_size=2, workers=0, png_cap=2, shard=shard)))

    run("one")
    run("two")
    run("split", "0/2")
    run("split", "1/2")

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file()}

    one = files(tmp_path / "one")
    assert "topk/features.0.safetensors" in one and "topk/png/features.0/0.png" in one
    assert one == files(tmp_path / "two") == files(tmp_path / "split")


def test_a_folder_of_only_broken_images_is_one_line(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_text("not an image")
    (broken / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    result = CliRunner().invoke(app, ["topk", "lenet", str(broken), "--out", str(tmp_path / "o"),
                                      "--workers", "0"])
    assert result.exit_code == 1
    assert "no usable image among the 2 input(s)" in result.output
    assert "Traceback" not in result.output


# --- checkpoints ----------------------------------------------------------------------------


def _planned(tmp_path, photos, **kw):
    return plan_topk(TopkOptions(inputs=[str(photos)], out=str(tmp_path / "o"), layers="C1,F6",
                                 k=3, batch_size=2, workers=0, checkpoint_seconds=0, **kw))


def _checkpoint(tmp_path, photos) -> Path:
    """A shard's checkpoint left by a run killed after its first batches."""
    plan = _planned(tmp_path, photos, shard="0/2")
    run_topk(plan)  # shard 1 never runs: shard 0's state stays
    return tmp_path / "o" / "topk" / "partial" / "shard-0-of-2.safetensors"


@pytest.mark.parametrize("damage", ["garbage", "fewer channels", "images out of range",
                                    "3-D values", "images as floats"])
def test_a_checkpoint_that_cannot_be_ours_is_an_error_never_a_silent_restart(
        tmp_path, photos, damage):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = _checkpoint(tmp_path, photos)
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    if damage == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    else:
        if damage == "fewer channels":
            tensors = {k: (v[:3] if k.startswith("C1/") else v) for k, v in tensors.items()}
        elif damage == "images out of range":
            tensors["C1/images"] = tensors["C1/images"] + 1000
        elif damage == "3-D values":
            tensors["C1/values"] = tensors["C1/values"][..., None]
        else:
            tensors["C1/images"] = tensors["C1/images"].float()
        save_file(tensors, path, meta)
    with pytest.raises(ConvmapsError, match="not a readable top-k checkpoint"):
        _planned(tmp_path, photos, shard="0/2")


@pytest.mark.slow
def test_a_checkpoint_of_an_imagenet_sized_run_stays_small_and_loads_back(tmp_path, photos):
    """1.3 M images: the state file grows by under 256 bytes an image (its header stays small
    whatever the count, so safetensors' 100 MB header limit is never reached)."""
    import convmaps.jobs.topk as job
    from convmaps.io.images import ImageSource

    plan = _planned(tmp_path, photos)
    n = 1_300_000
    plan.sources = [ImageSource(Path(f"/data/{i}.jpg"), Path("/data"), f"{i}.jpg")
                    for i in range(n)]
    state = job._State({k: empty(c) for k, c in (("C1", 6), ("F6", 84))}, {}, done=5)
    sha = "ab" * 32
    state.entries = {i: {"key": f"{i}.jpg", "source": f"/data/{i}.jpg", "sha256": sha,
                         "status": "ok" if i % 1000 else "skipped: not an image", "files": []}
                     for i in range(n)}
    job._save_state(plan, state, (0, 1))
    path = tmp_path / "o" / "topk" / "partial" / "shard-0-of-1.safetensors"
    assert path.stat().st_size < 256 * n
    back = job._load_state(plan, (0, 1))
    assert back is not None and back.done == 5 and len(back.entries) == n
    assert back.entries[1] == state.entries[1]
    assert back.entries[0] == {**state.entries[0], "sha256": None}


def test_a_finished_run_whose_input_changed_is_redone_not_returned(tmp_path, photos):
    first = _planned(tmp_path, photos)
    run_topk(first)
    del first
    assert _planned(tmp_path, photos).done is not None  # nothing changed: already done
    write_image(photos / "a" / "img0.png", size=(20, 24), seed=1234)  # new bytes, same name
    again = _planned(tmp_path, photos)
    assert again.done is None
    manifest = run_topk(again)
    entry = next(e for e in manifest["inputs"] if e["key"] == "a/img0.png")
    from convmaps.io.images import sha256_file

    assert entry["sha256"] == sha256_file(photos / "a" / "img0.png")


def test_nan_weights_are_refused_in_one_line(tmp_path, photos):
    from safetensors.torch import save_file

    from convmaps.core.models import build

    state = build("lenet").state_dict()
    state["C3.weight"][0, 0, 0, 0] = float("nan")
    ckpt = tmp_path / "nan.safetensors"
    save_file(state, ckpt, {"arch": "lenet"})
    with pytest.raises(ConvmapsError, match=r"NaN or inf \(C3.weight\)"):
        plan_topk(TopkOptions(model=str(ckpt), inputs=[str(photos)], out=str(tmp_path / "o")))


def test_a_merge_removes_the_partial_states_of_an_earlier_split(tmp_path, photos):
    _checkpoint(tmp_path, photos)  # a 2-shard run that never finished
    partial = tmp_path / "o" / "topk" / "partial"
    assert [p.name for p in partial.iterdir()] == ["shard-0-of-2.safetensors"]
    for i in (2, 1, 0):
        run_topk(_planned(tmp_path, photos, shard=f"{i}/3", resume=False))
    assert not partial.exists()
    assert not list((tmp_path / "o" / "topk").glob("manifest.shard-*"))


def _sums_hold(node: dict, tol: float) -> int:
    """Check bias + listed terms + rest == value at every node of a tree file; returns how many
    nodes were checked."""
    terms = [t["value"] for t in node["contributions"]]
    scale = max([abs(node["value"]), abs(node["bias"]), *map(abs, terms), 1e-12])
    assert abs(node["bias"] + sum(terms) + node["rest"] - node["value"]) <= tol * scale, node
    return 1 + sum(_sums_hold(child, tol) for child in node["children"])


def _recipe_of(tree: dict) -> set[tuple[str, int]]:
    """The weighted lower units of one tree (conv and linear nodes below its root)."""
    found = set()
    stack = list(tree["children"])
    while stack:
        node = stack.pop()
        if node["kind"] in ("Conv2d", "Linear"):
            found.add((node["module"], node["channel"]))
        stack += node["children"]
    return found


def test_explain_writes_every_entrys_exact_sum_and_each_units_recipe(tmp_path):
    runner = CliRunner()
    out = tmp_path / "o"
    args = ["topk", "lenet", "--out", str(out), "-k", "3", "--project", "none", "--no-png",
            "--layers", "C1,C3,F6", "--workers", "0"]
    result = runner.invoke(app, [*args, "--explain"])
    assert result.exit_code == 0, result.output
    assert "topk explain: 106/106 units" in result.output  # 6 C1 + 16 C3 channels, 84 F6 units
    checked = 0
    for module, channels in (("C1", 6), ("C3", 16), ("F6", 84)):
        top = load_file(out / "topk" / f"{module}.safetensors")
        for c in range(channels):
            name = f"{c:0{len(str(channels - 1))}d}.json"
            record = json.loads((out / "topk" / "explain" / module / name).read_text())
            assert record["unit"] == f"{module}:{c}" and len(record["entries"]) == 3
            counts: dict[tuple[str, int], int] = {}
            for r, entry in enumerate(record["entries"]):
                tree = entry["tree"]
                # the root is the ranked entry itself, at its position
                assert tree["module"] == module and tree["channel"] == c
                assert tree["value"] == pytest.approx(float(top["values"][c, r]), rel=1e-5,
                                                      abs=1e-6)
                if module != "F6":
                    assert tree["position"] == top["positions"][c, r].tolist()
                checked += _sums_hold(tree, 1e-5)
                for unit in _recipe_of(tree):
                    counts[unit] = counts.get(unit, 0) + 1
            got = {(u["module"], u["channel"]): u["trees"] for u in record["recipe"]}
            assert got == counts
            assert [u["trees"] for u in record["recipe"]] == \
                sorted((u["trees"] for u in record["recipe"]), reverse=True)
    assert checked > 1000
    # the report's unit page shows the recipe, linked to the lower units' own pages
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    page = (out / "report" / "topk" / "F6" / "0.html").read_text()
    assert "<h2>Recipe</h2>" in page and "C5:" in page and "explain/F6/00.json" in page
    page = (out / "report" / "topk" / "C3" / "0.html").read_text()
    assert "<h2>Recipe</h2>" in page and 'href="../../topk/C1/' in page  # C1 was ranked too
    # --explain belongs to the run's options: another run without it is refused
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "--overwrite" in " ".join(again.output.split())
