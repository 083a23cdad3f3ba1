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
