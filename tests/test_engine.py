"""The engine and what every job shares: runtime, shards, locks, and the engine under
`project` and `filters` (the other jobs test it end to end)."""

from __future__ import annotations

import os
import threading
import traceback
import unicodedata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convmaps.cli import app
from convmaps.errors import ConvmapsError
from convmaps.io.store import locked
from convmaps.jobs.dump import plan_dump, run_dump
from convmaps.jobs.engine import collate, plan_job, run_job
from convmaps.jobs.filters import run_filters
from convmaps.jobs.project import Project
from convmaps.jobs.runtime import (
    batches,
    default_threads,
    default_workers,
    resolve_device,
    resolve_shard,
)
from convmaps.jobs.topk import plan_topk
from convmaps.options import DumpOptions, FilterOptions, ProjectOptions, TopkOptions
from convmaps.report import build_report

from .conftest import write_image


@pytest.mark.parametrize("cores,workers", [(1, 0), (2, 0), (8, 2), (16, 4), (128, 8)])
def test_default_workers_follow_the_usable_cores(monkeypatch, cores, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_workers() == workers



@pytest.mark.parametrize("cores,threads", [(1, 1), (2, 1), (16, 15)])
def test_default_threads_leave_one_core_free(monkeypatch, cores, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_threads() == threads


def test_batches_keep_their_positions_whatever_the_shard():
    whole = batches(7, 3, (0, 1))
    assert whole == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches(7, 3, (0, 2)) + batches(7, 3, (1, 2)) == [whole[0], whole[2], whole[1]]


def test_shard_comes_from_the_option_then_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert resolve_shard(None) == (3, 4)
    assert resolve_shard(" 1 / 2 ") == (1, 2)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConvmapsError, match="outside WORLD_SIZE"):
        resolve_shard(None)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConvmapsError, match="not an integer"):
        resolve_shard(None)


# --- the engine under every job ------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    for i in range(7):
        write_image(root / f"{'ab'[i % 2]}/img{i}.png", size=(20, 24), seed=i)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


def _project(tmp_path: Path, photos: Path, out: str, **kw) -> dict:
    o = ProjectOptions(model="lenet", inputs=[str(photos)], units=["C3:5", "OUTPUT:2"],
                       out=str(tmp_path / out), workers=0, batch_size=2, **kw)
    return run_job(plan_job(o, Project())).manifest


def test_project_takes_folders_shards_byte_identical_and_resumes(tmp_path, photos):
    whole = _project(tmp_path, photos, "one")
    assert [e["status"] for e in whole["inputs"]].count("ok") == 7
    assert any(e["status"].startswith("skipped") for e in whole["inputs"])
    for i in (1, 0):  # the last shard to finish merges
        _project(tmp_path, photos, "two", shard=f"{i}/2")
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")
    # a second run finds every image done and rewrites nothing
    plan = plan_job(ProjectOptions(model="lenet", inputs=[str(photos)], units=["C3:5", "OUTPUT:2"],
                                   out=str(tmp_path / "one"), workers=0, batch_size=2), Project())
    assert len(plan.finished) == 7
    seen: list[int] = []
    result = run_job(plan, on_progress=seen.append)
    assert (result.written, result.already, len(result.skipped)) == (0, 7, 1)
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")


def test_project_cli_shows_progress_and_its_closing_line(tmp_path, photos):
    result = CliRunner().invoke(app, ["project", "lenet", str(photos), "--unit", "C1:0",
                                      "--out", str(tmp_path / "o"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "project: 8/8 images" in result.output
    assert "7 written, 0 already done, 1 skipped" in result.output


def test_project_without_units_suggests_a_module_of_this_model(tmp_path):
    result = CliRunner().invoke(app, ["project", "lenet", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "--unit C5:0" in result.output


def test_filters_belong_to_one_run_and_the_report_shows_only_theirs(tmp_path):
    out = tmp_path / "o"
    run_filters(FilterOptions(model="lenet", out=str(out)))
    assert (out / "filters" / "png" / "C5.png").is_file()
    run_filters(FilterOptions(model="lenet", out=str(out)))  # the same run: fine
    (out / "filters" / "mine.txt").write_text("a user's file")
    with pytest.raises(ConvmapsError, match="--overwrite"):
        run_filters(FilterOptions(model="lenet", layers="C1", out=str(out)))
    run_filters(FilterOptions(model="lenet", layers="C1", out=str(out), resume=False))
    left = sorted(str(p.relative_to(out / "filters")) for p in (out / "filters").rglob("*")
                  if p.is_file())
    assert left == ["filters.safetensors", "manifest.json", "mine.txt", "png/C1.png"]
    build_report(out)
    page = (out / "report" / "filters.html").read_text()
    assert "filters/png/C1.png" in page and "C5.png" not in page


def test_filters_of_another_network_than_the_dump_are_refused(tmp_path):
    out = tmp_path / "o"
    run_dump(plan_dump(DumpOptions(model="lenet", out=str(out), png=False, workers=0)))
    with pytest.raises(ConvmapsError, match="dump of lenet"):
        run_filters(FilterOptions(model="lenet", weights="none", out=str(out)))


def test_topk_beside_a_dump_of_another_network_is_refused(tmp_path, photos):
    out = tmp_path / "o"
    run_dump(plan_dump(DumpOptions(model="lenet", inputs=[str(photos)], out=str(out), png=False,
                                   workers=0)))
    with pytest.raises(ConvmapsError, match="holds a dump of lenet .* would not match"):
        plan_topk(TopkOptions(model="lenet", weights="none", inputs=[str(photos)], out=str(out)))


def test_an_unreadable_shard_manifest_is_an_error_not_a_merge_that_never_comes(tmp_path, photos):
    out = tmp_path / "o"
    o = DumpOptions(model="lenet", inputs=[str(photos)], out=str(out), png=False, workers=0,
                    shard="0/2")
    plan = plan_dump(o)
    out.mkdir(exist_ok=True)
    (out / "manifest.shard-1-of-2.json").write_text("{ not json")  # a sibling's, garbled
    with pytest.raises(ConvmapsError, match=r"manifest\.shard-1-of-2\.json"):
        run_dump(plan)


def test_the_merge_lock_is_exclusive(tmp_path):
    inside: list[str] = []

    def second() -> None:
        with locked(tmp_path):
            inside.append("second")

    with locked(tmp_path):
        inside.append("first")
        t = threading.Thread(target=second)
        t.start()
        t.join(0.5)
        assert inside == ["first"]  # waits for the first to leave
    t.join(10)
    assert inside == ["first", "second"]
    assert list(tmp_path.iterdir()) == []  # no lock file is left behind



def test_one_run_writes_a_part_at_a_time_and_shards_share_it(tmp_path, photos):
    def topk(k: int, **kw):
        return plan_topk(TopkOptions(model="lenet", inputs=[str(photos)], out=str(tmp_path / "o"),
                                     k=k, layers="C1", png=False, workers=0, **kw))

    first = topk(3)
    with pytest.raises(ConvmapsError, match="being written by another convmaps run .*pid"):
        topk(5)
    with pytest.raises(ConvmapsError, match="being written"):
        topk(5, resume=False)  # --overwrite does not take a folder from a running run
    run_job(first)  # done: its hold is let go, and its lock file is gone
    assert not [p for p in (tmp_path / "o" / "topk").iterdir() if p.name.endswith(".lock")]
    with pytest.raises(ConvmapsError, match="--overwrite"):
        topk(5)
    # shards of one run cooperate
    shards = [topk(3, shard=f"{i}/2", resume=False) for i in range(2)]
    for plan in reversed(shards):
        run_job(plan)
    # a dump and projections in one OUT are two parts: each may run beside the other
    dump = plan_dump(DumpOptions(model="lenet", inputs=[str(photos)], out=str(tmp_path / "o"),
                                 png=False, workers=0))
    plan_job(ProjectOptions(model="lenet", inputs=[str(photos)], units=["C1:0"],
                            out=str(tmp_path / "o"), workers=0), Project())
    run_job(dump)


def test_a_killed_runs_lock_does_not_hold_the_folder(tmp_path, photos):
    (tmp_path / "o" / "topk").mkdir(parents=True)
    (tmp_path / "o" / "topk" / ".convmaps-run.manifest.0123456789abcdef.lock").write_text("pid 1")
    plan_topk(TopkOptions(model="lenet", inputs=[str(photos)], out=str(tmp_path / "o"),
                          workers=0))


@pytest.mark.parametrize("where", ["topk", "topk/png"])
def test_topk_never_writes_through_a_symlink_inside_out(tmp_path, photos, where):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "o" / where
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ConvmapsError, match="is a symlink"):
        plan_topk(TopkOptions(model="lenet", inputs=[str(photos)], out=str(tmp_path / "o"),
                              workers=0))
    assert list(elsewhere.iterdir()) == []


def test_an_image_whose_png_folder_is_a_symlink_is_skipped_and_nothing_lands_outside(
        tmp_path, photos):
    o = DumpOptions(model="lenet", inputs=[str(photos)], out=str(tmp_path / "o"), workers=0)
    run_dump(plan_dump(o))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    png = tmp_path / "o" / "a" / "img0.png" / "png"
    for p in png.iterdir():
        p.unlink()
    png.rmdir()
    png.symlink_to(elsewhere, target_is_directory=True)
    m = run_dump(plan_dump(o))
    entry = next(e for e in m["inputs"] if e["key"] == "a/img0.png")
    assert "is a symlink" in entry["status"]
    assert list(elsewhere.iterdir()) == []


def test_filters_never_write_through_a_symlink(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "filters").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ConvmapsError, match="is a symlink"):
        run_filters(FilterOptions(model="lenet", out=str(tmp_path / "o")))
    assert list(elsewhere.iterdir()) == []


ODD_NAMES = ["back\\slash.png", "new\nline.png", "tab\there.png", "-leading dash.png",
             "quo'te\"s.png", "<script>alert(1)</script>.png", "ü" * 60 + ".png", "Case.png",
             "case.png", "caf\u00e9.png", "cafe\u0301.png"]  # the last two: NFC and NFD


def test_odd_file_names_go_through_every_command_and_the_report(tmp_path):
    photos = tmp_path / "odd"
    for i, name in enumerate(ODD_NAMES):
        write_image(photos / name, size=(20, 24), seed=i)
    out = tmp_path / "o"
    dump = DumpOptions(model="lenet", inputs=[str(photos)], out=str(out), workers=0,
                       layers="C1,OUTPUT")
    first = run_dump(plan_dump(dump))
    # names that one folder of a case- or normalisation-insensitive disk would merge: the
    # second of each pair gets its input folder's name in front
    keys = [e["key"] for e in first["inputs"]]
    assert sorted(k.removeprefix("odd/") for k in keys) == sorted(ODD_NAMES)
    assert len({unicodedata.normalize("NFC", k).casefold() for k in keys}) == len(ODD_NAMES)
    assert all(e["status"] == "ok" for e in first["inputs"])
    again = plan_dump(dump)  # the manifest reads back, and every image is done
    assert len(again.finished) == len(ODD_NAMES)
    del again  # a plan never run lets its folder go when it goes
    run_job(plan_job(ProjectOptions(model="lenet", inputs=[str(photos)], units=["C1:0"],
                                    out=str(out), workers=0), Project()))
    run_job(plan_topk(TopkOptions(model="lenet", inputs=[str(photos)], out=str(out), k=2,
                                  layers="C1", png_cap=1, workers=0)))
    index = build_report(out)
    pages = list((index.parent).rglob("*.html"))
    text = "".join(p.read_text() for p in pages)
    assert "<script>alert(1)</script>" not in text  # escaped, never markup
    assert len([p for p in pages if "images" in p.parts]) >= len(ODD_NAMES)
    # every other command reads the folder back
    result = CliRunner().invoke(app, ["show", str(out)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["dump", "lenet", str(photos), "--out", str(out),
                                      "--layers", "C1,OUTPUT", "--workers", "0"])
    assert result.exit_code == 0 and f"0 image(s) written, {len(ODD_NAMES)} already" in \
        result.output
    result = CliRunner().invoke(app, ["dump", "lenet", str(photos), "--out", str(out),
                                      "--layers", "C1", "--workers", "0", "--overwrite"])
    assert result.exit_code == 0, result.output


# --- devices and batches on a GPU, checked without one ---------------------------------------


def test_under_torchrun_each_rank_sets_its_own_gpu_before_touching_cuda(monkeypatch):
    import torch

    calls: list[tuple[str, object]] = []
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set", d)))
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **k: calls.append(
        ("alloc", device)))
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert calls == [("set", torch.device("cuda", 3)), ("alloc", torch.device("cuda", 3))]
    calls.clear()
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # named: kept
    assert calls[0] == ("set", torch.device("cuda", 1))


def test_a_batch_is_stacked_where_it_is_decoded_so_the_loader_can_pin_it():
    import torch

    items = [{"index": 0, "tensor": torch.zeros(1, 2, 2)}, {"index": 1, "tensor": None},
             {"index": 2, "tensor": torch.ones(1, 2, 2)}]
    got, batch = collate(items)
    assert [it["tensor"] for it in got] == [0, None, 1]
    assert batch is not None and batch.shape == (2, 1, 2, 2) and batch[1].eq(1).all()
    assert collate([{"index": 0, "tensor": None}])[1] is None


def test_a_batch_leaves_the_device_once_at_one_place(tmp_path, photos, monkeypatch):
    """Counted on the CPU: `to_host` is called once a batch (dump, project) or never (topk keeps
    its top-k on the device), and no job copies a tensor to the host anywhere else."""
    import torch

    import convmaps.jobs.engine as engine
    from convmaps.jobs.dump import Dump
    from convmaps.jobs.topk import Topk

    copies: list[str] = []
    real = torch.Tensor.cpu

    def cpu(t: torch.Tensor, *a, **k) -> torch.Tensor:
        copies.append(traceback.format_stack(limit=2)[0])
        return real(t, *a, **k)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)

    def run(o, job) -> int:
        before = engine.host_copies
        copies.clear()
        run_job(plan_job(o, job))
        # no .cpu() of a batch's results outside to_host; topk copies its table to the host
        # only for a checkpoint (here: the last one)
        assert all("in _save_state" in c or "tensors = {" in c for c in copies), copies
        assert isinstance(job, Topk) or copies == []
        return engine.host_copies - before

    common = {"model": "lenet", "inputs": [str(photos)], "workers": 0, "batch_size": 3}
    assert run(DumpOptions(**common, out=str(tmp_path / "d"), kernels="C3", png=False),
               Dump()) == 3  # 8 inputs in batches of 3 (the broken one decodes to nothing)
    assert run(ProjectOptions(**common, out=str(tmp_path / "p"), units=["C3:1"], png=False),
               Project()) == 3
    assert run(TopkOptions(**common, out=str(tmp_path / "t"), project="none", png=False),
               Topk()) == 0
    from convmaps.jobs.explain import Explain
    from convmaps.jobs.invariance import Invariance
    from convmaps.jobs.occlude import Occlude
    from convmaps.options import ExplainOptions, InvarianceOptions, OccludeOptions

    assert run(OccludeOptions(**common, out=str(tmp_path / "o"), patch=14, stride=14,
                              png=False), Occlude()) == 3
    assert run(InvarianceOptions(**common, out=str(tmp_path / "i"), steps=2, png=False),
               Invariance()) == 3
    # explain's trees are Python numbers, read as they are built (one sync per node on a
    # GPU): at most one transfer per batch, and no stray .cpu()
    assert run(ExplainOptions(**common, out=str(tmp_path / "e"), units=["C3:1"], png=False),
               Explain()) <= 3


def test_to_host_keeps_every_tensor_and_value():
    import torch

    from convmaps.jobs.engine import to_host

    tree = ({"a": torch.arange(6.0).view(2, 3), "n": 3}, [torch.tensor([True, False])],
            torch.zeros(0, dtype=torch.int64))
    back = to_host(tree)
    assert back[0]["n"] == 3 and torch.equal(back[0]["a"], tree[0]["a"])
    assert torch.equal(back[1][0], tree[1][0]) and back[2].shape == (0,)


def test_the_loader_reads_each_input_once(tmp_path, opened):
    from convmaps.core.models import load_model
    from convmaps.io.images import find_images, sha256_file
    from convmaps.jobs.engine import DecodedImages

    path = write_image(tmp_path / "x.png")
    images = DecodedImages(find_images([path]), load_model("lenet").preprocess, {})
    opened.clear()
    item = images[0]
    assert opened.count(str(path)) == 1
    assert item["sha256"] == sha256_file(path)


def test_a_plan_makes_one_pass_on_the_meta_device(tmp_path, photos, monkeypatch):
    """Shapes, parameters, receptive fields and which modules run: one pass, for every job."""
    import convmaps.core.capture as capture
    import convmaps.core.fields as fields
    from convmaps.jobs.dump import Dump
    from convmaps.jobs.topk import Topk

    passes: list[int] = []
    real = capture.meta_trace

    def counted(*a, **k):  # type: ignore[no-untyped-def]
        passes.append(1)
        return real(*a, **k)

    monkeypatch.setattr(capture, "meta_trace", counted)
    monkeypatch.setattr(fields, "meta_trace", counted)
    common = {"model": "lenet", "inputs": [str(photos)], "workers": 0}
    for o, job in ((DumpOptions(**common, out=str(tmp_path / "d"), kernels="C3"), Dump()),
                   (TopkOptions(**common, out=str(tmp_path / "t")), Topk()),
                   (ProjectOptions(**common, out=str(tmp_path / "p"), units=["C3:1"]),
                    Project())):
        passes.clear()
        plan_job(o, job)
        assert len(passes) == 1, type(job).__name__


@pytest.mark.parametrize("first,then", [
    (["occlude", "lenet", "-w", "none", "--patch", "14", "--stride", "14"],
     ["explain", "lenet", "--unit", "C3:1"]),
    (["explain", "lenet", "-w", "none", "--unit", "C3:1"], ["dump", "lenet", "--layers", "C1"]),
    (["invariance", "lenet", "-w", "none", "--steps", "2"], ["topk", "lenet", "-k", "2"]),
    (["filters", "lenet", "-w", "none"], ["occlude", "lenet", "--patch", "14", "--stride", "14"]),
])
def test_no_part_of_out_mixes_with_another_networks(tmp_path, first, then):
    """Any part of OUT (not only a dump) fixes the network of every other part there."""
    from typer.testing import CliRunner

    from convmaps.cli import app

    out = ["--out", str(tmp_path / "o")]
    runner = CliRunner()
    assert runner.invoke(app, [*first, *out]).exit_code == 0
    result = runner.invoke(app, [*then, *out])
    assert result.exit_code == 1, result.output
    line = " ".join(result.output.split())
    assert "(weights none)" in line and "would not match: choose another --out" in line
    assert runner.invoke(app, [*then, "-w", "none", *out]).exit_code == 0  # the same network
