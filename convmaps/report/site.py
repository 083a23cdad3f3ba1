"""Report: a static HTML site of an output folder (`convmaps report OUT`).

`OUT/report/index.html` and its pages open from disk (`file://`) in any browser, with no
server, network, CDN or web font: pictures are referenced where convmaps wrote them (never
inlined) or, `standalone`, hard-linked (copied where the file system links nothing) into
`report/files/` so that `report/` stands alone; styles are one CSS file, and the little data a
script needs sits in the page itself (browsers block `fetch` from `file://`). Every page reads
without JavaScript; the script only names the channel under the mouse and sorts tables.

It covers whatever OUT holds: a dump (`manifest.json`), projections (`projections.json`),
occlusion maps (`occlusion.json`), explain trees (`explain.json`, a page per tree), `filters/`,
`topk/` and `invariance/`. It reads only files on disk and never runs the model; the pictures of
the inputs are drawn from the source images with the run's own preprocessing, so receptive-field
boxes land where the network looked.

    >>> import tempfile
    >>> build_report(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    convmaps.errors.ConvmapsError: ... holds nothing to report (no manifest.json, ...)
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import shutil
import stat
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from convmaps import __version__
from convmaps.errors import ConvmapsError
from convmaps.io import layout
from convmaps.io import manifest as manifests
from convmaps.io.store import (
    check_regular,
    link_or_copy,
    open_regular,
    read_metadata,
    symlink_under,
    write_bytes,
)

__all__ = ["REPORT", "build_report", "remove_report"]

REPORT = "report"
Phase = Callable[[str, int, int], None]  # on_phase(phase, done, total), as the jobs report
_PICTURE = re.compile(r"[0-9a-f]{32}\.png")  # inputs/<sha256[:32]>.png
_MARKER = ".convmaps-report"  # only a folder holding it is ever replaced
_MADE_FROM = "made by convmaps report from "  # the marker's text, before what it was built from
_LOCK = ".convmaps-report.lock"  # in OUT: one build at a time swaps report/ into place


@dataclass
class _Site:
    """What OUT holds, read once."""

    out: Path
    dump: dict[str, Any] | None
    projections: dict[str, Any] | None
    occlusion: dict[str, Any] | None
    explain: dict[str, Any] | None
    filters: list[str]  # conv names with a filters PNG
    filters_meta: dict[str, str]
    topk: dict[str, Any] | None
    units: dict[str, dict[str, Any]] = field(default_factory=dict)  # topk module -> tensors
    invariance: dict[str, Any] | None = None  # OUT/invariance/manifest.json of a finished run
    pictures: dict[str, str] = field(default_factory=dict)  # sha256 -> report-relative PNG
    pages: dict[str, str] = field(default_factory=dict)  # image key -> its page
    # parts of OUT are joined by what an image is (its sha256), never by its name alone
    by_sha: dict[str, str] = field(default_factory=dict)  # sha256 -> its image page
    projected: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    occluded: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    figure7: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (page, entry)
    # (image key, tree file) -> the tree's page
    trees: dict[tuple[str, str], str] = field(default_factory=dict)
    copies: _Copies | None = None  # a standalone report's copies of the pictures of OUT

    @property
    def header(self) -> dict[str, Any]:
        return self.dump or self.projections or self.occlusion or self.explain or self.topk or \
            self.invariance or {
            "model": self.filters_meta.get(
            "model", "?"), "weights": self.filters_meta.get("weights", "?")}


@dataclass
class _Copies:
    """The pictures of OUT a standalone report shows, hard-linked (copied where the file system
    links nothing) to `report/files/<their path in OUT>`: the report then needs nothing else."""

    out: Path
    root: Path  # the report being built
    link: bool = True  # until the file system refuses a link
    made: dict[str, str | None] = field(default_factory=dict)  # OUT-relative path -> why not

    def add(self, rel: str) -> str | None:
        """Copy `OUT/rel` once; None, or why it was not (missing, a symlink, a FIFO, …)."""
        if rel not in self.made:
            try:
                self.link = link_or_copy(self.out, rel, self.root / layout.report_copy(rel),
                                         self.link)
                self.made[rel] = None
            except OSError as e:
                self.made[rel] = f"{rel} not copied: {e.strerror or e}"
        return self.made[rel]

    @property
    def notes(self) -> list[str]:
        return [why for why in self.made.values() if why]


# --- reading ---------------------------------------------------------------------------------


def _read_site(out: Path) -> _Site:
    dump = manifests.read(out)
    projections = manifests.read(out, layout.PROJECTIONS_MANIFEST)
    occlusion = manifests.read(out, layout.OCCLUSION_MANIFEST)
    explain = manifests.read(out, layout.EXPLAIN_MANIFEST)
    folder = out / layout.FILTERS
    listed = manifests.read(folder)  # only what the last filters run wrote: no stale grids
    filters = [m for m in (listed or {}).get("modules", [])
               if (folder / layout.filter_png(m)).is_file()]
    filters_meta = read_metadata(folder / layout.FILTER_WEIGHTS) or {}
    topk = manifests.read(out / layout.TOPK) if (out / layout.TOPK).is_dir() else None
    folder = out / layout.INVARIANCE
    invariance = manifests.read(folder) if folder.is_dir() else None
    if invariance is not None and not invariance.get("finished"):
        invariance = None  # shards still running: no curves yet
    if not (dump or projections or occlusion or explain or filters or topk or invariance):
        raise ConvmapsError(f"{out} holds nothing to report (no manifest.json, projections.json,"
                            " occlusion.json, explain.json, filters/, topk/ or invariance/)")
    site = _Site(out, dump, projections, occlusion, explain, filters, filters_meta, topk,
                 invariance=invariance)
    if topk is not None:
        site.units = _read_topk(out / layout.TOPK, topk)
    return site


def _read_topk(folder: Path, m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each module's top-k (values, images, positions, boxes) as lists, small by design."""
    import torch
    from safetensors import SafetensorError, safe_open

    units = {}
    for name in m.get("modules", []):
        path = folder / layout.TopkLayout().module_file(name)
        if not path.is_file():
            continue
        try:
            check_regular(path)  # is_file() follows a symlink, maybe to a FIFO
            with safe_open(str(path), "pt") as f:
                got = {k: f.get_tensor(k) for k in ("values", "images", "positions", "boxes")
                       if k in set(f.keys())}  # noqa: SIM118
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise ConvmapsError(f"{path} is not a readable safetensors file: {e}") from e
        # (C, k) values and images, (C, k, 2) positions, (C, k, 4) boxes, or the file is not ours
        ck = tuple(got["values"].shape) if "values" in got else None
        want = {"values": (), "images": (), "positions": (2,), "boxes": (4,)}
        if ck is None or len(ck) != 2 or "images" not in got or any(
                tuple(t.shape) != (*ck, *want[k]) for k, t in got.items()):
            raise ConvmapsError(f"{path} is not a convmaps top-k file (tensor shapes)")
        # float values, integer indices and pixels, images that are entries of the manifest
        if not got["values"].dtype.is_floating_point or any(
                t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool
                for k, t in got.items() if k != "values"):
            raise ConvmapsError(f"{path} is not a convmaps top-k file (tensor dtypes)")
        images = got["images"].to(torch.int64)  # uint64 past int64's range wraps negative
        if images.numel() and not 0 <= images.min() <= images.max() < len(m["inputs"]):
            raise ConvmapsError(f"{path} is not a convmaps top-k file (image indices out of "
                                f"range for {len(m['inputs'])} image(s))")
        units[name] = {k: t.to(torch.float64 if k == "values" else torch.int64).tolist()
                       for k, t in got.items()}
        units[name]["meta"] = meta
    return units


def _png_text(path: Path) -> dict[str, str]:
    """A PNG's text chunks, read from its head only (they come before the pixels)."""
    text: dict[str, str] = {}
    try:
        with open_regular(path) as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return text
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return text
                size, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND") or size > 1 << 20:
                    return text
                data = f.read(size)
                f.seek(4, os.SEEK_CUR)
                if kind == b"tEXt" and b"\0" in data:
                    k, v = data.split(b"\0", 1)
                    text[k.decode("latin-1")] = v.decode("latin-1")
                elif kind == b"iTXt" and data.count(b"\0") >= 4:
                    k, rest = data.split(b"\0", 1)
                    text[k.decode("latin-1")] = rest[2:].split(b"\0", 2)[2].decode(errors="replace")
    except OSError:
        return text


# --- pictures of the inputs ------------------------------------------------------------------


def _draw_inputs(site: _Site, root: Path, entries: Iterable[dict[str, Any]],
                 on_phase: Phase | None = None) -> None:
    """The preprocessed input of every entry, de-normalised, as `inputs/<sha256>.png` (kept
    between builds: an image's picture changes only with its bytes); `on_phase("pictures",
    done, total)` as they are drawn."""
    todo = {}
    for e in entries:
        sha = e.get("sha256")
        if e.get("status") == "ok" and sha:
            site.pictures[sha] = f"inputs/{sha[:32]}.png"
            if not (root / site.pictures[sha]).is_file():
                todo[sha] = e["source"]
    if not todo:
        return
    from convmaps import render
    from convmaps.core.models import normalisation, preset
    from convmaps.io.images import decode, sha256_file

    try:
        preprocess = preset(str(site.header.get("model")))
    except (ConvmapsError, ValueError, KeyError):  # a model this torchvision does not know
        site.pictures.clear()
        return
    mean, std = normalisation(preprocess)
    if on_phase:
        on_phase("pictures", 0, len(todo))

    def draw(item: tuple[str, str]) -> None:
        sha, source = item
        try:
            if sha256_file(source) != sha:  # the file changed since the run: no picture
                site.pictures.pop(sha, None)
                return
            x = preprocess(decode(source))
        except (ConvmapsError, OSError):
            site.pictures.pop(sha, None)
            return
        img = render.picture(x, mean, std)
        from PIL import Image

        pil = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy())
        write_bytes(root / site.pictures[sha], render.png_bytes(pil), sync=False)

    # One at a time, in this thread: decoding sets process-wide warning filters (decompression
    # bombs are errors), which threads would share and undo for each other.
    for n, item in enumerate(sorted(todo.items()), 1):
        draw(item)
        if on_phase:
            on_phase("pictures", n, len(todo))


# --- HTML ------------------------------------------------------------------------------------


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _url(*parts: str) -> str:
    """A relative URL from path parts (each may hold '/'), every part percent-escaped."""
    return "/".join(quote(p, safe="/@") for p in parts)


def _page(title: str, body: str, up: str, site: _Site) -> str:
    h = site.header
    nav = [f'<a href="{up}index.html">index</a>']
    if site.filters:
        nav.append(f'<a href="{up}filters.html">filters</a>')
    if site.topk:
        nav.append(f'<a href="{up}topk/index.html">top-k</a>')
    if site.invariance:
        nav.append(f'<a href="{up}invariance.html">invariance</a>')
    if site.figure7:
        nav.append(f'<a href="{up}occlusion.html">occlusion</a>')
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)} · convmaps</title>"
        f'<link rel="stylesheet" href="{up}style.css"></head>\n<body>'
        f'<header><b>convmaps</b> · {_e(h.get("model"))} ({_e(h.get("weights"))}) · '
        f'{" · ".join(nav)}</header>\n<main><h1>{_e(title)}</h1>\n{body}\n</main>'
        f'<footer>convmaps {_e(__version__)} · static files, open from disk</footer>'
        f'<script src="{up}report.js"></script></body></html>\n'
    )


def _table(head: list[str], rows: list[list[str]], sortable: bool = False) -> str:
    cls = ' class="sortable"' if sortable else ""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "\n".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{cls}><thead><tr>{th}</tr></thead><tbody>\n{body}\n</tbody></table>"


def _shape(s: Any) -> str:
    return "—" if not s else _e("×".join(str(v) for v in s))


def _guess(e: dict[str, Any]) -> str:
    top = e.get("top5") or []
    if not top:
        return ""
    t = top[0]
    return f"{_e(t.get('class'))} ({float(t.get('probability', 0)):.1%})"


def _index(site: _Site) -> str:
    h = site.header
    parts = [_table(["model", "weights", "input", "preprocessing"], [[
        _e(h.get("model")), _e(h.get("weights")), _shape(h.get("input_size")),
        f"<code>{_e(h.get('preprocessing', ''))}</code>"]])]
    layers = h.get("layers") or []
    if layers:
        rows = []
        for r in layers:
            fld, jump = r.get("field"), r.get("jump")
            rows.append([_e("" if r.get("index") is None else r["index"]), _e(r["name"]),
                         _e(r.get("type")), _shape(r.get("in_shape")),
                         _shape(r.get("out_shape")), _shape(fld), _shape(jump),
                         f"{int(r.get('params') or 0):,}"])
        parts.append("<h2>Layers</h2>" + _table(
            ["#", "name", "type", "input", "output", "receptive field", "jump", "params"], rows))
    if site.dump:
        rows = []
        for e in site.dump["inputs"]:
            pic = site.pictures.get(e.get("sha256") or "")
            thumb = f'<img class="thumb" src="{_url(pic)}" alt="" loading="lazy">' if pic else ""
            name = _e(e["key"])
            if e["key"] in site.pages:
                name = f'<a href="{_url(site.pages[e["key"]])}">{name}</a>'
            rows.append([thumb, name, _guess(e), _e(e["status"])])
        ok = sum(1 for e in site.dump["inputs"] if e["status"] == "ok")
        parts.append(f"<h2>Images ({ok} of {len(site.dump['inputs'])} ok)</h2>"
                     + _table(["", "image", "predicted", "status"], rows, sortable=True))
    dumped = {e["key"] for e in (site.dump or {}).get("inputs", [])}
    others = [(key, page) for key, page in site.pages.items() if key not in dumped]
    if others:  # every image page is reachable from here, dumped or not
        links = [f'<li><a href="{_url(page)}">{_e(key)}</a></li>' for key, page in others]
        more = "Other images" if site.dump else "Images"
        parts.append(f"<h2>{more} with projections, occlusion maps or explain trees</h2><ul>"
                     + "".join(links) + "</ul>")
    if site.topk:
        parts.append(f'<h2>Top-k</h2><p><a href="topk/index.html">{len(site.units)} module(s)'
                     f'</a> over {len(site.topk["inputs"])} image(s)</p>')
    if site.filters:
        parts.append(f'<h2>Filters</h2><p><a href="filters.html">{len(site.filters)} conv '
                     "layer(s)</a></p>")
    if site.invariance:
        parts.append(f'<h2>Invariance</h2><p><a href="invariance.html">'
                     f'{_e(", ".join(site.invariance.get("transforms", [])))}</a> over '
                     f'{len(site.invariance["inputs"])} image(s)</p>')
    if site.figure7:
        parts.append(f'<h2>Occlusion</h2><p><a href="occlusion.html">'
                     f'{len(site.figure7)} image(s)</a></p>')
    paper = [(f, page, what) for f, page, what, there in (
        ("Fig. 2", "topk/index.html", "top-k patches and their projections, per unit",
         site.topk), ("Fig. 5", "invariance.html", "invariance to translation, scale and "
                      "rotation", site.invariance),
        ("Fig. 7", "occlusion.html", "occlusion: where the network looks",
         site.figure7)) if there]
    if paper:
        items = "".join(f'<li><a href="{page}">{f}</a>: {what}</li>' for f, page, what in paper)
        parts.insert(1, "<h2>Zeiler &amp; Fergus (2014), figure by figure</h2><ul>" + items
                     + "</ul>")
    return _page(f"{h.get('model')} · report", "\n".join(parts), "", site)


def _figure(site: _Site, rel: str, up: str, caption: str, attrs: str = "") -> str:
    """The figure of the picture `OUT/rel` on a page `up` below report/: where convmaps wrote
    it, or, in a standalone report, its copy inside report/ (a note where none was made)."""
    src, why = _source(site, rel, up)
    if src is None:
        return f'<figure><p class="note">{_e(why)}</p><figcaption>{caption}</figcaption></figure>'
    return (f'<figure><img src="{_url(src)}" alt="{_e(caption)}" loading="lazy"{attrs}>'
            f"<figcaption>{caption}</figcaption></figure>")


def _source(site: _Site, rel: str, up: str) -> tuple[str | None, str | None]:
    """Where a page `up` below report/ finds `OUT/rel`: beside the report, or in a standalone
    report its copy inside report/; (None, why) where no copy could be made."""
    if site.copies is None:
        return f"{up}../{rel}", None
    if (why := site.copies.add(rel)) is None:
        return f"{up}{layout.report_copy(rel)}", None
    return None, why


def _hover(path: Path, shape: list[int] | None, png_scale: str) -> str:
    """Attributes that let the script name the channel under the mouse, and the range."""
    from convmaps.render import grid_geometry

    text = _png_text(path)
    attrs = f' data-range="{_e(text.get("convmaps-range", ""))}"'
    geom = grid_geometry(tuple(shape), png_scale) if shape else None
    if geom:
        attrs += f' data-grid="{_e(json.dumps(geom))}"'
    return attrs


def _image_page(site: _Site, e: dict[str, Any], units: dict[str, dict[int, int]]) -> str:
    """An image: its picture and predictions, its maps, its projections, then the top-k units
    it is among the k images of (`units`: module -> unit -> its best rank there, from 0)."""
    key, up = e["key"], "../"
    folder = site.out / key
    parts = []
    pic = site.pictures.get(e.get("sha256") or "")
    head = f'<img class="input" src="{up}{_url(pic)}" alt="input">' if pic else ""
    top = e.get("top5") or []
    guesses = _table(["class", "probability"],
                     [[_e(t.get("class")), f"{float(t.get('probability', 0)):.2%}"] for t in top]
                     ) if top else ""
    parts.append(f'<div class="row">{head}<div><p>source <code>{_e(e["source"])}</code><br>'
                 f'sha256 <code>{_e(e.get("sha256"))}</code></p>{guesses}</div></div>')
    files = set(e.get("files", []))
    if site.dump and e in site.dump["inputs"]:
        shapes = {r["name"]: r.get("out_shape") for r in site.dump.get("layers", [])}
        scale = str(site.dump.get("options", {}).get("png_scale", "layer"))
        scale = scale if scale in ("layer", "channel") else "layer"  # as the dump drew them
        figs = []
        for k in site.dump.get("selected", {}).get("activations", []):
            rel = layout.ImageLayout().activation_png(k)
            if rel in files:
                shape = shapes.get(k.split("@")[0])
                figs.append(_figure(site, f"{key}/{rel}", up, f"{_e(k)} · {_shape(shape)}",
                                    _hover(folder / rel, shape, scale)))
        if figs:
            parts.append('<h2>Feature maps</h2><div class="grid">' + "".join(figs) + "</div>")
        for kind in ("kernels", "taps"):
            for conv in site.dump.get("selected", {}).get(kind, []):
                prefix = layout.filter_png_folder(kind, conv) + "/"
                pngs = sorted(f for f in files if f.startswith(prefix))
                if pngs:
                    figs = [_figure(site, f"{key}/{f}", up, f"{_e(conv)} filter {_e(Path(f).stem)}")
                            for f in pngs]
                    parts.append(f"<details><summary>{_e(kind[:-1])} maps of {_e(conv)} "
                                 f"({len(pngs)} filter(s))</summary><div class=\"grid\">"
                                 + "".join(figs) + "</div></details>")
    proj = _projection_entry(site, e)
    if proj:
        meta = read_metadata(folder / layout.PROJECTIONS) or {}
        figs = []
        for f in sorted(proj.get("files", [])):
            if (k := layout.projection_of_png(f)) is not None:
                cap = (f"{_e(k)} · value {_e(meta.get(k + '.value', '?'))} · at "
                       f"{_e(meta.get(k + '.position') or '—')}")
                figs.append(_figure(site, f"{key}/{f}", up, cap, ' class="wide"'))
        if figs:
            parts.append("<h2>Projections to pixel space</h2>" + "".join(figs))
    occ = site.occluded.get((key, e.get("sha256") or ""))
    if occ and layout.OCCLUSION_PNG in occ.get("files", []):
        parts.append("<h2>Occlusion (where the network looks)</h2>"
                     + _figure(site, f"{key}/{layout.OCCLUSION_PNG}", up,
                               _occlusion_caption(folder), ' class="wide"')
                     + _occluded_units(site, folder, up))
    parts.append(_tree_links([(PurePosixPath(f).stem, page) for (k, f), page
                              in site.trees.items() if k == key], up))
    if units:
        parts.append(_units_driven(units, up))
    return _page(key, "\n".join(parts), up, site)


def _tree_links(trees: list[tuple[str, str]], up: str) -> str:
    """Links to explain-tree pages, (text, page) each; nothing when there are none."""
    if not trees:
        return ""
    links = [f'<li><a href="{up}{_url(page)}">{_e(text)}</a></li>' for text, page in trees]
    return "<h2>Explained (exact sums)</h2><ul>" + "".join(links) + "</ul>"


def _tree_items(node: dict[str, Any], site: _Site | None = None, up: str = "") -> str:
    """A node of an explain tree and its children as nested list items; a node whose unit a
    top-k run ranked links to that unit's page."""
    at = node.get("position")
    name = f"{node.get('module')}:{node.get('channel')}" + (f"@{at[0]},{at[1]}" if at else "")
    module, channel = node.get("module"), node.get("channel")
    ranked = site is not None and isinstance(module, str) and module in site.units \
        and isinstance(channel, int) and 0 <= channel < len(site.units[module].get("values", []))
    terms = node.get("contributions", [])
    shown = ", ".join(f"{_e(t.get('channel'))}: {float(t.get('value', 0)):.4g}"
                      for t in terms[:6])
    more = len(terms) - 6
    rest = float(node.get("rest", 0))
    tail = (f" … (+{more} listed)" if more > 0 else "") + (f", rest {rest:.4g}" if rest else "")
    label = f"<b>{_e(name)}</b>"
    if ranked:
        link = _url(layout.TOPK, str(module), str(channel))
        label = f'<a href="{up}{link}.html" title="its top-k">{label}</a>'
    line = (f"{label} = {float(node.get('value', 0)):.4g} <small>"
            f"{_e(node.get('kind'))}</small>: bias {float(node.get('bias', 0)):.4g}; "
            f"terms {shown}{tail}")
    children = node.get("children", [])
    inner = "<ul>" + "".join(_tree_items(c, site, up) for c in children) + "</ul>" \
        if children else ""
    return f"<li>{line}{inner}</li>"


def _tree_page(site: _Site, e: dict[str, Any], rel: str) -> str:
    """One explain tree: its figure and the tree as nested lists, linked to its image."""
    up = "../"
    key = e["key"]
    try:
        with open_regular(site.out / key / rel) as f:
            record = json.loads(f.read().decode())
        tree = record["tree"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return _page(f"{key} · {PurePosixPath(rel).stem}", f'<p class="note">the tree file '
                     f"could not be read: {_e(err)}</p>", up, site)
    unit = str(record.get("unit", PurePosixPath(rel).stem))
    png = layout.explain_png(unit)
    parts = [f'<p>image <a href="{up}{_url(site.pages[key])}">{_e(key)}</a> · depth '
             f'{_e(record.get("depth"))}, top {_e(record.get("top"))} · each node: value = '
             "bias + the sum of its terms (a conv's: its input channels' kernel-map values "
             "there); children: the largest terms</p>"]
    if png in e.get("files", []):
        parts.append(_figure(site, f"{key}/{png}", up, f"{_e(unit)} on {_e(key)}",
                             ' class="wide"'))
    parts.append(f'<ul class="tree">{_tree_items(tree, site, up)}</ul>')
    return _page(f"{key} · {unit}", "\n".join(parts), up, site)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _units_driven(units: dict[str, dict[int, int]], up: str) -> str:
    """The top-k units an image drives, folded per module (a topk run over AlexNet names
    some thousand of them for one image): each module's count, then its units' links."""
    total = sum(len(r) for r in units.values())
    folds = []
    for name, ranks in units.items():
        links = ", ".join(f'<a href="{up}{_url(layout.TOPK, name, str(c))}.html" title="this '
                          f'image is #{r + 1} of the unit\'s top-k">{c}</a>'
                          for c, r in sorted(ranks.items()))
        folds.append(f"<details><summary>{_e(name)} · {_plural(len(ranks), 'unit')}</summary>"
                     f"<p>{links}</p></details>")
    return (f'<h2 id="topk">Top-k units this image drives</h2><p>It is among the top-k images '
            f"of {_plural(total, 'unit')} in {_plural(len(units), 'module')}.</p>"
            + "".join(folds))


def _projection_entry(site: _Site, e: dict[str, Any]) -> dict[str, Any] | None:
    """The projections of the image of entry `e`: same folder, same bytes."""
    return site.projected.get((e["key"], e.get("sha256") or ""))


def _occlusion_caption(folder: Path) -> str:
    meta = read_metadata(folder / layout.OCCLUSION) or {}
    return (f"a {_e(meta.get('patch', '?'))} px grey square every "
            f"{_e(meta.get('stride', '?'))} px · target {_e(meta.get('target_name', '?'))} · "
            f"unit {_e(meta.get('units') or '—')}")


def _occluded_units(site: _Site, folder: Path, up: str) -> str:
    """The top-k figures of the units an occlusion map follows, where a topk run in OUT ranked
    them: what the unit responds to, beside where in this image it does."""
    meta = read_metadata(folder / layout.OCCLUSION) or {}
    figs = []
    for unit in str(meta.get("units") or "").split(","):
        name, _, channel = unit.rpartition(":")
        u = site.units.get(name)
        if u is None or not channel.isdigit() or int(channel) >= len(u.get("values", [])):
            continue
        fig = _topk_layout(site).channel_png(name, int(channel))
        if (site.out / layout.TOPK / fig).is_file():
            figs.append(f'<p><a href="{up}topk/{_url(name)}/{channel}.html">unit {_e(unit)}'
                        "</a>: what it responds to most in the top-k run</p>" + _figure(
                            site, f"{layout.TOPK}/{fig}", up, f"{_e(unit)}: top-k patches"))
    return "".join(figs)


def _occluded_pictures(site: _Site) -> list[tuple[str, dict[str, Any]]]:
    """(image page, occlusion entry) of each image whose occlusion figure is in OUT."""
    return [(site.pages[k], e) for (k, _), e in site.occluded.items()
            if k in site.pages and layout.OCCLUSION_PNG in e.get("files", [])]


def _occlusion_page(site: _Site) -> str:
    """Every image's occlusion figure on one page (Zeiler & Fergus, Fig. 7)."""
    m = site.occlusion
    assert m is not None
    figs = [f'<h2><a href="{_url(page)}">{_e(e["key"])}</a></h2>'
            + _figure(site, f"{e['key']}/{layout.OCCLUSION_PNG}", "",
                      _occlusion_caption(site.out / e["key"]), ' class="wide"')
            + _occluded_units(site, site.out / e["key"], "")
            for page, e in site.figure7]
    intro = (f"<p>A grey square slid over each of {len(figs)} image(s): at each position the "
             "probability of the target class, the most probable class, and a unit's "
             "activity summed over its map (Zeiler &amp; Fergus, Fig. 7). The maps: "
             f"{_e(m.get('method', '?'))}.</p>")
    return _page("Occlusion", intro + "".join(figs), "", site)


def _filters_page(site: _Site) -> str:
    figs = [_figure(site, f"{layout.FILTERS}/{layout.filter_png(name)}", "", _e(name))
            for name in site.filters]
    meta = site.filters_meta
    intro = f"<p>{len(site.filters)} conv layer(s) of {_e(meta.get('model', '?'))} " \
            f"({_e(meta.get('weights', '?'))}).</p>"
    return _page("Filters", intro + '<div class="grid">' + "".join(figs) + "</div>", "", site)


def _invariance_page(site: _Site) -> str:
    """The invariance curves (Zeiler & Fergus, Fig. 5), one plot per transform."""
    m = site.invariance
    assert m is not None
    folder = site.out / layout.INVARIANCE
    figs = [_figure(site, f"{layout.INVARIANCE}/{layout.invariance_png(t)}", "", _e(t))
            for t in m.get("transforms", []) if (folder / layout.invariance_png(t)).is_file()]
    ok = sum(1 for e in m["inputs"] if e["status"] == "ok")
    intro = (f"<p>Each of {ok} image(s) translated, scaled and rotated: how far the output of "
             f"each of {len(m.get('modules', []))} module(s) moves from the original's (divided "
             "by that distance at the largest amount, averaged over the images), and the "
             "probability of the original top class. The numbers are in "
             f"<code>{_e(layout.INVARIANCE)}/{_e(layout.INVARIANCE_FILE)}</code>.</p>")
    return _page("Invariance", intro + "".join(figs), "", site)


# --- top-k -----------------------------------------------------------------------------------


def _topk_index(site: _Site) -> str:
    assert site.topk is not None
    rows = []
    for name, u in site.units.items():
        values = u.get("values") or []
        rows.append([f'<a href="{_url(name)}.html">{_e(name)}</a>', str(len(values)),
                     str(len(values[0]) if values else 0)])
    body = (f"<p>The k images (and patches) that drive each unit most, over "
            f"{len(site.topk['inputs'])} image(s).</p>" + _table(["module", "units", "k"], rows))
    return _page("Top-k", body, "../", site)


def _topk_module(site: _Site, name: str) -> str:
    u = site.units[name]
    values = u.get("values") or []
    grid = _topk_layout(site).module_png(name)
    parts = []
    if (site.out / layout.TOPK / grid).is_file():
        parts.append(_figure(site, f"{layout.TOPK}/{grid}", "../",
                             f"{_e(name)}: each unit's top-1 patch"))
    rows = []
    for c, vals in enumerate(values):
        link = f'<a href="{_url(name)}/{c}.html">{c}</a>'
        mean = sum(vals) / len(vals) if vals else 0.0
        rows.append([link, f"{vals[0]:.4g}" if vals else "", f"{mean:.4g}",
                     f"{(vals[0] - vals[-1]) if vals else 0:.4g}"])
    parts.append(_table(["unit", "top-1 value", "mean of top-k", "spread"], rows,
                        sortable=True))
    return _page(f"Top-k · {name}", "\n".join(parts), "../", site)


def _topk_layout(site: _Site) -> layout.TopkLayout:
    """The names the top-k run gave its figures (their numbers are zero-padded to the count
    of figures of each module: `--png-cap` channels at most)."""
    cap = (site.topk or {}).get("options", {}).get("png_cap", 0)
    cap = cap if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0 else 0
    names = tuple(site.units)
    return layout.TopkLayout(names, tuple(min(cap, len(site.units[n].get("values", [])))
                                          for n in names), True)


def _topk_unit(site: _Site, name: str, c: int) -> str:
    assert site.topk is not None
    u = site.units[name]
    up = "../../"
    inputs = site.topk["inputs"]
    parts = []
    fig = _topk_layout(site).channel_png(name, c)
    if (site.out / layout.TOPK / fig).is_file():
        parts.append(_figure(site, f"{layout.TOPK}/{fig}", up,
                             f"{_e(name)} unit {c}: top patches and their projections",
                             ' class="wide"'))
    cells = []
    for rank, (value, index) in enumerate(zip(u["values"][c], u["images"][c], strict=True)):
        e = inputs[index] if 0 <= index < len(inputs) else {"key": "?", "source": "?"}
        box = u.get("boxes", [[]])[c][rank] if u.get("boxes") else None
        pos = u.get("positions", [[]])[c][rank] if u.get("positions") else None
        pic = site.pictures.get(e.get("sha256") or "")
        size = site.header.get("input_size") or [1, 1]
        overlay = ""
        if box and pic:
            top, left, bottom, right = (max(box[0], 0), max(box[1], 0),
                                        min(box[2], size[0]), min(box[3], size[1]))
            overlay = (f'<span class="box" style="top:{100 * top / size[0]:.3f}%;left:'
                       f'{100 * left / size[1]:.3f}%;height:{100 * (bottom - top) / size[0]:.3f}'
                       f'%;width:{100 * (right - left) / size[1]:.3f}%"></span>')
        img = f'<span class="boxed"><img src="{up}{_url(pic)}" alt="">{overlay}</span>' \
            if pic else ""
        name_link = _e(e["key"])
        if (page := site.by_sha.get(e.get("sha256") or "")) is not None:
            name_link = f'<a href="{up}{_url(page)}">{name_link}</a>'
        where = f" at {pos[0]},{pos[1]}" if pos else ""
        cells.append(f"<figure>{img}<figcaption>#{rank + 1} · {value:.4g}{_e(where)}<br>"
                     f"{name_link}</figcaption></figure>")
    parts.append('<h2>The images they came from</h2><div class="grid">' + "".join(cells)
                 + "</div>")
    parts.append(_recipe(site, name, c, up))
    unit = f"{name}:{c}"
    parts.append(_tree_links([(f"{PurePosixPath(f).stem} on {key}", page)
                              for (key, f), page in site.trees.items()
                              if PurePosixPath(f).stem.split("@")[0] == unit], up))
    nav = f'<p><a href="../{_url(name)}.html">all units of {_e(name)}</a></p>'
    return _page(f"{name} · unit {c}", nav + "\n".join(parts), up, site)


def _recipe(site: _Site, name: str, c: int, up: str) -> str:
    """A `topk --explain` unit's recipe: the lower units its k trees go through, each with in
    how many of them, linked to their own top-k pages where the run ranked them."""
    options = (site.topk or {}).get("options", {})
    if options.get("explain") is not True:
        return ""
    count = len(site.units[name].get("values", []))
    rel = layout.TopkLayout((name,), explain=(count,)).explain_file(name, c)
    try:
        with open_regular(site.out / layout.TOPK / rel) as f:
            record = json.loads(f.read().decode())
        rows = [(str(r["module"]), int(r["channel"]), int(r["trees"]))
                for r in record["recipe"]]
        k = len(record["entries"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f'<p class="note">the explain file {_e(rel)} could not be read: {_e(err)}</p>'
    items = []
    for module, channel, n in rows[:12]:
        label = f"{_e(module)}:{channel}"
        if module in site.units and 0 <= channel < len(site.units[module].get("values", [])):
            label = f'<a href="{up}{_url(layout.TOPK, module, str(channel))}.html">{label}</a>'
        items.append(f"<li>{label} · in {n} of {k} trees</li>")
    src, _ = _source(site, f"{layout.TOPK}/{rel}", up)
    trees = f' (<a href="{_url(src)}">the trees</a>)' if src else ""
    return ("<h2>Recipe</h2><p>The lower units that make this one fire in its top images: "
            "each entry written as an exact sum of the layer below (depth 2, the 3 largest "
            f"terms followed), and how many of the {k} trees go through each unit{trees}.</p>"
            "<ul>" + "".join(items) + "</ul>")


# --- building --------------------------------------------------------------------------------


def _asset(name: str) -> bytes:
    return (resources.files("convmaps") / "data" / "report" / name).read_bytes()


def build_report(out: str | Path, standalone: bool = False, on_phase: Phase | None = None,
                 on_note: Callable[[str], None] | None = None) -> Path:
    """Write `OUT/report/` for what OUT holds; returns the path of its index.html.

    The site is built in a temporary folder beside it and then moved into place, so a
    browser never sees half a report; an existing `report/` is replaced only if convmaps
    made it. Its pages show the pictures of OUT where convmaps wrote them; `standalone`
    puts every one inside `report/` instead (hard links, or copies where the file system
    makes none), so that `report/` alone can be moved, zipped and opened anywhere.
    `on_phase(phase, done, total)` reports progress (`pictures` of the inputs drawn,
    `pages` written); `on_note` gets what the reader should know (a picture not copied).

    Raises:
        ConvmapsError: OUT holds nothing convmaps wrote, or its `report/` is not convmaps'.
    """
    out = Path(out)
    if not out.is_dir():
        raise ConvmapsError(f"{out} is not a folder")
    site = _read_site(out)  # first: a folder with nothing to report gets no lock file
    with _locked(out):
        return _build(site, standalone, on_phase, on_note or (lambda _: None))


def _build(site: _Site, standalone: bool, on_phase: Phase | None,
           on_note: Callable[[str], None]) -> Path:
    out = site.out
    final = out / REPORT
    if final.exists() and not (final / _MARKER).is_file():
        raise ConvmapsError(f"{final} exists and was not made by convmaps; move it away first")
    if (link := symlink_under(final)) is not None:  # a copy through it would publish its target
        raise ConvmapsError(f"{link} is a symlink: convmaps copies nothing through one inside "
                            "OUT; remove it")
    _remove_stale(out)
    root = out / layout.temp_name(REPORT, os.getpid())
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    try:
        if (final / "inputs").is_dir():  # pictures of unchanged images are kept
            shutil.copytree(final / "inputs", root / "inputs", ignore=_not_regular)
        if standalone:
            site.copies = _Copies(out, root)
        elif _built_from(final).get("standalone"):
            on_note(f"{final} was standalone; it now shows the pictures where they are in "
                    "OUT again (--standalone keeps it whole)")
        _write_site(site, root, on_phase)
        for note in site.copies.notes if site.copies else []:
            on_note(note)
        if final.exists():
            old = out / layout.temp_name(f"{REPORT}-old", os.getpid())
            final.rename(old)
            root.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            root.rename(final)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return final / "index.html"


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold `OUT/.convmaps-report.lock` (flock, released by the kernel however the process ends): a
    second build of the same OUT waits for the first, so that they never swap report/ and
    remove each other's folders at once."""
    path = out / _LOCK
    try:
        # O_NONBLOCK and O_NOFOLLOW: a FIFO or a symlink under that name must not block or
        # lead elsewhere; the file stays (removing it would let a third build lock a new one)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise ConvmapsError(f"cannot lock {path}: {e.strerror or e}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConvmapsError(f"cannot lock {path}: not a regular file; remove it")
        try:
            import fcntl
        except ImportError:  # Windows: no flock; builds are not serialised there
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _not_regular(folder: str, names: list[str]) -> list[str]:
    """Of a folder's names, those copying must pass over: anything but a picture the report
    drew (`<32 hex digits>.png`), and anything not a regular file (a FIFO would block)."""
    return [n for n in names if not _PICTURE.fullmatch(n)
            or not stat.S_ISREG(os.lstat(os.path.join(folder, n)).st_mode)]


def remove_report(out: Path) -> None:
    """Remove `OUT/report/` when convmaps made it: a command that replaces a part of OUT
    leaves no report that shows the old part (run `convmaps report` again)."""
    final = out / REPORT
    if final.is_dir() and not final.is_symlink() and (final / _MARKER).is_file() \
            and symlink_under(final) is None:
        shutil.rmtree(final, ignore_errors=True)


def _remove_stale(out: Path) -> None:
    """Temporary report folders a killed build left behind (its process is gone)."""
    for path in out.glob(f".{REPORT}*.tmp"):
        name = path.name
        if not (layout.is_temp(name) and path.is_dir() and not path.is_symlink()):
            continue
        pid = int(name.rsplit(".", 2)[1])
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, OverflowError):  # Overflow: no process has such an id
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue


def _built_from(report: Path) -> dict[str, Any]:
    """What the report in `report` was built from, as its marker records it ({} if unknown)."""
    try:
        with open_regular(report / _MARKER) as f:
            text = f.read(1 << 20).decode()
        built = json.loads(text.removeprefix(_MADE_FROM))
    except (OSError, ValueError):
        return {}
    return built if isinstance(built, dict) else {}


def _write_site(site: _Site, root: Path, on_phase: Phase | None = None) -> None:
    parts = [m.get("inputs", []) for m in (site.dump, site.projections, site.occlusion,
                                           site.explain) if m]
    entries = [e for part in parts for e in part]
    topk_inputs = (site.topk or {}).get("inputs", [])
    winners = {i for u in site.units.values() for row in u.get("images", []) for i in row}
    entries += [e for i, e in enumerate(topk_inputs) if i in winners]
    _draw_inputs(site, root, entries, on_phase)
    pages: list[dict[str, Any]] = []  # image pages: dump images, then the others' images
    seen = set()
    for e in [e for part in parts for e in part]:
        if e["status"] == "ok" and e["key"] not in seen:
            seen.add(e["key"])
            site.pages[e["key"]] = f"images/{len(pages)}.html"
            site.by_sha.setdefault(e.get("sha256") or "", site.pages[e["key"]])
            pages.append(e)
    site.projected, site.occluded = ({(e["key"], e.get("sha256") or ""): e
                                      for e in (m or {}).get("inputs", []) if e["status"] == "ok"}
                                     for m in (site.projections, site.occlusion))
    site.figure7 = _occluded_pictures(site)
    trees = [(e, f) for e in (site.explain or {}).get("inputs", []) if e["status"] == "ok"
             and e["key"] in site.pages for f in e.get("files", []) if f.endswith(".json")]
    site.trees = {(e["key"], f): f"explain/{n}.html" for n, (e, f) in enumerate(trees)}
    # image sha256 -> module -> unit -> the image's best rank among the unit's top k
    back: dict[str, dict[str, dict[int, int]]] = {}
    for name, u in site.units.items():
        for c, row in enumerate(u.get("images", [])):
            for rank, index in enumerate(row):
                if 0 <= index < len(topk_inputs):
                    ranks = back.setdefault(topk_inputs[index].get("sha256") or "", {}
                                            ).setdefault(name, {})
                    ranks[c] = min(ranks.get(c, rank), rank)
    # every page, made and written one at a time: ~1,100 unit pages after a topk of AlexNet
    files: list[tuple[str, Callable[[], str]]] = [("index.html", partial(_index, site))]
    files += [(site.pages[e["key"]], partial(_image_page, site, e, back.get(
        e.get("sha256") or "", {}))) for e in pages]
    files += [(site.trees[e["key"], f], partial(_tree_page, site, e, f)) for e, f in trees]
    if site.filters:
        files.append(("filters.html", partial(_filters_page, site)))
    if site.invariance:
        files.append(("invariance.html", partial(_invariance_page, site)))
    if site.figure7:
        files.append(("occlusion.html", partial(_occlusion_page, site)))
    if site.topk:
        files.append(("topk/index.html", partial(_topk_index, site)))
        for name, u in site.units.items():
            files.append((f"topk/{name}.html", partial(_topk_module, site, name)))
            files += [(f"topk/{name}/{c}.html", partial(_topk_unit, site, name, c))
                      for c in range(len(u.get("values", [])))]
    if on_phase:
        on_phase("pages", 0, len(files))
    for n, (rel, page) in enumerate(files, 1):
        write_bytes(root / rel, page().encode(), sync=False)
        if on_phase:
            on_phase("pages", n, len(files))
    for asset in ("style.css", "report.js"):
        write_bytes(root / asset, _asset(asset), sync=False)
    # what the site was built from: each part's run, the inputs it joined by sha256, and
    # whether it holds its pictures
    built_from: dict[str, Any] = {part: {"run": m.get("run"), "inputs": len(m.get("inputs", []))}
                  for part, m in (("dump", site.dump), ("projections", site.projections),
                                  ("occlusion", site.occlusion), ("explain", site.explain),
                                  ("topk", site.topk), ("invariance", site.invariance)) if m}
    if site.filters:
        built_from["filters"] = {"modules": site.filters}
    built_from["standalone"] = site.copies is not None
    write_bytes(root / _MARKER, (_MADE_FROM + json.dumps(
        built_from, sort_keys=True) + "\n").encode(), sync=False)
