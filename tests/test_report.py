"""The static report: every page, link and picture resolves from disk, nothing refers to the
network, names are escaped, and a real browser (headless Chromium) renders it."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from convmaps.cli import app
from convmaps.errors import ConvmapsError
from convmaps.jobs.dump import plan_dump, run_dump
from convmaps.jobs.filters import run_filters
from convmaps.jobs.project import run_project
from convmaps.options import DumpOptions, FilterOptions, ProjectOptions
from convmaps.report import build_report

from .conftest import no_hang

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("href", "src") and v:
                self.refs.append(v)
        if tag == "script":
            self.scripts.append(dict(attrs).get("src") or "")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A LeNet dump with kernel maps, projections and filters of three images, one of them
    with a hostile name."""
    root = tmp_path_factory.mktemp("report")
    src = Path(__file__).parents[1] / "convmaps" / "data" / "samples"
    inputs = root / "in"
    inputs.mkdir()
    for name in ("0_t-shirt-top.png", "7_sneaker.png"):
        shutil.copy(src / name, inputs / name)
    shutil.copy(src / "1_trouser.png", inputs / "<b>'x\" & y#1?.png")
    out = root / "out"
    run_dump(plan_dump(DumpOptions(model="lenet", inputs=[str(inputs)], out=str(out),
                                   kernels="C1", png_cap=2, workers=0)))
    run_project(ProjectOptions(model="lenet", inputs=[str(inputs)], units=["C3:5", "OUTPUT:1"],
                               out=str(out)))
    run_filters(FilterOptions(model="lenet", out=str(out)))
    build_report(out)
    return out


def _pages(out: Path) -> list[Path]:
    return sorted((out / "report").rglob("*.html"))


def test_every_link_and_picture_resolves_and_nothing_is_remote(site):
    pages = _pages(site)
    assert {p.relative_to(site / "report").as_posix() for p in pages} >= {
        "index.html", "filters.html", "images/0.html", "images/1.html", "images/2.html"}
    for page in pages:
        text = page.read_text()
        parser = _Refs()
        parser.feed(text)
        assert parser.scripts and all(s.endswith("report.js") for s in parser.scripts)
        for ref in parser.refs:
            assert not re.match(r"[a-z]+:", ref), (page, ref)  # no http(s):, file:, data:
            target = (page.parent / unquote(ref.split("#")[0])).resolve()
            assert target.is_file(), (page, ref)
    css = (site / "report" / "style.css").read_text()
    assert "url(" not in css and "@import" not in css and "http" not in css


def test_pages_show_what_the_folder_holds(site):
    index = (site / "report" / "index.html").read_text()
    assert "T-shirt/top" in index and "Sneaker" in index  # predictions
    assert "receptive field" in index and "C3" in index  # layer table
    hostile = next(p for p in _pages(site) if "trouser" in p.read_text().lower()
                   or "&lt;b&gt;" in p.read_text())
    text = hostile.read_text()
    assert "<b>'x" not in text  # escaped wherever it is shown
    page = (site / "report" / "images" / "0.html").read_text()
    assert 'data-grid="' in page and "data-range=" in page  # the hover knows the tiles
    assert "png/projections/deconvnet/C3/5.png" in page
    assert "C1.kernels" in page
    assert "filters/png/C1.png" in (site / "report" / "filters.html").read_text()


def test_rebuilding_replaces_only_its_own_report(tmp_path, site):
    out = tmp_path / "o"
    shutil.copytree(site, out)
    before = {p.name for p in (out / "report" / "inputs").iterdir()}
    build_report(out)
    assert {p.name for p in (out / "report" / "inputs").iterdir()} == before
    assert not list(out.glob(".report*"))  # no temporary folder left
    shutil.rmtree(out / "report")
    (out / "report").mkdir()
    (out / "report" / "mine.txt").write_text("keep")
    with pytest.raises(ConvmapsError, match="not made by convmaps"):
        build_report(out)
    assert (out / "report" / "mine.txt").read_text() == "keep"


def test_nothing_to_report_is_one_line(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "nothing to report" in result.output
    assert result.output.count("\n") == 1


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", "--disable-dev-shm-usage", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian package chromium not installed "
                    "(.ci/run installs it when it can)")
@pytest.mark.parametrize("page", ["index.html", "images/0.html", "filters.html"])
def test_a_real_browser_renders_the_pages(site, tmp_path, page):
    url = (site / "report" / page).resolve().as_uri()
    shot = tmp_path / "shot.png"
    _chromium("--window-size=1000,1200", f"--screenshot={shot}", url)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1200, 1000)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 50, f"{page} looks blank ({colours} colours)"
    dom = _chromium("--dump-dom", url).stdout
    assert 'id="tip"' in dom  # the script ran (it adds the tooltip) without stopping early
    assert "<table" in dom or "<figure" in dom


def test_report_of_a_topk_run_has_a_page_per_module_and_unit(tmp_path):
    import json

    from convmaps.jobs.topk import plan_topk, run_topk
    from convmaps.options import TopkOptions

    out = tmp_path / "out"
    run_topk(plan_topk(TopkOptions(out=str(out), layers="C1,F6", k=2, png_cap=1, workers=0)))
    index = build_report(out)
    site = index.parent
    m = json.loads((out / "topk" / "manifest.json").read_text())
    for page in ("topk/index.html", "topk/C1.html", "topk/F6.html", "topk/C1/5.html",
                 "topk/F6/83.html"):
        assert (site / page).is_file(), page
    from safetensors.torch import load_file

    top1 = int(load_file(out / "topk" / "C1.safetensors")["images"][0, 0])
    unit = (site / "topk" / "C1" / "0.html").read_text()
    assert m["inputs"][top1]["key"] in unit and "topk/png/C1/0.png" in unit


def test_a_topk_file_of_the_wrong_shapes_is_one_line(tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "topk"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"run": "r", "modules": ["C1"], "inputs": []}))
    save_file({"values": torch.zeros(2, 3), "images": torch.zeros(2, 5, dtype=torch.int64)},
              folder / "C1.safetensors")
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "not a convmaps top-k file" in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "report").exists()


def test_input_pictures_are_decoded_in_the_calling_thread(tmp_path, monkeypatch):
    """Decoding sets process-wide warning filters: threads would undo each other's."""
    import threading

    import convmaps.io.images as images

    out = tmp_path / "o"
    run_dump(plan_dump(DumpOptions(model="lenet", out=str(out), png=False, workers=0)))
    threads = set()
    real = images.decode

    def decode(*a, **k):
        threads.add(threading.current_thread().name)
        return real(*a, **k)

    monkeypatch.setattr(images, "decode", decode)
    build_report(out)
    assert threads == {threading.current_thread().name}


def _topk_folder(out: Path, tensors: dict) -> None:
    import json

    from safetensors.torch import save_file

    folder = out / "topk"
    folder.mkdir(parents=True)
    inputs = [{"key": k, "source": k, "status": "ok", "files": []} for k in ("a.png", "b.png")]
    (folder / "manifest.json").write_text(json.dumps({"run": "r", "modules": ["C1"],
                                                      "inputs": inputs}))
    save_file(tensors, folder / "C1.safetensors")


@pytest.mark.parametrize("change,why", [
    ({"images": [[0.0, 1.0]]}, "dtypes"),  # indices stored as floats
    ({"images": [[0, 2]]}, "out of range"),
    ({"images": [[-1, 0]]}, "out of range"),
    ({"values": [[3, 2]]}, "dtypes"),
    ({"positions": [[[0.5, 1.0], [2.0, 3.0]]]}, "dtypes"),
    ({"values": [[[3.0], [2.0]]]}, "shapes"),
])
def test_a_topk_file_of_odd_dtypes_or_indices_is_one_line(tmp_path, change, why):
    import torch

    good = {"values": [[3.0, 2.0]], "images": [[1, 0]], "positions": [[[0, 1], [2, 3]]]}
    tensors = {k: torch.tensor(v) for k, v in {**good, **change}.items()}
    _topk_folder(tmp_path, tensors)
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "not a convmaps top-k file" in result.output
    assert why in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "report").exists()


def test_a_well_formed_topk_file_of_narrow_dtypes_reports(tmp_path):
    import torch

    _topk_folder(tmp_path, {"values": torch.tensor([[3.0, 2.0]], dtype=torch.float16),
                            "images": torch.tensor([[1, 0]], dtype=torch.uint16)})
    assert build_report(tmp_path).is_file()
    assert "b.png" in (tmp_path / "report" / "topk" / "C1" / "0.html").read_text()


@pytest.mark.parametrize("name", ["manifest.json", "projections.json", "topk/manifest.json"])
def test_a_fifo_in_place_of_a_manifest_is_one_line(tmp_path, site, fifo, name):
    out = tmp_path / "o"
    shutil.copytree(site, out)
    (out / "topk").mkdir()
    (out / name).unlink(missing_ok=True)
    fifo(out / name)
    result = no_hang(runner.invoke, app, ["report", str(out)])
    assert result.exit_code == 1 and "not a regular file but a named pipe" in result.output
    assert result.output.count("\n") == 1


def test_fifos_in_place_of_pictures_do_not_hang_the_report(tmp_path, site, fifo):
    out = tmp_path / "o"
    shutil.copytree(site, out)
    png = next(out.glob("*/png/C1.png"))
    png.unlink()
    fifo(png)  # the report reads its text chunks
    old = next((out / "report" / "inputs").iterdir())
    old.unlink()
    fifo(old)  # the pictures of the last build are copied over
    index = no_hang(build_report, out)
    assert index.is_file() and not (out / "report" / "inputs" / old.name).is_fifo()


def test_a_second_build_waits_for_the_first(tmp_path, site):
    import fcntl
    import threading

    out = tmp_path / "o"
    shutil.copytree(site, out)
    with open(out / ".convmaps-report.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a build in another process holds it
        done = threading.Event()
        thread = threading.Thread(target=lambda: (build_report(out), done.set()), daemon=True)
        thread.start()
        assert not done.wait(2), "the build did not wait for the lock"
    thread.join(120)
    assert done.is_set() and (out / "report" / "index.html").is_file()


def test_two_builds_at_once_both_succeed(tmp_path, site):
    import os
    import sys

    out = tmp_path / "o"
    shutil.copytree(site, out)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    runs = [subprocess.Popen([sys.executable, "-m", "convmaps", "report", str(out)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
    assert (out / "report" / "index.html").is_file() and not list(out.glob(".report*"))


def test_a_stale_temporary_folder_with_an_absurd_pid_goes(tmp_path, site):
    out = tmp_path / "o"
    shutil.copytree(site, out)
    stale = out / f".report.{10**30}.tmp"
    stale.mkdir()
    build_report(out)
    assert not stale.exists()


def test_parts_are_joined_by_what_an_image_is_not_by_its_name(tmp_path):
    """A dump and a top-k whose inputs share a name but not bytes: the unit page does not
    link the top-k's image to the dump's page of another image, nor the other way round."""
    from convmaps.jobs.topk import plan_topk, run_topk
    from convmaps.options import TopkOptions

    from .conftest import write_image

    write_image(tmp_path / "one" / "shoe.png", seed=1)
    write_image(tmp_path / "two" / "shoe.png", seed=2)
    out = tmp_path / "o"
    run_dump(plan_dump(DumpOptions(model="lenet", inputs=[str(tmp_path / "one")], out=str(out),
                                   png=False, workers=0)))
    run_topk(plan_topk(TopkOptions(model="lenet", inputs=[str(tmp_path / "two")], out=str(out),
                                   k=1, layers="C1", png=False, project="none", workers=0)))
    build_report(out)
    unit = (out / "report" / "topk" / "C1" / "0.html").read_text()
    assert "shoe.png" in unit and "images/0.html" not in unit
    image = (out / "report" / "images" / "0.html").read_text()
    assert "topk/C1/0.html" not in image


def test_a_symlink_inside_the_report_is_refused_and_nothing_outside_is_copied(tmp_path):
    out = tmp_path / "o"
    run_dump(plan_dump(DumpOptions(model="lenet", out=str(out), png=False, workers=0)))
    build_report(out)
    secret = tmp_path / "private"
    secret.mkdir()
    (secret / "secret.txt").write_text("not for the web")
    shutil.rmtree(out / "report" / "inputs")
    (out / "report" / "inputs").symlink_to(secret, target_is_directory=True)
    with pytest.raises(ConvmapsError, match="is a symlink"):
        build_report(out)
    assert not list(out.rglob("secret.txt"))[1:]  # only the one behind the link


def test_replacing_a_part_removes_the_report_built_on_it(tmp_path):
    from convmaps.jobs.topk import plan_topk, run_topk
    from convmaps.options import TopkOptions

    out = tmp_path / "o"

    def topk(k: int, resume: bool = True) -> None:
        run_topk(plan_topk(TopkOptions(model="lenet", out=str(out), k=k, layers="C1", png=False,
                                       project="none", workers=0, resume=resume)))

    topk(2)
    build_report(out)
    assert (out / "report" / "index.html").is_file()
    topk(2)  # the same run: nothing replaced, the report stays
    assert (out / "report" / "index.html").is_file()
    topk(3, resume=False)  # --overwrite: the report showed what is gone
    assert not (out / "report").exists()


def _built_from(out: Path) -> dict:
    import json

    text = (out / "report" / ".convmaps-report").read_text()
    return json.loads(text.removeprefix("made by convmaps report from "))


def test_a_report_records_what_it_was_built_from(tmp_path):
    out = tmp_path / "o"
    m = run_dump(plan_dump(DumpOptions(model="lenet", out=str(out), png=False, workers=0)))
    build_report(out)
    assert _built_from(out) == {"dump": {"run": m["run"], "inputs": len(m["inputs"])},
                                "standalone": False}


# --- image pages, standalone reports and progress -----------------------------------------


@pytest.fixture(scope="module")
def driven(tmp_path_factory) -> Path:
    """A LeNet dump and a top-k run (with projections and figures) of the same eight images:
    every image page lists the top-k units it drives."""
    from convmaps.jobs.topk import plan_topk, run_topk
    from convmaps.options import TopkOptions

    out = tmp_path_factory.mktemp("driven") / "out"
    run_dump(plan_dump(DumpOptions(model="lenet", out=str(out), kernels="C1", png_cap=2,
                                   workers=0)))
    run_topk(plan_topk(TopkOptions(model="lenet", out=str(out), k=2, layers="C1,C3",
                                   png_cap=2, workers=0)))
    return out


def _refs(page: Path) -> list[str]:
    parser = _Refs()
    parser.feed(page.read_text())
    return parser.refs


def test_an_image_page_leads_with_its_maps_and_folds_its_top_k_units_per_module(tmp_path,
                                                                                 driven):
    import json

    from safetensors.torch import load_file

    out = tmp_path / "o"
    shutil.copytree(driven, out)
    build_report(out)
    m = json.loads((out / "manifest.json").read_text())
    topk = json.loads((out / "topk" / "manifest.json").read_text())
    key = m["inputs"][0]["key"]
    index = next(i for i, e in enumerate(topk["inputs"]) if e["key"] == key)
    want = {name: sorted({c for c, row in enumerate(load_file(
        out / "topk" / f"{name}.safetensors")["images"].tolist()) if index in row})
            for name in ("C1", "C3")}
    want = {name: units for name, units in want.items() if units}
    assert want, "the first image drives no unit: pick another"
    page = (out / "report" / "images" / "0.html").read_text()
    # the picture, its predictions and its feature maps come first, the top-k units last
    order = [page.index(s) for s in ('class="input"', "<th>probability</th>",
                                     "<h2>Feature maps", "kernel maps of C1",
                                     "<h2 id=\"topk\">Top-k units this image drives")]
    assert order == sorted(order)
    total = sum(len(u) for u in want.values())
    assert f"among the top-k images of {total} unit" in page
    folds = re.findall(r"<details><summary>(.*?)</summary><p>(.*?)</p></details>", page)
    got = {}
    for summary, links in folds:  # "C3 · 14 units", then its links
        name, count = summary.split(" · ")
        units = [int(c) for c in re.findall(r'href="../topk/[^/]+/(\d+).html"', links)]
        assert count == f"{len(units)} unit" + ("" if len(units) == 1 else "s")
        got[name] = units
    assert got == want  # one fold per module, in model order, each unit once, in order
    assert list(got) == [n for n in ("C1", "C3") if n in want]


@pytest.mark.parametrize("fixture", ["site", "driven"])
def test_a_standalone_report_holds_every_picture_it_shows(tmp_path, fixture, request):
    import os

    out = tmp_path / "o"
    shutil.copytree(request.getfixturevalue(fixture), out)
    build_report(out, standalone=True)
    assert _built_from(out)["standalone"] is True
    alone = tmp_path / "elsewhere" / "report"
    shutil.copytree(out / "report", alone)  # report/ alone, away from OUT
    shown = 0
    for page in alone.rglob("*.html"):
        for ref in _refs(page):
            assert not re.match(r"[a-z]+:", ref), (page, ref)
            target = (page.parent / unquote(ref.split("#")[0])).resolve()
            assert target.is_file() and target.is_relative_to(alone.resolve()), (page, ref)
            shown += ref.endswith(".png")
    assert shown
    # hard links, not copies, where the file system allows them
    files = out / "report" / "files"
    copied = {p: out / p.relative_to(files) for p in files.rglob("*") if p.is_file()}
    assert copied and all(os.path.samefile(p, src) for p, src in copied.items())
    build_report(out)  # without --standalone again: no copies stay behind
    assert not files.exists() and not _built_from(out)["standalone"]
    assert all(src.is_file() for src in copied.values())  # and OUT's own files are untouched


def test_a_standalone_report_copies_where_the_disk_makes_no_hard_links(tmp_path, site,
                                                                       monkeypatch):
    import errno
    import os

    out = tmp_path / "o"
    shutil.copytree(site, out)
    tried = []

    def link(src, dst, **kwargs):
        tried.append(src)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", link)
    build_report(out, standalone=True)
    copied = [p for p in (out / "report" / "files").rglob("*") if p.is_file()]
    assert len(copied) > 5 and len(tried) == 1  # the first refusal settles it
    for p in copied:
        src = out / p.relative_to(out / "report" / "files")
        assert not os.path.samefile(p, src) and p.read_bytes() == src.read_bytes()


def test_a_standalone_report_copies_nothing_through_a_symlink_or_a_fifo(tmp_path, site,
                                                                        fifo):
    out = tmp_path / "o"
    shutil.copytree(site, out)
    secret = tmp_path / "private"
    secret.mkdir()
    (secret / "secret.png").write_bytes(b"not for the web")
    pngs = sorted(out.glob("*/png/C1.png"))
    pngs[0].unlink()
    pngs[0].symlink_to(secret / "secret.png")
    pngs[1].unlink()
    fifo(pngs[1])
    image = pngs[2].parents[1]  # a whole image folder behind a symlink
    shutil.move(image, secret / "image")
    image.symlink_to(secret / "image", target_is_directory=True)
    notes: list[str] = []
    index = no_hang(build_report, out, standalone=True, on_note=notes.append)
    assert index.is_file()
    text = "\n".join(notes)
    assert "a symlink" in text and "not a regular file but a named pipe" in text
    assert f"{image.name}/png/C1.png not copied" in text
    files = out / "report" / "files"
    assert not list(files.rglob("secret.png")) and not (files / image.name).exists()
    assert not any(p.is_symlink() or not (p.is_file() or p.is_dir()) for p in files.rglob("*"))
    pages = " ".join(p.read_text() for p in _pages(out))
    assert 'class="note"' in pages and "not copied" in pages


def test_report_progress_counts_its_pictures_and_pages_to_the_total(tmp_path, driven):
    out = tmp_path / "o"
    shutil.copytree(driven, out)
    shutil.rmtree(out / "report", ignore_errors=True)
    seen: dict[str, list[tuple[int, int]]] = {}
    build_report(out, on_phase=lambda name, done, of: seen.setdefault(name, []).append(
        (done, of)))
    pages = len(_pages(out))
    assert seen["pages"][0] == (0, pages) and seen["pages"][-1] == (pages, pages)
    assert [d for d, _ in seen["pages"]] == list(range(pages + 1))
    assert seen["pictures"][-1] == (8, 8)  # the eight inputs drawn
    seen.clear()
    build_report(out)  # pictures are kept: only pages are left to report
    assert "pictures" not in seen


def test_report_cli_prints_progress_lines_in_a_log(tmp_path, driven):
    import os
    import sys

    out = tmp_path / "o"
    shutil.copytree(driven, out)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "convmaps", "report", str(out),
                           "--standalone"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pages = len(_pages(out))
    assert f"report pages: {pages}/{pages} pages" in proc.stderr and "pages/s" in proc.stderr
    assert "\x1b[" not in proc.stderr and "━" not in proc.stderr
    assert "wrote" in proc.stdout and (out / "report" / "files").is_dir()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian package chromium not installed")
def test_a_real_browser_shows_the_pictures_of_a_standalone_report_moved_away(tmp_path, site):
    out = tmp_path / "o"
    shutil.copytree(site, out)
    build_report(out, standalone=True)
    alone = tmp_path / "moved" / "report"
    shutil.copytree(out / "report", alone)
    shutil.rmtree(out)  # nothing left to fall back on

    def coloured(name: str) -> float:
        """The share of coloured (not grey) pixels below the input and its predictions: the
        feature maps, drawn with colour maps, or nothing but their captions."""
        shot = tmp_path / name
        _chromium("--window-size=1000,1200", f"--screenshot={shot}",
                  (alone / "images" / "0.html").as_uri())
        pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)[400:]
        return float(((pixels.max(axis=2) - pixels.min(axis=2)) > 40).mean())

    assert coloured("shown.png") > 0.1  # the maps, drawn from the copies
    shutil.rmtree(alone / "files")
    assert coloured("gone.png") < 0.01  # (the check sees a missing picture)


def test_occlusion_maps_are_on_their_image_pages_and_in_a_standalone_report(tmp_path):
    """An OUT with only occlusion maps gets image pages showing them; beside a dump, the
    dump's image pages show them too, joined by sha256."""
    from convmaps.jobs.occlude import run_occlude
    from convmaps.options import OccludeOptions

    out = tmp_path / "o"
    run_occlude(OccludeOptions(model="lenet", out=str(out), patch=10, stride=9, workers=0))
    build_report(out, standalone=True)
    index = (out / "report" / "index.html").read_text()
    assert "Images with projections, occlusion maps or explain trees" in index
    pages = sorted((out / "report" / "images").glob("*.html"))
    assert len(pages) == 8
    for page in pages:
        html = page.read_text()
        assert "Occlusion (where the network looks)" in html and "target" in html
        (src,) = [r for r in _refs(page) if r.endswith("occlusion.png")]
        assert (page.parent / unquote(src)).resolve().is_file()
    assert _built_from(out)["occlusion"]["inputs"] == 8
    # Fig. 7 on a page of its own: every image's figure, each linked to its image page
    assert '<a href="occlusion.html">Fig. 7</a>' in index and "figure by figure" in index
    assert '<a href="../occlusion.html">occlusion</a>' in pages[0].read_text()  # the nav bar
    paper = out / "report" / "occlusion.html"
    srcs = [r for r in _refs(paper) if r.endswith("occlusion.png")]
    assert len(srcs) == 8 and all((paper.parent / unquote(r)).resolve().is_file() for r in srcs)
    links = [r for r in _refs(paper) if r.startswith("images/")]
    assert sorted(links) == sorted(f"images/{n}.html" for n in range(8))
    assert "incremental (each op" in paper.read_text()  # how the maps were computed
    run_dump(plan_dump(DumpOptions(model="lenet", out=str(out), png=False, workers=0)))
    build_report(out)
    first = (out / "report" / "images" / "0.html").read_text()
    assert "Occlusion (where the network looks)" in first
    assert "<th>probability</th>" in first  # the dump's page: its predictions, then occlusion


def test_an_occluded_unit_shows_its_top_k_patches_where_a_topk_run_ranked_it(tmp_path):
    """Fig. 7's unit panel beside what the unit responds to: its top-k figure and page."""
    from convmaps.jobs.occlude import run_occlude
    from convmaps.jobs.topk import plan_topk, run_topk
    from convmaps.options import OccludeOptions, TopkOptions

    out = tmp_path / "o"
    run_topk(plan_topk(TopkOptions(out=str(out), layers="C3", k=3, png_cap=3, workers=0)))
    run_occlude(OccludeOptions(model="lenet", out=str(out), patch=10, stride=9, workers=0,
                               units=["C3:2", "C3:9"]))  # 9: past --png-cap, no figure
    build_report(out, standalone=True)
    for page, n in ((out / "report" / "images" / "0.html", 1),
                    (out / "report" / "occlusion.html", 8)):  # (one per image)
        html, refs = page.read_text(), _refs(page)
        assert "unit C3:2</a>: what it responds to most" in html and "unit C3:9<" not in html
        links = [r for r in refs if r.endswith("topk/C3/2.html")]
        figs = [r for r in refs if r.endswith(".png") and "topk" in r]
        assert len(links) == len(figs) == n
        assert all((page.parent / unquote(r)).resolve().is_file() for r in links + figs)


def test_explain_trees_get_pages_linked_from_their_image_and_top_k_unit(tmp_path):
    """A page per tree (its figure and the tree as nested lists), linked from the image page
    and from the top-k page of the unit it explains; the figure is copied when standalone."""
    from convmaps.jobs.explain import run_explain
    from convmaps.jobs.topk import plan_topk, run_topk
    from convmaps.options import ExplainOptions, TopkOptions

    out = tmp_path / "o"
    run_explain(ExplainOptions(model="lenet", out=str(out), units=["C3:5", "C3:1@2,2"],
                               depth=2, workers=0))
    build_report(out, standalone=True)
    index = (out / "report" / "index.html").read_text()
    assert "explain trees" in index and len(list((out / "report" / "images").glob("*"))) == 8
    trees = sorted((out / "report" / "explain").glob("*.html"))
    assert len(trees) == 16
    for page in trees:
        html = page.read_text()
        assert '<ul class="tree">' in html and "Conv2d" in html and "bias" in html
        (src,) = [r for r in _refs(page) if r.endswith(".png") and "explain" in r]
        assert (page.parent / unquote(src)).resolve().is_file()
    first = (out / "report" / "images" / "0.html").read_text()
    assert "Explained (exact sums)" in first and ">C3:1@2,2</a>" in first
    assert _built_from(out)["explain"]["inputs"] == 8
    run_topk(plan_topk(TopkOptions(out=str(out), layers="C1,C3", k=2, png_cap=1,
                                   project="none", workers=0)))
    build_report(out)
    # a tree's nodes link to the top-k pages of the units they are, where the run ranked them
    tree = next(p for p in (out / "report" / "explain").glob("*.html")
                if "C3:5@" in p.read_text())
    links = [r for r in _refs(tree) if "topk/" in r]
    assert "../topk/C3/5.html" in links and any(r.startswith("../topk/C1/") for r in links)
    assert all((tree.parent / r).resolve().is_file() for r in links)
    unit = (out / "report" / "topk" / "C3" / "5.html").read_text()
    assert "Explained (exact sums)" in unit and "C3:5 on " in unit
    assert "C3:1@2,2 on" in (out / "report" / "topk" / "C3" / "1.html").read_text()
    assert "Explained" not in (out / "report" / "topk" / "C3" / "2.html").read_text()


def test_every_image_page_is_reachable_from_the_index(tmp_path):
    """A dump of some images and occlusion maps of others: the index links every image page."""
    from convmaps.jobs.occlude import run_occlude
    from convmaps.options import OccludeOptions

    src = Path(__file__).parents[1] / "convmaps" / "data" / "samples"
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, names in ((a, ["0_t-shirt-top.png", "1_trouser.png"]), (b, ["7_sneaker.png"])):
        folder.mkdir()
        for name in names:
            shutil.copy(src / name, folder / name)
    out = tmp_path / "o"
    run_dump(plan_dump(DumpOptions(model="lenet", inputs=[str(a)], out=str(out), png=False,
                                   workers=0)))
    run_occlude(OccludeOptions(model="lenet", inputs=[str(b)], out=str(out), patch=10,
                               stride=9, workers=0))
    build_report(out)
    linked = {r for r in _refs(out / "report" / "index.html") if r.startswith("images/")}
    pages = {f"images/{p.name}" for p in (out / "report" / "images").glob("*.html")}
    assert len(pages) == 3 and linked == pages


def test_a_run_that_adds_to_out_removes_the_report_built_before(tmp_path):
    """More images of the same run, or a part that was not there: the old report would not show
    them, so it goes; a run with nothing to do keeps it."""
    from convmaps.jobs.occlude import run_occlude
    from convmaps.options import OccludeOptions

    src = Path(__file__).parents[1] / "convmaps" / "data" / "samples"
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(src / "0_t-shirt-top.png", inputs / "a.png")
    out = tmp_path / "o"

    def occlude() -> None:
        run_occlude(OccludeOptions(model="lenet", inputs=[str(inputs)], out=str(out), patch=14,
                                   stride=14, workers=0, png=False))

    occlude()
    build_report(out)
    occlude()  # nothing to do: the report still shows everything
    assert (out / "report" / "index.html").is_file()
    shutil.copy(src / "7_sneaker.png", inputs / "b.png")
    occlude()  # one more image
    assert not (out / "report").exists()
    build_report(out)
    run_dump(plan_dump(DumpOptions(model="lenet", inputs=[str(inputs)], out=str(out), png=False,
                                   workers=0)))  # a new part
    assert not (out / "report").exists()
