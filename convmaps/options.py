"""Options: every command's settings as plain dataclasses and enums, free of torch.

The CLI, config files and Python callers all fill these; importing this module stays cheap so
that `convmaps --help` never waits for torch.

    >>> DumpOptions(model="alexnet", layers="0,3").dtype
    <DType.float32: 'float32'>
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["DType", "DumpOptions", "ExplainOptions", "FilterOptions", "InvarianceOptions",
           "Mode", "OccludeOptions", "PngScale", "ProjectOptions", "ReportOptions",
           "TopkOptions"]


class DType(StrEnum):
    """Storage dtype of float outputs; computation is always float32."""

    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"

    @property
    def torch(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.value)
        return dtype


class PngScale(StrEnum):
    """Which values share one colour range in a PNG grid."""

    layer = "layer"  # one range for every tile: tiles compare with each other
    channel = "channel"  # each tile its own range: every channel shows its own detail


class Mode(StrEnum):
    """How a projection passes a ReLU on its way down to the pixels."""

    deconvnet = "deconvnet"  # Zeiler & Fergus: rectify the signal itself
    guided = "guided"  # Springenberg et al.: rectify, and mask by the forward input's sign
    gradient = "gradient"  # mask by the forward input's sign: exactly autograd's gradient


@dataclass
class DumpOptions:
    """Every `dump` option; `convmaps run` fills the same fields from a TOML file."""

    model: str = "lenet"
    inputs: list[str] = field(default_factory=list)
    layers: str | None = None
    kernels: str | None = None
    taps: str | None = None
    switches: bool = True
    png: bool = True
    out: str = "convmaps_out"
    weights: str | None = None
    arch: str | None = None
    batch_size: int = 8
    workers: int | None = None  # None: runtime.default_workers()
    threads: int | None = None  # None: runtime.default_threads()
    device: str = "cpu"
    dtype: DType = DType.float32
    max_bytes: str = "8GB"
    resume: bool = True
    strict: bool = False
    png_cap: int = 16
    png_scale: PngScale = PngScale.layer
    chunk_bytes: str = "16MB"  # below glibc's mmap threshold: chunk memory is reused
    shard: str | None = None  # "I/N": this process does shard I (0-based) of N
    config: str | None = None  # the TOML file the options came from, if any


@dataclass
class FilterOptions:
    """Every `filters` option; a config with `command = "filters"` fills the same fields."""

    model: str = "lenet"
    layers: str | None = None
    out: str = "convmaps_out"
    weights: str | None = None
    arch: str | None = None
    png: bool = True
    png_cap: int = 64
    resume: bool = True  # False (--overwrite): filters of other options in OUT are replaced
    config: str | None = None  # the TOML file the options came from, if any


@dataclass
class ProjectOptions:
    """Every `project` option."""

    model: str = "lenet"
    inputs: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    mode: Mode = Mode.deconvnet
    out: str = "convmaps_out"
    weights: str | None = None
    arch: str | None = None
    device: str = "cpu"
    png: bool = True
    # images per batch, and units projected together (memory: about this many backward passes)
    batch_size: int = 32
    workers: int | None = None  # None: runtime.default_workers()
    threads: int | None = None  # None: runtime.default_threads()
    shard: str | None = None  # "I/N": this process does shard I (0-based) of N
    resume: bool = True  # False (--overwrite): another model's projections in OUT are replaced


@dataclass
class ReportOptions:
    """`report` as a step of a config (`convmaps run`)."""

    out: str = "convmaps_out"
    standalone: bool = False


@dataclass
class OccludeOptions:
    """Every `occlude` option (Zeiler & Fergus, Fig. 7): a grey square slid over each input."""

    model: str = "lenet"
    inputs: list[str] = field(default_factory=list)
    patch: int = 16  # the square's side, in input pixels
    stride: int = 4
    fill: float = 0.0  # in normalised units: 0 is the data set's mean colour
    target: str = "top"  # "top" (each image's unoccluded top class) or a class index
    units: list[str] = field(default_factory=list)  # MODULE:C; none: the strongest channel
    out: str = "convmaps_out"
    weights: str | None = None
    arch: str | None = None
    device: str = "cpu"
    png: bool = True
    batch_size: int = 64  # images per batch, and patch positions per step
    workers: int | None = None  # None: runtime.default_workers()
    threads: int | None = None  # None: runtime.default_threads()
    shard: str | None = None  # "I/N": this process does shard I (0-based) of N
    resume: bool = True  # False (--overwrite): occlusion maps of other options are replaced


@dataclass
class ExplainOptions:
    """Every `explain` option: units as exact sums, followed down their largest terms."""

    model: str = "lenet"
    inputs: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)  # MODULE:C or MODULE:C@Y,X (at least one)
    depth: int = 3  # conv and linear levels (and the pixels) on a path
    top: int = 3  # a conv or linear node's children: its largest terms
    out: str = "convmaps_out"
    weights: str | None = None
    arch: str | None = None
    device: str = "cpu"
    png: bool = True
    batch_size: int = 16  # images per batch
    workers: int | None = None  # None: runtime.default_workers()
    threads: int | None = None  # None: runtime.default_threads()
    shard: str | None = None  # "I/N": this process does shard I (0-based) of N
    resume: bool = True  # False (--overwrite): trees of other options are replaced


@dataclass
class TopkOptions:
    """Every `topk` option: per module and channel, the k images with the largest maximum."""

    model: str = "lenet"
    inputs: list[str] = field(default_factory=list)
    layers: str | None = None  # None: every conv layer
    k: int = 9
    project: str = "deconvnet"  # a projection mode (deconvnet, guided, gradient) or "none"
    out: str = "convmaps_out"
    weights: str | None = None
    arch: str | None = None
    batch_size: int = 8
    workers: int | None = None  # None: runtime.default_workers()
    threads: int | None = None  # None: runtime.default_threads()
    device: str = "cpu"
    shard: str | None = None  # "I/N": this process does shard I (0-based) of N
    resume: bool = True
    png: bool = True
    png_cap: int = 16  # channels per module that get a figure
    dtype: DType = DType.float32  # storage dtype of the projections
    # each entry as an exact sum (depth 2, top 3) and the lower units the k trees share
    explain: bool = False
    max_bytes: str = "8GB"
    checkpoint_seconds: float = 60.0  # how often the partial top-k is saved while running


@dataclass
class InvarianceOptions:
    """Every `invariance` option (Zeiler & Fergus, Fig. 5): how module outputs and the top
    class's probability change as each input is translated, scaled or rotated."""

    model: str = "lenet"
    inputs: list[str] = field(default_factory=list)
    transforms: list[str] = field(default_factory=lambda: ["translate", "scale", "rotate"])
    steps: int = 9  # amounts per transform, spread over the paper's range
    layers: str | None = None  # None: every conv and linear layer
    out: str = "convmaps_out"
    weights: str | None = None
    arch: str | None = None
    batch_size: int = 8  # images per batch (each runs with its transformed copies)
    workers: int | None = None  # None: runtime.default_workers()
    threads: int | None = None  # None: runtime.default_threads()
    device: str = "cpu"
    shard: str | None = None  # "I/N": this process does shard I (0-based) of N
    resume: bool = True  # False (--overwrite): OUT/invariance of other options is replaced
    png: bool = True
    checkpoint_seconds: float = 60.0  # how often a shard's rows are saved while running
