"""Layout: the one source of truth for every name convmaps writes under an output folder.

Writing, resume, the size estimate, the manifest, `--overwrite` and the report all ask this
module which files an image gets; none of them rebuilds the list.

    >>> lay = ImageLayout(activations=("C1", "relu", "relu@1"), switches=("S2",),
    ...                   kernels=(("C1", 2),), png=True)
    >>> lay.files()  # doctest: +NORMALIZE_WHITESPACE
    ['activations.safetensors', 'kernels.safetensors', 'png/C1.kernels/0.png',
     'png/C1.kernels/1.png', 'png/C1.png', 'png/relu.png', 'png/relu@1.png',
     'switches.safetensors']
    >>> ImageLayout(taps=(("C3", 12),), png=True).filter_png("taps", "C3", 7)
    'png/C3.taps/07.png'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

__all__ = [
    "ACTIVATIONS",
    "KERNELS",
    "MANIFEST",
    "PROJECTIONS",
    "RESERVED",
    "SWITCHES",
    "TAPS",
    "TOPK",
    "INVARIANCE",
    "INVARIANCE_FILE",
    "invariance_files",
    "invariance_png",
    "is_invariance_output",
    "state_file",
    "FILTERS",
    "FILTER_WEIGHTS",
    "ImageLayout",
    "TopkLayout",
    "collision",
    "filter_png",
    "filter_png_folder",
    "filters_files",
    "is_filters_output",
    "PROJECTIONS_MANIFEST",
    "OCCLUSION",
    "OCCLUSION_MANIFEST",
    "OCCLUSION_PNG",
    "EXPLAIN_MANIFEST",
    "explain_json",
    "explain_png",
    "is_explain_output",
    "is_dump_output",
    "is_occlusion_output",
    "is_image_output",
    "is_projection_output",
    "is_shard_manifest",
    "is_temp",
    "is_topk_output",
    "projection_key",
    "projection_of_png",
    "projection_png",
    "report_copy",
    "shard_manifest",
    "temp_name",
]

MANIFEST = "manifest.json"
ACTIVATIONS = "activations.safetensors"
SWITCHES = "switches.safetensors"
KERNELS = "kernels.safetensors"
TAPS = "taps.safetensors"
PROJECTIONS = "projections.safetensors"
TOPK = "topk"  # the folder under OUT that `convmaps topk` owns
PROJECTIONS_MANIFEST = "projections.json"  # `convmaps project`'s own manifest
OCCLUSION = "occlusion.safetensors"
OCCLUSION_PNG = "png/occlusion.png"
OCCLUSION_MANIFEST = "occlusion.json"  # `convmaps occlude`'s own manifest
INVARIANCE = "invariance"  # the folder under OUT that `convmaps invariance` owns
INVARIANCE_FILE = "invariance.safetensors"
_PARTIAL = "partial"  # an aggregate folder's shard states (topk/, invariance/)
EXPLAIN_MANIFEST = "explain.json"  # `convmaps explain`'s own manifest
_EXPLAIN = "explain"  # explain/<unit>.json and png/explain/<unit>.png in an image folder
_DUMP_TENSORS = frozenset({ACTIVATIONS, SWITCHES, KERNELS, TAPS})
_PROJECTION_PNGS = "projections"  # png/projections/<mode>/<module>/<channel>.png
# Top-level names of an output folder that belong to convmaps, besides image folders.
FILTERS = "filters"  # the folder under OUT that `convmaps filters` owns
FILTER_WEIGHTS = "filters.safetensors"
RESERVED = frozenset({MANIFEST, PROJECTIONS_MANIFEST, OCCLUSION_MANIFEST, EXPLAIN_MANIFEST,
                      FILTERS, TOPK, INVARIANCE, "report"})
_SHARD = re.compile(r"(manifest|projections|occlusion|explain)\.shard-(\d+)-of-(\d+)\.json")
_TEMP = re.compile(r"\.(.+)\.(\d+)\.tmp")


def shard_manifest(index: int, count: int, name: str = MANIFEST) -> str:
    """The manifest a shard writes before the last one merges them into `name`
    (`manifest.json`, or `projections.json` for `project`)."""
    return name if count == 1 else f"{name.removesuffix('.json')}.shard-{index}-of-{count}.json"


def is_shard_manifest(name: str, of: str | None = None) -> bool:
    """Whether `name` is a shard's manifest (of the manifest `of`, when given)."""
    m = _SHARD.fullmatch(name)
    return m is not None and (of is None or f"{m[1]}.json" == of)


def temp_name(name: str, pid: int) -> str:
    """The temporary file an atomic write of `name` goes through (renamed when complete)."""
    return f".{name}.{pid}.tmp"


def is_temp(name: str) -> bool:
    return _TEMP.fullmatch(name) is not None


@dataclass(frozen=True)
class ImageLayout:
    """What one image's folder holds for a run's options.

    `activations` and `switches` are tensor keys: a module called twice per forward pass has
    `name` and `name@1`. `kernels`/`taps` pair each conv with how many of its filters get a PNG.
    """

    activations: tuple[str, ...] = ()
    switches: tuple[str, ...] = ()
    kernels: tuple[tuple[str, int], ...] = ()
    taps: tuple[tuple[str, int], ...] = ()
    png: bool = False

    def tensor_files(self) -> list[str]:
        """The safetensors files, the one that marks an image done (activations) last."""
        files = [SWITCHES] if self.switches else []
        files += [KERNELS] if self.kernels else []
        files += [TAPS] if self.taps else []
        return files + ([ACTIVATIONS] if self.activations else [])

    def activation_png(self, key: str) -> str:
        return f"png/{key}.png"

    def filter_png(self, kind: str, conv: str, filter_index: int) -> str:
        """`png/<conv>.<kind>/<filter>.png`, the filter number zero-padded to the width of
        the conv's PNG count (`07.png` of 16), so that names sort in filter order."""
        count = dict(self.kernels if kind == "kernels" else self.taps).get(conv, filter_index + 1)
        return f"{filter_png_folder(kind, conv)}/{filter_index:0{len(str(count))}d}.png"

    def png_files(self) -> list[str]:
        if not self.png:
            return []
        files = [self.activation_png(k) for k in self.activations]
        for kind, convs in (("kernels", self.kernels), ("taps", self.taps)):
            files += [self.filter_png(kind, name, o) for name, n in convs for o in range(n)]
        return files

    def files(self) -> list[str]:
        """Every file an image gets, sorted: what its manifest entry lists."""
        return sorted(self.tensor_files() + self.png_files())


def filter_png_folder(kind: str, conv: str) -> str:
    """The folder of one conv's kernel-map or tap-map PNGs in an image folder."""
    return f"png/{conv}.{kind}"


def projection_of_png(rel: str) -> str | None:
    """The projection key a PNG path of an image folder shows (`projection_png`'s inverse),
    or None for another file."""
    head, tail = f"png/{_PROJECTION_PNGS}/", ".png"
    return rel[len(head):-len(tail)] if rel.startswith(head) and rel.endswith(tail) else None


def is_dump_output(rel: str) -> bool:
    """Whether a path inside an image folder is a name `dump` writes there (or the temporary
    file of one): only such files are ever removed by a dump, whatever else is beside them."""
    parts = PurePosixPath(rel).parts
    if not parts or (len(parts) > 1 and parts[:2] == ("png", _PROJECTION_PNGS)) \
            or is_occlusion_output(rel) or is_explain_output(rel):
        return False
    if is_temp(parts[-1]):
        return True
    if len(parts) == 1:
        return parts[0] in _DUMP_TENSORS
    return parts[0] == "png" and parts[-1].endswith(".png")


def is_projection_output(rel: str) -> bool:
    """Whether a path inside an image folder is one `project` writes there."""
    parts = PurePosixPath(rel).parts
    if parts == (PROJECTIONS,) or (len(parts) == 1 and is_temp(parts[0])
                                   and parts[0].startswith(f".{PROJECTIONS}.")):
        return True
    return len(parts) > 2 and parts[:2] == ("png", _PROJECTION_PNGS) and (
        parts[-1].endswith(".png") or is_temp(parts[-1]))


def is_occlusion_output(rel: str) -> bool:
    """Whether a path inside an image folder is one `occlude` writes there (or its temporary
    file)."""
    parts = PurePosixPath(rel).parts
    if rel in (OCCLUSION, OCCLUSION_PNG):
        return True
    last = PurePosixPath(OCCLUSION_PNG if len(parts) == 2 else OCCLUSION)
    return parts[:-1] == last.parts[:-1] and is_temp(parts[-1]) \
        and parts[-1].startswith(f".{last.name}.")


def explain_json(unit: str) -> str:
    """The tree of a unit (`MODULE:C` or `MODULE:C@Y,X`, as the user gave it) in an image
    folder."""
    return f"{_EXPLAIN}/{unit}.json"


def explain_png(unit: str) -> str:
    """The figure of a unit's tree in an image folder."""
    return f"png/{_EXPLAIN}/{unit}.png"


def is_explain_output(rel: str) -> bool:
    """Whether a path inside an image folder is one `explain` writes there (or its temporary
    file)."""
    parts = PurePosixPath(rel).parts
    ends = ".png" if len(parts) == 3 else ".json"
    return parts[:-1] in ((_EXPLAIN,), ("png", _EXPLAIN)) and (
        (parts[-1].endswith(ends) and len(parts[-1]) > len(ends)) or is_temp(parts[-1]))


def is_image_output(rel: str) -> bool:
    """Whether a path inside an image folder is any convmaps output (never read as an input)."""
    return is_dump_output(rel) or is_projection_output(rel) or is_occlusion_output(rel) \
        or is_explain_output(rel)


def projection_key(mode: str, module: str, channel: int,
                   position: tuple[int, int] | None = None) -> str:
    """The key of a unit's projection in projections.safetensors: `<mode>/<module>/<channel>`,
    with `@y,x` when the unit names its position rather than the channel's strongest one."""
    at = f"@{position[0]},{position[1]}" if position is not None else ""
    return f"{mode}/{module}/{channel}{at}"


def projection_png(key: str) -> str:
    """The PNG of a projection, by its key."""
    return f"png/{_PROJECTION_PNGS}/{key}.png"


def collision(key: str, keys: set[str]) -> str | None:
    """Why image `key`'s output folder would clash with another output, or None.

    A key may not start with a reserved top-level name (`manifest.json`, `filters`, …), and no
    key may lie inside another key's folder (an input folder holding an older dump)."""
    parts = PurePosixPath(key).parts
    if parts[0] in RESERVED or is_shard_manifest(parts[0]):
        return f"its output folder {key}/ would clash with convmaps' own {parts[0]}"
    for i in range(1, len(parts)):
        outer = "/".join(parts[:i])
        if outer in keys:
            return f"it lies inside the output folder of {outer}"
    return None


@dataclass(frozen=True)
class TopkLayout:
    """What `OUT/topk/` holds for a run's options: one file per module key, its partial top-k
    while shards run, and PNG figures for the first `png_caps` channels of each module.

    >>> TopkLayout(modules=("C1",), png_caps=(2,), png=True).files()
    ['C1.safetensors', 'manifest.json', 'png/C1.png', 'png/C1/0.png', 'png/C1/1.png']
    """

    modules: tuple[str, ...] = ()
    png_caps: tuple[int, ...] = ()  # per module: how many channels get a figure
    png: bool = False
    explain: tuple[int, ...] = ()  # per module: channels with an explain file (`--explain`)
    partial: str = _PARTIAL  # the folder of the shards' partial top-k (a module name has no /)

    def module_file(self, key: str) -> str:
        return f"{key}.safetensors"

    def state_file(self, index: int, count: int) -> str:
        """A shard's partial top-k and checkpoint (a folder of its own: no module name clashes)."""
        return state_file(index, count)

    def channel_png(self, key: str, channel: int) -> str:
        """`png/<module>/<channel>.png`, zero-padded to the width of the module's largest
        figure number (`03.png` of 16 figures), so that names sort in channel order."""
        count = dict(zip(self.modules, self.png_caps, strict=True)).get(key, channel + 1)
        return f"png/{key}/{channel:0{len(str(max(count - 1, channel, 0)))}d}.png"

    def module_png(self, key: str) -> str:
        return f"png/{key}.png"

    def explain_file(self, key: str, channel: int) -> str:
        """`explain/<module>/<channel>.json`: the unit's k trees and its recipe (zero-padded
        as the figures are)."""
        count = dict(zip(self.modules, self.explain, strict=False)).get(key, channel + 1)
        return f"explain/{key}/{channel:0{len(str(max(count - 1, channel, 0)))}d}.json"

    def png_files(self) -> list[str]:
        if not self.png:
            return []
        files = [self.module_png(k) for k in self.modules]
        return files + [self.channel_png(k, c) for k, n in zip(self.modules, self.png_caps,
                                                               strict=True) for c in range(n)]

    def files(self) -> list[str]:
        """Every final file of a finished run, sorted (partial top-k files are gone by then)."""
        explained = [self.explain_file(k, c) for k, n in zip(self.modules, self.explain,
                                                             strict=False) for c in range(n)]
        return sorted([MANIFEST, *(self.module_file(k) for k in self.modules),
                       *self.png_files(), *explained])


def state_file(index: int, count: int) -> str:
    """A shard's partial state and checkpoint in an aggregate folder (`topk/`, `invariance/`)."""
    return f"{_PARTIAL}/shard-{index}-of-{count}.safetensors"


def invariance_png(transform: str) -> str:
    """The line plots of one transform, under `OUT/invariance/`."""
    return f"png/{transform}.png"


def invariance_files(transforms: tuple[str, ...], png: bool) -> list[str]:
    """Every final file of a finished `invariance` run under `OUT/invariance/`, sorted.

    >>> invariance_files(("translate", "rotate"), png=True)
    ['invariance.safetensors', 'manifest.json', 'png/rotate.png', 'png/translate.png']
    """
    return sorted([INVARIANCE_FILE, MANIFEST, *(invariance_png(t) for t in transforms if png)])


def is_invariance_output(rel: str) -> bool:
    """Whether a path inside `OUT/invariance/` is a name `invariance` writes there: only such
    files are removed by `--overwrite`."""
    parts = PurePosixPath(rel).parts
    if not parts or is_temp(parts[-1]):
        return bool(parts)
    if len(parts) == 1:
        return parts[0] in (MANIFEST, INVARIANCE_FILE) or is_shard_manifest(parts[0])
    return len(parts) == 2 and parts[0] in ("png", _PARTIAL) and \
        parts[1].endswith(".png" if parts[0] == "png" else ".safetensors")


def report_copy(rel: str) -> str:
    """Where a standalone report keeps its copy of `OUT/<rel>`, relative to `OUT/report/`: the
    same path under `files/`, so that no two copies collide.

    >>> report_copy("cat.jpg/png/C1.png")
    'files/cat.jpg/png/C1.png'
    """
    return f"files/{rel}"


def filter_png(conv: str) -> str:
    """The grid of one conv's filters, under `OUT/filters/`."""
    return f"png/{conv}.png"


def filters_files(convs: tuple[str, ...], png: bool) -> list[str]:
    """Every file a `filters` run writes under `OUT/filters/`, sorted.

    >>> filters_files(("C1", "C3"), png=True)
    ['filters.safetensors', 'manifest.json', 'png/C1.png', 'png/C3.png']
    """
    return sorted([FILTER_WEIGHTS, MANIFEST, *(filter_png(c) for c in convs if png)])


def is_filters_output(rel: str) -> bool:
    """Whether a path inside `OUT/filters/` is a name `filters` writes there."""
    parts = PurePosixPath(rel).parts
    if not parts or is_temp(parts[-1]):
        return bool(parts)
    if len(parts) == 1:
        return parts[0] in (MANIFEST, FILTER_WEIGHTS)
    return len(parts) == 2 and parts[0] == "png" and parts[1].endswith(".png")


def is_topk_output(rel: str) -> bool:
    """Whether a path inside `OUT/topk/` is a name convmaps writes there: only such files are
    removed by `--overwrite`."""
    parts = PurePosixPath(rel).parts
    if not parts:
        return False
    name = parts[-1]
    if is_temp(name):
        return True
    if len(parts) == 1:
        return name == MANIFEST or is_shard_manifest(name) or name.endswith(".safetensors")
    if parts[0] == TopkLayout.partial:
        return len(parts) == 2 and name.endswith(".safetensors")
    if parts[0] == "explain":
        return len(parts) == 3 and name.endswith(".json")
    return parts[0] == "png" and name.endswith(".png")
