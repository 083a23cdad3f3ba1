from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from convmaps.core.models import build, lenet_preset
from convmaps.core.pooling import unpool
from convmaps.errors import ConvmapsError, TooLargeError
from convmaps.io.images import decode, sha256_file
from convmaps.jobs.dump import plan_dump, run_dump
from convmaps.options import DType, DumpOptions

from .conftest import no_hang, recompute, write_image


def _lenet_ckpt(tmp_path: Path) -> str:
    """A seeded LeNet checkpoint, so these tests do not depend on the bundled training."""
    from safetensors.torch import save_file

    path = tmp_path / "lenet.safetensors"
    save_file(build("lenet").state_dict(), path, {"arch": "lenet"})
    return str(path)


def _dump(tmp_path: Path, inputs: list[Path], out: str = "out", **kw) -> dict:
    kw.setdefault("workers", 0)  # not one process per core of whatever machine runs the tests
    o = DumpOptions(model=_lenet_ckpt(tmp_path), inputs=[str(p) for p in inputs],
                    out=str(tmp_path / out), **kw)
    return run_dump(plan_dump(o))


@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    for i, rel in enumerate(["a/cat.png", "b/cat.png", "b/deep/dog.jpg", "c.bmp", "d.webp"]):
        write_image(root / rel, seed=i)
    (root / "notes.txt").write_text("not an image, ignored in a folder")
    return root


def test_dump_writes_exact_activations_per_image(tmp_path, photos):
    manifest = _dump(tmp_path, [photos], batch_size=2, png=False)
    keys = [e["key"] for e in manifest["inputs"]]
    assert keys == ["a/cat.png", "b/cat.png", "b/deep/dog.jpg", "c.bmp", "d.webp"]
    model = build("lenet").eval()
    names = [n for n, _ in model.named_children()]
    for entry in manifest["inputs"]:
        assert entry["status"] == "ok"
        src = photos / entry["key"]
        assert entry["sha256"] == sha256_file(src)
        path = tmp_path / "out" / entry["key"] / "activations.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            acts = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        assert meta["sha256"] == entry["sha256"] and meta["source"] == str(src)
        assert set(acts) == set(names)
        # Independent recomputation from the image itself, one image at a time.
        prev = lenet_preset()(decode(src))[None]
        for name in names:
            if name == "flatten":
                prev = prev.flatten(1)
                continue
            prev = recompute(model.get_submodule(name), prev)
            torch.testing.assert_close(acts[name], prev[0], rtol=1e-4, atol=1e-5)


def test_switches_round_trip_through_saved_files(tmp_path, photos):
    _dump(tmp_path, [photos / "c.bmp"], png=False)
    folder = tmp_path / "out" / "c.bmp"
    acts = load_file(folder / "activations.safetensors")
    sw = load_file(folder / "switches.safetensors")
    model = build("lenet")
    assert set(sw) == {"S2", "S4"}
    for pool, before in (("S2", "relu1"), ("S4", "relu3")):
        assert sw[pool].dtype == torch.int64
        back = unpool(acts[pool], sw[pool], model.get_submodule(pool), acts[before].shape)
        assert torch.equal(model.get_submodule(pool)(back), acts[pool])


def test_no_switches_and_dtype(tmp_path, photos):
    _dump(tmp_path, [photos / "c.bmp"], png=False, switches=False, dtype=DType.float16,
          layers="C1,C3")
    folder = tmp_path / "out" / "c.bmp"
    assert not (folder / "switches.safetensors").exists()
    acts = load_file(folder / "activations.safetensors")
    assert set(acts) == {"C1", "C3"} and acts["C1"].dtype == torch.float16


def test_broken_inputs_are_skipped_and_recorded(tmp_path, photos):
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "text.png").write_text("hello")
    good = (photos / "c.bmp").read_bytes()
    (photos / "cut.bmp").write_bytes(good[: len(good) // 2])
    manifest = _dump(tmp_path, [photos], png=False)
    status = {e["key"]: e["status"] for e in manifest["inputs"]}
    assert status["empty.jpg"].startswith("skipped: empty")
    assert status["text.png"].startswith("skipped: not an image")
    assert status["cut.bmp"].startswith("skipped:")
    assert status["a/cat.png"] == "ok"
    assert "notes.txt" not in status
    assert not (tmp_path / "out" / "empty.jpg").exists()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_inputs_give_byte_identical_outputs(tmp_path, photos):
    _dump(tmp_path, [photos], out="one", batch_size=3)
    _dump(tmp_path, [photos], out="two", batch_size=3)
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert one == two and "manifest.json" in one and any(k.endswith(".png") for k in one)


def test_decoding_workers_give_the_same_files(tmp_path, photos):
    one = _dump(tmp_path, [photos], out="w0", batch_size=2, kernels="C1")
    two = _dump(tmp_path, [photos], out="w2", batch_size=2, kernels="C1", workers=2)
    assert one == two
    assert _files(tmp_path / "w0") == _files(tmp_path / "w2")


def test_killed_run_resumes_to_identical_result(tmp_path, photos):
    for i in range(5):  # ten images in five batches of two
        write_image(photos / "more" / f"{i}.png", seed=10 + i)
    _dump(tmp_path, [photos], out="clean", batch_size=2)
    o = DumpOptions(model=_lenet_ckpt(tmp_path), inputs=[str(photos)], out=str(tmp_path / "k"),
                    batch_size=2)

    def kill(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_dump(plan_dump(o), on_progress=kill)
    # the manifest claims the folder from the start: images still to do are listed as pending
    started = json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert not started["finished"]
    assert {e["status"] for e in started["inputs"]} == {"pending"}
    plan = plan_dump(o)
    # the first batch was written; at most two more were in flight when the run was killed
    assert {0, 1} <= plan.complete <= set(range(6))
    # a write killed half-way leaves a temp file, and a damaged image is redone too
    first = tmp_path / "k" / plan.sources[0].key
    (first / ".activations.safetensors.99.tmp").write_bytes(b"partial")
    (first / "switches.safetensors").unlink()
    (tmp_path / "k" / plan.sources[1].key / ".png.77.tmp").write_bytes(b"stale")
    plan = plan_dump(o)
    assert 0 not in plan.complete and 1 in plan.complete
    run_dump(plan)
    # stale temporary files of the killed run are gone too
    assert _files(tmp_path / "k") == _files(tmp_path / "clean")


def test_files_cut_short_by_a_power_cut_are_redone(tmp_path, photos):
    """Per-image files are not fsynced: a crash can leave a renamed file cut short. Resume
    checks every file's completeness, so such an image is redone, not trusted."""
    _dump(tmp_path, [photos / "c.bmp", photos / "d.webp"], kernels="C1")
    o = DumpOptions(model=_lenet_ckpt(tmp_path), inputs=[str(photos / "c.bmp"),
                    str(photos / "d.webp")], out=str(tmp_path / "out"), kernels="C1")
    assert plan_dump(o).complete == {0, 1}
    for rel in ("c.bmp/png/C3.png", "d.webp/kernels.safetensors"):
        path = tmp_path / "out" / rel
        path.write_bytes(path.read_bytes()[:-100])
    assert plan_dump(o).complete == set()


def test_another_configuration_is_refused_and_overwrite_replaces_it(tmp_path, photos):
    _dump(tmp_path, [photos / "c.bmp"], png=False, layers="C1")
    o = DumpOptions(model=_lenet_ckpt(tmp_path), inputs=[str(photos / "c.bmp")],
                    out=str(tmp_path / "out"), png=False, layers="C3")
    with pytest.raises(ConvmapsError, match="--overwrite"):
        plan_dump(o)
    o.layers = "C1"
    assert plan_dump(o).complete == {0}
    o.resume = False
    assert plan_dump(o).complete == set()


def test_manifest_records_the_run(tmp_path, photos):
    manifest = _dump(tmp_path, [photos / "c.bmp"], png=False)
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["model"] == "lenet" and "Normalize" in manifest["preprocessing"]
    assert [r["name"] for r in manifest["layers"]][:2] == ["C1", "relu1"]
    assert manifest["layers"][0]["out_shape"] == [6, 28, 28]
    # receptive fields by hand: C1 sees 5 px; S2 6 (one more, jump 2); C3 6 + 4 x 2 = 14
    fields = {r["name"]: (r["field"], r["jump"]) for r in manifest["layers"]}
    assert fields["C1"] == ([5, 5], [1, 1]) and fields["S2"] == ([6, 6], [2, 2])
    assert fields["C3"] == ([14, 14], [2, 2]) and fields["OUTPUT"] == ([28, 28], None)
    entry = manifest["inputs"][0]
    assert entry["files"] == ["activations.safetensors", "switches.safetensors"]


def test_size_limit_is_checked_before_work(tmp_path, photos):
    with pytest.raises(TooLargeError, match=r"over --max-bytes 1\.0 kB"):
        _dump(tmp_path, [photos], max_bytes="1KB")
    assert not (tmp_path / "out").exists()


def test_no_images_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvmapsError, match="no images"):
        _dump(tmp_path, [tmp_path / "empty"])


def test_shards_cover_inputs_once_and_merge_to_the_single_run(tmp_path, photos):
    _dump(tmp_path, [photos], out="single", batch_size=2)
    shard_sets = []
    for i in range(3):
        plan = plan_dump(DumpOptions(model=_lenet_ckpt(tmp_path), inputs=[str(photos)],
                                     out=str(tmp_path / "sharded"), batch_size=2,
                                     shard=f"{i}/3"))
        shard_sets.append(set(plan.mine))
        run_dump(plan)
        merged = (tmp_path / "sharded" / "manifest.json").exists()
        assert merged == (i == 2)  # the last shard to finish merges
    assert set().union(*shard_sets) == set(range(5))
    assert sum(len(s) for s in shard_sets) == 5
    assert _files(tmp_path / "sharded") == _files(tmp_path / "single")


@pytest.mark.parametrize("spec", ["3/3", "1", "a/b", "-1/2"])
def test_bad_shard(tmp_path, photos, spec):
    with pytest.raises(ConvmapsError, match="--shard"):
        _dump(tmp_path, [photos], shard=spec)


def test_kernel_and_tap_maps_sum_to_the_real_conv(tmp_path, photos):
    _dump(tmp_path, [photos / "c.bmp"], kernels="conv", taps="C1,C3", png_cap=4)
    folder = tmp_path / "out" / "c.bmp"
    kernels = load_file(folder / "kernels.safetensors")
    taps = load_file(folder / "taps.safetensors")
    acts = load_file(folder / "activations.safetensors")
    model = build("lenet")
    x = lenet_preset()(decode(photos / "c.bmp"))
    inputs = {"C1": x, "C3": acts["S2"], "C5": acts["S4"]}
    for name, conv in (("C1", model.C1), ("C3", model.C3), ("C5", model.C5)):
        real = torch.nn.functional.conv2d(inputs[name], conv.weight, conv.bias,
                                          padding=conv.padding)  # independent of capture
        torch.testing.assert_close(acts[name], real, rtol=1e-5, atol=1e-5)
        km, bias = kernels[name], kernels[f"{name}.bias"]
        assert km.shape == (conv.out_channels, conv.in_channels, *real.shape[1:])
        torch.testing.assert_close(km.sum(1) + bias[:, None, None], real, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bias, conv.bias)
        if name in taps:
            tm = taps[name]
            assert tm.shape == (conv.out_channels, *real.shape[1:], 5, 5)
            torch.testing.assert_close(tm.sum((-2, -1)) + bias[:, None, None], real,
                                       rtol=1e-5, atol=1e-5)
        kpng = sorted(p.name for p in (folder / "png" / f"{name}.kernels").iterdir())
        assert kpng == [f"{o}.png" for o in range(4)]  # --png-cap 4
    assert not (folder / "png" / "C5.taps").exists()


def test_kernel_maps_in_half_precision(tmp_path, photos):
    _dump(tmp_path, [photos / "c.bmp"], out="f32", kernels="C3", png=False)
    _dump(tmp_path, [photos / "c.bmp"], out="bf16", kernels="C3", png=False,
          dtype=DType.bfloat16)
    f32 = load_file(tmp_path / "f32" / "c.bmp" / "kernels.safetensors")["C3"]
    bf16 = load_file(tmp_path / "bf16" / "c.bmp" / "kernels.safetensors")["C3"]
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, f32.to(torch.bfloat16))  # computed in fp32, stored reduced


def test_size_estimate_counts_kernel_maps(tmp_path, photos):
    o = DumpOptions(model=_lenet_ckpt(tmp_path), inputs=[str(photos / "c.bmp")],
                    out=str(tmp_path / "out"), kernels="C3", taps="C3", png=False,
                    dtype=DType.float16)
    plan = plan_dump(o)
    run_dump(plan)
    written = sum(p.stat().st_size for p in (tmp_path / "out" / "c.bmp").iterdir())
    maps = 16 * 10 * 10 * (6 + 25) * 2  # C3's kernel and tap maps in float16, by hand
    assert maps < written <= plan.job.image_bytes < written + 3 * 4096


@pytest.mark.slow
def test_big_layer_streams_in_bounded_memory(tmp_path):
    """A non-streaming writer holds all 411 MB of VGG11 features.3 kernel maps at once (plus
    the copy `save_file` makes); streaming stays below the bytes it writes. Each child's own
    peak RSS is measured (wait4), not the running maximum over all children."""
    import os
    import subprocess
    import sys

    img = write_image(tmp_path / "a.png", size=(64, 48))
    common = [sys.executable, "-m", "convmaps", "dump", "vgg11", str(img), "-w", "none",
              "--layers", "3", "--no-switches", "--no-png"]

    def peak(*extra: str) -> int:
        child = subprocess.Popen([*common, *extra], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        assert child.returncode == 0
        return usage.ru_maxrss * 1024

    base = peak("--out", str(tmp_path / "base"))
    with_kernels = peak("--kernels", "3", "--out", str(tmp_path / "k"))
    written = (tmp_path / "k" / "a.png" / "kernels.safetensors").stat().st_size
    assert written > 400e6
    assert with_kernels - base < written  # glibc keeps freed chunks: RSS is noisy below this


def test_fifo_named_like_an_image_is_skipped_not_waited_on(tmp_path, photos):
    import os

    os.mkfifo(photos / "pipe.png")
    manifest = _dump(tmp_path, [photos], png=False)
    status = {e["key"]: e["status"] for e in manifest["inputs"]}
    assert status["pipe.png"].startswith("skipped: unreadable")


def test_outputs_inside_an_input_folder_are_not_inputs(tmp_path, photos):
    first = _dump(tmp_path, [photos], out="photos/out")
    o = DumpOptions(model=_lenet_ckpt(tmp_path), inputs=[str(photos)],
                    out=str(photos / "out"))
    plan = plan_dump(o)
    assert len(plan.sources) == len(first["inputs"]) == 5
    assert plan.complete == set(range(5))


def test_new_weights_in_the_same_checkpoint_redo_every_image(tmp_path, photos):
    from safetensors.torch import save_file

    ckpt = _lenet_ckpt(tmp_path)
    o = DumpOptions(model=ckpt, inputs=[str(photos / "c.bmp")], out=str(tmp_path / "o"),
                    png=False)
    run_dump(plan_dump(o))
    assert plan_dump(o).complete == {0}
    state = {k: v * 2 for k, v in load_file(ckpt).items()}
    save_file(state, ckpt, {"arch": "lenet"})
    with pytest.raises(ConvmapsError, match="other options"):
        plan_dump(o)
    o.resume = False
    assert plan_dump(o).complete == set()


def test_changed_image_with_stale_png_is_redone(tmp_path, photos):
    """PNGs are written before the safetensors that mark an image done, so a run killed
    between them never leaves an old PNG behind an image that counts as complete."""
    src = photos / "c.bmp"
    o = DumpOptions(model=_lenet_ckpt(tmp_path), inputs=[str(src)], out=str(tmp_path / "o"))
    run_dump(plan_dump(o))
    write_image(src, seed=99, fmt="BMP")  # the image changes
    png = tmp_path / "o" / "c.bmp" / "png" / "C1.png"
    before = png.read_bytes()
    import convmaps.jobs.dump as pipeline

    real = pipeline.save_tensors

    def killed(path, *a, **k):
        if str(path).endswith("activations.safetensors"):
            raise KeyboardInterrupt
        return real(path, *a, **k)

    pipeline.save_tensors = killed  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            run_dump(plan_dump(o))
    finally:
        pipeline.save_tensors = real  # type: ignore[assignment]
    assert png.read_bytes() != before  # the PNG was already redrawn
    assert plan_dump(o).complete == set()  # and the image is not taken as done


def test_extreme_aspect_ratio_is_skipped_before_resizing(tmp_path):
    from PIL import Image

    Image.new("RGB", (20000, 2)).save(tmp_path / "strip.png")
    o = DumpOptions(model="alexnet", weights="none", inputs=[str(tmp_path / "strip.png")],
                    out=str(tmp_path / "o"), png=False, layers="0")
    manifest = run_dump(plan_dump(o))
    assert manifest["inputs"][0]["status"].startswith("skipped: too large once resized")


# --- one owner per output folder -------------------------------------------------------------


def _assert_owned(out: Path) -> dict:
    """Every file in an image folder is one its manifest entry lists, and vice versa."""
    manifest = json.loads((out / "manifest.json").read_text())
    for e in manifest["inputs"]:
        folder = out / e["key"]
        on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                         if p.is_file()) if folder.is_dir() else []
        assert on_disk == sorted(e["files"]), e["key"]
    return manifest


def test_overwrite_with_fewer_outputs_leaves_no_old_files(tmp_path, photos):
    _dump(tmp_path, [photos / "c.bmp"], kernels="C1", taps="C3", png_cap=2)
    folder = tmp_path / "out" / "c.bmp"
    assert (folder / "png" / "C1.kernels" / "1.png").is_file()
    (folder / "notes.txt").write_text("mine")  # a user's own file is never removed
    _dump(tmp_path, [photos / "c.bmp"], layers="C1", resume=False)
    assert not (folder / "kernels.safetensors").exists()
    assert not (folder / "png" / "C1.kernels").exists()
    assert (folder / "notes.txt").read_text() == "mine"
    (folder / "notes.txt").unlink()
    _assert_owned(tmp_path / "out")


def test_another_model_into_the_same_folder(tmp_path, photos):
    _dump(tmp_path, [photos / "c.bmp"], png=False)
    o = DumpOptions(model="alexnet", weights="none", inputs=[str(photos / "d.webp")],
                    out=str(tmp_path / "out"), layers="0", png=False, workers=0)
    with pytest.raises(ConvmapsError, match="other options .*--overwrite"):
        plan_dump(o)
    o.resume = False
    manifest = run_dump(plan_dump(o))
    assert [e["key"] for e in manifest["inputs"]] == ["d.webp"]
    assert not (tmp_path / "out" / "c.bmp").exists()  # the first model's files are gone
    _assert_owned(tmp_path / "out")


@pytest.mark.parametrize("resume", [True, False])
def test_a_foreign_manifest_is_never_overwritten(tmp_path, photos, resume):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"hello": 1}')
    with pytest.raises(ConvmapsError, match="not a convmaps manifest.*another --out"):
        _dump(tmp_path, [photos / "c.bmp"], resume=resume)
    assert (out / "manifest.json").read_text() == '{"hello": 1}'


def test_an_image_that_became_broken_loses_its_outputs(tmp_path, photos):
    _dump(tmp_path, [photos], png=False)
    (photos / "c.bmp").write_bytes(b"not any more")
    manifest = _dump(tmp_path, [photos], png=False)
    entry = next(e for e in manifest["inputs"] if e["key"] == "c.bmp")
    assert entry["status"].startswith("skipped: ") and entry["files"] == []
    assert not (tmp_path / "out" / "c.bmp").exists()
    _assert_owned(tmp_path / "out")


def test_same_configuration_adds_images_and_lists_every_image(tmp_path, photos):
    _dump(tmp_path, [photos / "a"], png=False)
    manifest = _dump(tmp_path, [photos / "b"], png=False)
    assert [e["key"] for e in manifest["inputs"]] == ["cat.png", "deep/dog.jpg"]
    # a/cat.png and b/cat.png have the same key: the later run's image replaced it
    cat = next(e for e in manifest["inputs"] if e["key"] == "cat.png")
    assert cat["sha256"] == sha256_file(photos / "b" / "cat.png")
    _dump(tmp_path, [photos / "c.bmp"], png=False)
    manifest = _assert_owned(tmp_path / "out")
    assert sorted(e["key"] for e in manifest["inputs"]) == ["c.bmp", "cat.png", "deep/dog.jpg"]


def test_a_leftover_shard_manifest_of_other_inputs_is_not_merged(tmp_path, photos):
    old = [photos / "a", photos / "c.bmp"]
    _dump(tmp_path, old, png=False, batch_size=1, shard="1/2")  # its shard 0 never ran
    new = [photos / "b"]
    _dump(tmp_path, new, png=False, batch_size=1, shard="0/2")
    assert not (tmp_path / "out" / "manifest.json").exists()  # shard 1 of *these* inputs: not yet
    manifest = _dump(tmp_path, new, png=False, batch_size=1, shard="1/2")
    keys = [e["key"] for e in manifest["inputs"]]
    assert len(keys) == len(set(keys))
    # this run's images, then the earlier run's (same configuration) that are in the folder
    assert keys == ["cat.png", "deep/dog.jpg", "c.bmp"]
    assert not list((tmp_path / "out").glob("manifest.shard-*"))
    _assert_owned(tmp_path / "out")


def test_a_reused_module_gets_every_call_written_resumed_and_estimated(tmp_path):
    img = write_image(tmp_path / "a.png", size=(48, 40))
    o = DumpOptions(model="resnet18", weights="none", inputs=[str(img)], out=str(tmp_path / "o"),
                    layers="layer1.0.relu", workers=0)
    plan = plan_dump(o)
    assert plan.job.layout.activations == ("layer1.0.relu", "layer1.0.relu@1")
    manifest = run_dump(plan)
    files = manifest["inputs"][0]["files"]
    assert {"png/layer1.0.relu.png", "png/layer1.0.relu@1.png"} <= set(files)
    acts = load_file(tmp_path / "o" / "a.png" / "activations.safetensors")
    assert set(acts) == {"layer1.0.relu", "layer1.0.relu@1"}
    written = sum(p.stat().st_size for p in (tmp_path / "o" / "a.png").rglob("*") if p.is_file())
    assert written <= plan.job.image_bytes
    assert plan_dump(o).complete == {0}
    _assert_owned(tmp_path / "o")


def test_inputs_under_the_output_folder_are_inputs(tmp_path, photos, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = _dump(tmp_path, [Path("photos")], out=".", png=True)
    assert len(first["inputs"]) == 5
    again = _dump(tmp_path, [Path(".")], out=".", png=True)
    keys = [e["key"] for e in again["inputs"]]
    assert not any("/png/" in k for k in keys)  # its own PNGs are not read back as inputs
    assert {"photos/c.bmp", "c.bmp"} <= set(keys)


def test_inputs_that_would_clash_with_outputs_are_skipped(tmp_path, photos):
    _dump(tmp_path, [photos / "c.bmp"], out="old")  # an input folder holding an older dump
    write_image(tmp_path / "old" / "c.bmp.png")
    (tmp_path / "old" / "c.bmp" / "manifest.json").write_bytes((photos / "c.bmp").read_bytes())
    disguised = tmp_path / "x" / "manifest.json"
    disguised.parent.mkdir()
    disguised.write_bytes((photos / "c.bmp").read_bytes())
    manifest = _dump(tmp_path, [tmp_path / "old", disguised, photos / "c.bmp"], out="new")
    status = {e["key"]: e["status"] for e in manifest["inputs"]}
    assert status["manifest.json"].startswith("skipped: output clash")
    assert status["c.bmp/png/C1.png"].startswith("skipped: output clash")
    assert status["c.bmp.png"] == "ok"
    _assert_owned(tmp_path / "new")


def test_size_bound_covers_pngs(tmp_path, photos):
    o = DumpOptions(model=_lenet_ckpt(tmp_path), inputs=[str(photos / "c.bmp")],
                    out=str(tmp_path / "o"), kernels="C3", taps="C3", workers=0)
    plan = plan_dump(o)
    run_dump(plan)
    written = sum(p.stat().st_size for p in (tmp_path / "o").rglob("*.*") if p.is_file()
                  and p.name != "manifest.json")
    assert written <= plan.job.image_bytes
    o.max_bytes, o.out = str(written), str(tmp_path / "p")  # what was written: refused
    with pytest.raises(TooLargeError):
        plan_dump(o)


def test_alexnet_with_inplace_relus_is_byte_identical(tmp_path, monkeypatch):
    """Two runs (one writer thread, then two writing batches side by side), a resumed run and
    a sharded run of AlexNet (in-place ReLUs) give the same bytes, and every file records
    ReLU(inplace=True): metadata is taken before any pass."""
    import convmaps.jobs.engine

    for i in range(3):
        write_image(tmp_path / "in" / f"{i}.png", size=(64, 48), seed=i)

    def run(out: str, **kw) -> dict:
        o = DumpOptions(model="alexnet", weights="none", inputs=[str(tmp_path / "in")],
                        out=str(tmp_path / out), layers="0-5", batch_size=1, workers=0, **kw)
        return run_dump(plan_dump(o))

    monkeypatch.setattr(convmaps.jobs.engine, "writer_threads", lambda: 1)
    run("one")
    monkeypatch.setattr(convmaps.jobs.engine, "writer_threads", lambda: 2)
    run("two")
    run("sharded", shard="0/2")
    run("sharded", shard="1/2")
    one = _files(tmp_path / "one")
    assert one == _files(tmp_path / "two") == _files(tmp_path / "sharded")
    for i in range(3):
        with safe_open(str(tmp_path / "one" / f"{i}.png" / "activations.safetensors"), "pt") as f:
            assert f.metadata()["module.features.1"] == "ReLU(inplace=True)"
    assert not any(getattr(m, "inplace", True) is False
                   for m in build("alexnet").features if isinstance(m, torch.nn.ReLU))


def test_predictions_are_the_models_top5(tmp_path, photos):
    from convmaps.core.models import load_model

    manifest = _dump(tmp_path, [photos / "c.bmp"], png=False)
    top = manifest["inputs"][0]["top5"]
    loaded = load_model(_lenet_ckpt(tmp_path))
    x = lenet_preset()(decode(photos / "c.bmp"))[None]
    probs = torch.softmax(loaded.model(x)[0].double(), 0)
    expected = probs.argsort(descending=True)[:5].tolist()
    assert [t["index"] for t in top] == expected
    for t in top:
        assert t["probability"] == pytest.approx(probs[t["index"]].item(), abs=1e-6)
    # resumed images keep their predictions (read back from their activations file)
    again = _dump(tmp_path, [photos / "c.bmp"], png=False)
    assert again["inputs"][0]["top5"] == top


def test_bundled_lenet_predictions_name_fashion_mnist_classes(tmp_path):
    o = DumpOptions(model="lenet", out=str(tmp_path / "o"), png=False, workers=0)
    manifest = run_dump(plan_dump(o))
    for e in manifest["inputs"]:
        names = [t["class"] for t in e["top5"]]
        assert names[0] in ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                            "Shirt", "Sneaker", "Bag", "Ankle boot")


def test_threads_are_set_for_the_run_and_restored(tmp_path, photos):
    before = torch.get_num_threads()
    seen = []
    o = DumpOptions(model=_lenet_ckpt(tmp_path), inputs=[str(photos / "c.bmp")],
                    out=str(tmp_path / "o"), threads=1, png=False, workers=0)
    run_dump(plan_dump(o), on_progress=lambda n: seen.append(torch.get_num_threads()))
    assert seen == [1] and torch.get_num_threads() == before


@pytest.mark.parametrize("device", ["meta", "cuda:7", "xpu", "mps", "nonsense"])
def test_unusable_devices_are_refused_before_work(tmp_path, photos, device):
    with pytest.raises(ConvmapsError, match="--device"):
        _dump(tmp_path, [photos / "c.bmp"], device=device)
    assert not (tmp_path / "out").exists()


def test_pngs_name_classes_and_follow_png_scale(tmp_path, photos):
    from io import BytesIO

    from PIL import Image

    from convmaps import render
    from convmaps.options import PngScale

    o = DumpOptions(model="lenet", inputs=[str(photos / "c.bmp")], out=str(tmp_path / "o"),
                    workers=0, kernels="C3", png_cap=12)
    plan = plan_dump(o)
    run_dump(plan)
    folder = tmp_path / "o" / "c.bmp"
    acts = load_file(folder / "activations.safetensors")
    out = acts["OUTPUT"]
    assert plan.job.categories and len(plan.job.categories) == out.numel() == 10  # bundled: named
    # the classifier's output names its classes; F6 (84 values) does not
    # (each PNG is titled: model, module, image)
    named = render.png_bytes(render.render_activation(out, classes=plan.job.categories,
                                                      title="lenet · OUTPUT · c.bmp"))
    assert (folder / "png" / "OUTPUT.png").read_bytes() == named
    assert named != render.png_bytes(render.render_activation(out, title="lenet · OUTPUT · c.bmp"))
    assert (folder / "png" / "F6.png").read_bytes() == \
        render.png_bytes(render.render_activation(acts["F6"], title="lenet · F6 · c.bmp"))
    # 12 kernel-map PNGs: two digits, so that they sort
    kernels = sorted(p.name for p in (folder / "png" / "C3.kernels").iterdir())
    assert kernels == [f"{i:02d}.png" for i in range(12)]
    # --png-scale channel: another run configuration, per-channel ranges in the chunk
    o.png_scale, o.resume = PngScale.channel, True
    with pytest.raises(ConvmapsError, match="--overwrite"):
        plan_dump(o)
    o.resume = False
    run_dump(plan_dump(o))
    png = Image.open(BytesIO((folder / "png" / "C1.png").read_bytes()))
    assert png.info["convmaps-png-scale"] == "channel"
    assert len(png.info["convmaps-range"].split(";")) == acts["C1"].shape[0]


# --- nothing outside convmaps' own files is ever removed (review findings) --------------------


def test_symlinks_inside_out_are_never_followed(tmp_path, photos):
    victim = tmp_path / "victim"
    (victim / "png").mkdir(parents=True)
    (victim / "png" / "holiday.png").write_bytes(b"x")
    (victim / "activations.safetensors").write_bytes(b"y")
    out = tmp_path / "out"
    out.mkdir()
    (out / "c.bmp").symlink_to(victim)  # an image folder that leads elsewhere
    (out / "manifest.json").write_text(json.dumps({"run": "old", "inputs": [
        {"key": "c.bmp", "source": "x", "sha256": None, "status": "ok",
         "files": ["png/holiday.png", "activations.safetensors"]}]}))
    manifest = _dump(tmp_path, [photos / "c.bmp", photos / "d.webp"], resume=False)
    assert sorted(p.name for p in victim.rglob("*")) == ["activations.safetensors", "holiday.png",
                                                         "png"]
    status = {e["key"]: e["status"] for e in manifest["inputs"]}
    assert status["c.bmp"].startswith("skipped: output clash") and status["d.webp"] == "ok"


def test_overwrite_removes_only_the_files_a_manifest_lists(tmp_path, photos):
    out = tmp_path / "out"
    (out / "photos" / "png").mkdir(parents=True)
    (out / "photos" / "empty_album").mkdir()
    (out / "photos" / "png" / "beach.png").write_bytes(b"mine")
    (out / "manifest.json").write_text(json.dumps({"run": "zzz", "inputs": [
        {"key": "photos", "source": "x", "sha256": None, "status": "ok", "files": []}]}))
    _dump(tmp_path, [photos / "c.bmp"], resume=False)
    assert (out / "photos" / "png" / "beach.png").read_bytes() == b"mine"
    assert (out / "photos" / "empty_album").is_dir()


def test_overwrite_under_shards_keeps_the_siblings_work(tmp_path, photos):
    first = _dump(tmp_path, [photos], png=False, batch_size=1, shard="0/2", resume=False)
    assert first["inputs"]  # shard 0's own images
    merged = _dump(tmp_path, [photos], png=False, batch_size=1, shard="1/2", resume=False)
    assert [e["status"] for e in merged["inputs"]] == ["ok"] * 5  # shard 0's images are there
    _assert_owned(tmp_path / "out")


def test_a_dump_beside_another_networks_projections_is_refused(tmp_path, photos):
    from convmaps.jobs.project import run_project
    from convmaps.options import ProjectOptions

    out = tmp_path / "out"
    run_project(ProjectOptions(model="lenet", inputs=[str(photos / "c.bmp")], units=["C1:0"],
                               out=str(out), png=False))
    with pytest.raises(ConvmapsError, match="projections of lenet"):
        _dump(tmp_path, [photos / "c.bmp"], png=False)  # a seeded checkpoint, not the bundled
    _dump(tmp_path, [photos / "c.bmp"], png=False, resume=False)
    assert not (out / "projections.json").exists()
    assert not (out / "c.bmp" / "projections.safetensors").exists()


def test_temporary_report_folders_are_not_inputs(tmp_path, photos, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / ".report.999.tmp" / "inputs" / "abc.png")
    manifest = _dump(tmp_path, [Path("photos"), Path(".")], out=".", png=False)
    assert not any(".report" in e["key"] for e in manifest["inputs"])


def test_hand_edited_predictions_are_dropped_on_resume(tmp_path, photos):
    from safetensors.torch import save_file

    _dump(tmp_path, [photos / "c.bmp"], png=False)
    path = tmp_path / "out" / "c.bmp" / "activations.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, path, {**meta, "top5": '[{"class": "x", "probability": "high"}]'})
    again = _dump(tmp_path, [photos / "c.bmp"], png=False)
    assert again["inputs"][0]["status"] == "ok" and "top5" not in again["inputs"][0]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == again  # readable


def test_type_words_skip_modules_that_never_run(tmp_path):
    """GoogLeNet's aux heads never run in eval mode: `conv,pool` selects the convs and pools
    that run, while naming an aux module is still an error."""
    image = write_image(tmp_path / "x.png")
    o = DumpOptions(model="googlenet", weights="none", inputs=[str(image)],
                    out=str(tmp_path / "out"), layers="conv,pool", kernels="conv")
    plan = plan_dump(o)
    names = {x.name for x in plan.job.layers}
    assert {"conv1.conv", "maxpool1", "inception5b.branch4.1.conv", "avgpool"} <= names
    assert not any(n.startswith("aux") for n in [*names, *(x.name for x in plan.job.kernels)])
    o.layers, o.kernels = "conv1.conv,aux2.conv.conv", None
    with pytest.raises(ConvmapsError, match="aux2.conv.conv never run"):
        plan_dump(o)


def test_fifos_in_place_of_files_do_not_hang_a_resume(tmp_path, photos, fifo):
    """An input, a tensor file and a PNG replaced by named pipes after a dump: the resume
    redoes those images (the input is recorded as unreadable) instead of blocking forever."""
    inputs = [photos / "a" / "cat.png", photos / "c.bmp", photos / "d.webp"]
    _dump(tmp_path, inputs, layers="C1")
    out = tmp_path / "out"
    (out / "cat.png" / "png" / "C1.png").unlink()
    fifo(out / "cat.png" / "png" / "C1.png")
    (out / "c.bmp" / "activations.safetensors").unlink()
    fifo(out / "c.bmp" / "activations.safetensors")
    inputs[2].unlink()
    fifo(inputs[2])
    again = no_hang(_dump, tmp_path, inputs, "out", layers="C1")
    status = {e["key"]: e["status"] for e in again["inputs"]}
    assert status["cat.png"] == status["c.bmp"] == "ok"
    assert status["d.webp"].startswith("skipped: unreadable: not a regular file")
    assert (out / "cat.png" / "png" / "C1.png").is_file()
