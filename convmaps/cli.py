"""The command line: a thin Typer shell over the Python API.

torch and torchvision are imported inside the commands, so `convmaps --help` stays fast.
"""

from __future__ import annotations

import functools
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from convmaps import __version__
from convmaps.errors import ConvmapsError
from convmaps.options import DType, DumpOptions, FilterOptions, Mode, PngScale

app = typer.Typer(
    name="convmaps",
    help="Open up convolutional networks: filters, feature maps, kernel maps and max-pool "
    "switches, written as safetensors files plus PNG grids.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
# Piped output keeps full layer names instead of an 80-column squeeze.
out_console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line when piped

F = TypeVar("F", bound=Callable[..., Any])

# Options shared by several commands, declared once.
ModelArg = Annotated[
    str,
    typer.Argument(
        help="A torchvision classifier (alexnet, vgg11 … vgg19_bn, resnet18, …), `lenet` (the "
        "bundled, trained LeNet-5), or a checkpoint file (.safetensors, .pt/.pth) with --arch.",
        show_default=False, metavar="MODEL",
    ),
]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights", "-w",
        help="DEFAULT, a torchvision weights name (IMAGENET1K_V1), `none` (seeded random "
        "init) or a state-dict file. Default: DEFAULT; the bundled checkpoint for lenet.",
    ),
]
ArchOpt = Annotated[
    str | None, typer.Option("--arch", help="Architecture of a checkpoint MODEL, e.g. vgg16.")
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
# Options of the commands that run a folder of images (every job on the engine).
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1)]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", min=0, help="DataLoader worker processes for decoding. "
                 "Default: a quarter of the CPU cores, at most 8 (none on 2 cores)."),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, help="Compute threads. Default: every usable core "
                 "but one, so a shared machine does not stall the run."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, mps …")]
ShardOpt = Annotated[
    str | None,
    typer.Option("--shard", help="I/N: do shard I (0-based) of N, e.g. a SLURM array task; "
                 "under torchrun, each process's RANK of WORLD_SIZE."),
]
MaxBytesOpt = Annotated[
    str, typer.Option("--max-bytes", help="Refuse runs that would write more (e.g. 20GB).")
]


def _fail(message: str) -> None:
    # one line whatever the message holds (a path with a newline in its name, say)
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    err_console.print(Text.assemble(("error: ", "bold red"), (message, "red")))


def reports_errors(fn: F) -> F:
    """Turn a ConvmapsError into one red line on stderr and exit code 1; anything else is a
    bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConvmapsError as e:
            _fail(str(e))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            _fail("interrupted; run the same command again to resume")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        out_console.print(f"convmaps {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """Open up convolutional networks."""


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.replace("x", ",").split(",")
    try:
        h, w = (int(parts[0]), int(parts[-1]))
    except ValueError:
        raise ConvmapsError(f"--input-size {text!r}: write H,W such as 224,224") from None
    if h < 1 or w < 1 or len(parts) > 2:
        raise ConvmapsError(f"--input-size {text!r}: write H,W such as 224,224")
    return h, w


def _shape(shape: tuple[int, ...] | None) -> str:
    return "—" if shape is None else "×".join(str(s) for s in shape)


def _pair_text(pair: tuple[int, int]) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}×{pair[1]}"


def _field_cells(field: Any) -> tuple[str, str]:
    """The layer table's field and jump cells for a convmaps.core.fields.Field (None: not known)."""
    if field is None:
        return "?", "?"
    varies = not field.affine and any(
        len({b - a for a, b in table}) > 1 for table in (field.rows, field.cols) if table
    )
    size = ("≤" if varies else "") + _pair_text(field.size)
    return size, "—" if field.dims is None else _pair_text(field.jump)


@app.command()
@reports_errors
def layers(
    model: ModelArg,
    weights: WeightsOpt = None,
    input_size: Annotated[
        str | None,
        typer.Option("--input-size", help="H,W of the input. Default: the model's preset."),
    ] = None,
    arch: ArchOpt = None,
) -> None:
    """Print the layer table: index, name, type, shapes, receptive field, jump, parameters,
    kernel-map bytes.

    Shapes and receptive fields come from a forward pass on the meta device (no compute, no
    weights needed). Field: the size in input pixels of the box one output position sees (≤ where
    positions differ); jump: input pixels between neighbouring positions.
    """
    from rich.filesize import decimal

    from convmaps.core.capture import layer_table
    from convmaps.core.fields import survey
    from convmaps.core.models import load_model

    # Shapes do not depend on weight values, so no pretrained file is needed to list layers.
    loaded = load_model(model, weights or "none", arch)
    size = _size(input_size) or loaded.input_size
    traced, rf = survey(loaded.model, (loaded.in_channels, *size))  # one meta pass
    rows = layer_table(loaded.model, (loaded.in_channels, *size), traced)
    table = Table(title=f"{loaded.arch} · input {loaded.in_channels}×{size[0]}×{size[1]}")
    for col, just in (("#", "right"), ("name", "left"), ("type", "left"), ("input", "right"),
                      ("output", "right"), ("field", "right"), ("jump", "right"),
                      ("params", "right"), ("kernel maps", "right"), ("tap maps", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        field, jump = _field_cells(rf.get(r.name))
        table.add_row(
            "" if r.index is None else str(r.index), r.name, r.type, _shape(r.in_shape),
            _shape(r.out_shape), field, jump, f"{r.params:,}",
            decimal(r.kernel_map_bytes) if r.kernel_map_bytes else "",
            decimal(r.tap_map_bytes) if r.tap_map_bytes else "",
        )
    out_console.print(table)
    total = sum(p.numel() for p in loaded.model.parameters())
    km = sum(r.kernel_map_bytes or 0 for r in rows)
    out_console.print(
        f"{total:,} parameters; kernel maps of every conv: {decimal(km)} per image (float32)"
    )


@app.command()
@reports_errors
def filters(
    model: ModelArg,
    layers: Annotated[
        str | None, typer.Option("--layers", "-l", help="Conv layers SPEC. Default: conv.")
    ] = None,
    out: OutOpt = Path("convmaps_out"),
    weights: WeightsOpt = None,
    png: Annotated[bool, typer.Option("--png/--no-png", help="Write PNG grids.")] = True,
    png_cap: Annotated[
        int, typer.Option("--png-cap", min=1, help="Draw at most N filters × N kernels a layer.")
    ] = 64,
    arch: ArchOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume/--overwrite", help="--overwrite replaces filters of other "
                           "options in OUT/filters.")
    ] = True,
) -> None:
    """Write every conv weight to OUT/filters/filters.safetensors, and one PNG grid per conv."""
    _filters(FilterOptions(model=model, layers=layers, out=str(out), weights=weights, arch=arch,
                           png=png, png_cap=png_cap, resume=resume))


def _filters(options: FilterOptions) -> None:
    from convmaps.jobs.filters import run_filters

    notes = _with_progress("", "filters", None, lambda _, phase: run_filters(options, phase),
                           units=lambda _: "layers")
    for name, note in notes:
        if note:
            err_console.print(f"{name}: {note}")
    out_console.print(f"wrote {len(notes)} filters to {Path(options.out) / 'filters'}")


InputsArg = Annotated[
    list[Path] | None,
    typer.Argument(help="Image files and/or folders (walked recursively). With none, lenet "
                   "uses the bundled samples.", show_default=False, metavar="INPUT"),
]


@app.command()
@reports_errors
def dump(
    ctx: typer.Context,
    model: ModelArg,
    inputs: InputsArg = None,
    layers: Annotated[
        str | None,
        typer.Option("--layers", "-l", help="SPEC: indices into the feature extractor (0,3), "
                     "ranges (0-5), names (features.3, C3), conv/relu/pool/linear/all."),
    ] = None,
    kernels: Annotated[
        str | None, typer.Option("--kernels", help="Conv layers SPEC whose kernel maps to write.")
    ] = None,
    taps: Annotated[
        str | None, typer.Option("--taps", help="Conv layers SPEC whose tap maps to write.")
    ] = None,
    switches: Annotated[
        bool, typer.Option("--switches/--no-switches", help="Max-pool switch indices.")
    ] = True,
    png: Annotated[bool, typer.Option("--png/--no-png", help="PNG grids.")] = True,
    out: OutOpt = Path("convmaps_out"),
    weights: WeightsOpt = None,
    arch: ArchOpt = None,
    batch_size: BatchOpt = 8,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    dtype: Annotated[
        str, typer.Option("--dtype", help="Storage dtype: float32, float16 or bfloat16.")
    ] = "float32",
    max_bytes: MaxBytesOpt = "8GB",
    resume: Annotated[
        bool, typer.Option("--resume/--overwrite", help="Skip inputs whose outputs are complete.")
    ] = True,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 at the end if any input was skipped.")
    ] = False,
    png_cap: Annotated[
        int, typer.Option("--png-cap", min=0, help="Kernel/tap-map PNGs for at most N filters.")
    ] = 16,
    png_scale: Annotated[
        str, typer.Option("--png-scale", help="Colour range of a PNG grid: `layer` (one for "
                          "all tiles, so they compare) or `channel` (each tile its own).")
    ] = "layer",
    shard: ShardOpt = None,
) -> None:
    """Run images through MODEL and write activations, switches, kernel and tap maps.

    Under `torchrun --nproc-per-node K -m convmaps dump …` each process takes its shard.
    """
    values = dict(locals())
    _dump(DumpOptions(**_options(ctx, values, only_given=False)))


def _options(ctx: typer.Context, values: dict[str, Any], only_given: bool) -> dict[str, Any]:
    """Command-line values as DumpOptions fields (only those typed, with `only_given`)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name in ("ctx", "config") or (
            # by name: typer may ship its own copy of click's ParameterSource enum
            only_given and getattr(ctx.get_parameter_source(name), "name", "") != "COMMANDLINE"
        ):
            continue
        if name == "png_scale" and value not in PngScale.__members__:
            raise ConvmapsError(f"--png-scale {value!r}: choose layer or channel")
        if name == "inputs":
            value = [str(p) for p in value or []]
        if name == "png_scale":
            value = PngScale(value)
        out[name] = _dtype(value) if name == "dtype" else str(value) if name == "out" else value
    return out


def _dtype(value: str) -> DType:
    """A `--dtype` value, checked."""
    if value not in DType.__members__:
        raise ConvmapsError(f"--dtype {value!r}: choose float32, float16 or bfloat16")
    return DType(value)


def run(ctx: typer.Context, config: Path, **values: Any) -> None:
    """Run the command of a TOML config (a dump unless it says `command = ...`), or each of
    its `[[job]]` steps in order; see configs/. Options given here override the file's, in
    every step that has them."""
    from convmaps.config import COMMANDS, steps_from
    from convmaps.options import (
        ExplainOptions,
        InvarianceOptions,
        OccludeOptions,
        ProjectOptions,
        ReportOptions,
        TopkOptions,
    )

    if not config.is_file():
        raise ConvmapsError(f"config {config} does not exist")
    steps = steps_from(config, _options(ctx, values, only_given=True))
    for n, options in enumerate(steps, 1):
        if len(steps) > 1:
            name = next(k for k, kind in COMMANDS.items() if type(options) is kind)
            err_console.print(f"step {n}/{len(steps)}: convmaps {name}", style="bold")
        if isinstance(options, FilterOptions):
            _filters(options)
        elif isinstance(options, ReportOptions):
            _report(Path(options.out), options.standalone)
        elif isinstance(options, DumpOptions):
            _dump(options)
        else:
            from convmaps.jobs.explain import Explain
            from convmaps.jobs.invariance import Invariance
            from convmaps.jobs.occlude import Occlude
            from convmaps.jobs.project import Project
            from convmaps.jobs.topk import Topk

            jobs = {ProjectOptions: Project, TopkOptions: Topk, OccludeOptions: Occlude,
                    InvarianceOptions: Invariance, ExplainOptions: Explain}
            _job(options, jobs[type(options)]())


def _run_signature() -> None:
    """`run` takes CONFIG plus every `dump` option, declared once, on `dump`."""
    import inspect

    hints = typing.get_type_hints(dump.__wrapped__, include_extras=True)  # type: ignore[attr-defined]
    params = inspect.signature(dump.__wrapped__).parameters  # type: ignore[attr-defined]
    config = inspect.Parameter(
        "config", inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[Path, typer.Argument(
            help="A TOML file of one command's options (a dump unless it says command = ...), "
            "or of [[job]] steps."
        )],
    )
    inputs = params["inputs"].replace(annotation=Annotated[
        list[Path] | None,
        typer.Argument(help="Inputs that replace the config's `inputs`.", show_default=False),
    ])
    rest = [p.replace(annotation=hints[p.name]) for n, p in params.items()
            if n not in ("ctx", "model", "inputs")]
    new = [params["ctx"].replace(annotation=typer.Context), config, inputs, *rest]
    run.__signature__ = inspect.Signature(new, return_annotation=None)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in new} | {"return": None}


_run_signature()
app.command("run")(reports_errors(run))


class _PlainProgress:
    """Progress for a log file (SLURM, CI): one plain line every `every` seconds and at the end,
    instead of a bar that only a terminal can redraw. The rate counts this run's images only,
    not those already done before it."""

    def __init__(self, label: str, total: int, every: float = 10.0, what: str = "dump",
                 already: int = 0, unit: str = "images") -> None:
        import time

        self.clock = time.monotonic
        self.label, self.total, self.every, self.what = label, total, every, what
        self.unit = unit
        self.done = self.base = already
        self.start = self.last = self.clock()

    def __call__(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            err_console.print(self.line(now), highlight=False)

    def line(self, now: float) -> str:
        rate = (self.done - self.base) / max(now - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else None
        eta = f", about {_duration(left)} left" if left is not None and left > 0 else ""
        return (f"{self.label}{self.what}: {self.done}/{self.total} {self.unit}, {rate:.1f} "
                f"{self.unit}/s{eta}")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


R = TypeVar("R")


def _print_skipped(entries: list[dict[str, Any]], limit: int = 20) -> list[dict[str, Any]]:
    """Print the entries that were skipped, with their reasons (at most `limit`); returns them."""
    skipped = [e for e in entries if e["status"] != "ok"]
    for e in skipped[:limit]:
        err_console.print(Text(f"skipped {e['source']}: {e['status'].removeprefix('skipped: ')}",
                               style="yellow"))
    if len(skipped) > limit:
        err_console.print(f"… and {len(skipped) - limit} more skipped (see the manifest)")
    return skipped


def _with_progress(label: str, what: str, total: int | None,
                   run: Callable[[Callable[[int], None], Callable[[str, int, int], None]], R],
                   already: int = 0, units: Callable[[str], str] = lambda phase: "units") -> R:
    """`run(on_progress, on_phase)` with progress bars on a terminal, plain lines in a log file:
    the images (none if `total` is None), then any later phase (topk's projections) with its
    own count of `units(phase)`, rate and time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if not err_console.is_terminal:
        phases: dict[str, _PlainProgress] = {}

        def plain_phase(name: str, done: int, of: int) -> None:
            if name not in phases:
                phases[name] = _PlainProgress(label, of, what=f"{what} {name}", unit=units(name))
            phases[name](done - phases[name].done)

        if total is None:
            return run(lambda n: None, plain_phase)
        return run(_PlainProgress(label, total, what=what, already=already), plain_phase)
    speed = TextColumn("{task.fields[rate]}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), speed,
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console) as bar:
        task = bar.add_task(f"{label}{what}", total=total, completed=already, rate="",
                            visible=total is not None)
        tasks: dict[str, Any] = {}

        def step(n: int) -> None:
            bar.advance(task, n)
            rate = bar.tasks[0].speed
            bar.update(task, rate=f"{rate:.1f} images/s" if rate else "")

        def phase(name: str, done: int, of: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(f"{label}{what} {name}", total=of, rate="")
            bar.update(tasks[name], completed=done)
            rate = next(t.speed for t in bar.tasks if t.id == tasks[name])
            bar.update(tasks[name], rate=f"{rate:.1f} {units(name)}/s" if rate else "")

        return run(step, phase)


def _dump(options: DumpOptions) -> None:
    from convmaps.jobs.dump import Dump

    _job(options, Dump(), strict=options.strict)


def _job(options: Any, job: Any, strict: bool = False) -> None:
    """Plan and run a job on the engine, with its header line, progress and closing line."""
    from convmaps.jobs.engine import plan_job, run_job

    plan = plan_job(options, job)
    err_console.print(job.describe(plan), highlight=False)
    result = _with_progress(plan.label, job.name, len(plan.mine),
                            lambda step, phase: run_job(plan, step, phase), len(plan.finished))
    _print_skipped(result.skipped)
    out_console.print(job.closing(plan, result), highlight=False)
    if result.skipped and not result.written and not result.already:
        # a run that made nothing (a named notes.txt, a folder of broken files) is a failure
        raise ConvmapsError("nothing written: every input was skipped (the lines above say why)")
    if result.skipped and strict:
        raise typer.Exit(1)


@app.command()
@reports_errors
def project(
    model: ModelArg,
    inputs: InputsArg = None,
    unit: Annotated[
        list[str] | None,
        typer.Option("--unit", "-u", help="MODULE:C (channel C at its strongest position), "
                     "MODULE:C@Y,X, or MODULE:I for a 1-D output; MODULE is a name or an index "
                     "into the feature extractor. Repeat for more units."),
    ] = None,
    mode: Annotated[
        Mode, typer.Option("--mode", help="How ReLUs pass the signal down: deconvnet (Zeiler & "
                           "Fergus), guided (Springenberg et al.) or gradient (autograd's).")
    ] = Mode.deconvnet,
    out: OutOpt = Path("convmaps_out"),
    weights: WeightsOpt = None,
    arch: ArchOpt = None,
    device: DeviceOpt = "cpu",
    png: Annotated[bool, typer.Option("--png/--no-png", help="A figure per unit.")] = True,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Images per batch, and units "
                          "projected together in one backward pass (memory grows with it).")
    ] = 32,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    shard: ShardOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume/--overwrite", help="Skip images whose projections are "
                           "done; --overwrite replaces another model's projections in OUT.")
    ] = True,
) -> None:
    """Project units down to the input pixels (DeconvNet, guided backprop or the gradient),
    into OUT/<image key>/projections.safetensors and a PNG per unit."""
    from convmaps.jobs.project import Project
    from convmaps.options import ProjectOptions

    o = ProjectOptions(model=model, inputs=[str(p) for p in inputs or []], units=unit or [],
                       mode=mode, out=str(out), weights=weights, arch=arch, device=device,
                       png=png, batch_size=batch_size, workers=workers, threads=threads,
                       shard=shard, resume=resume)
    _job(o, Project())


@app.command()
@reports_errors
def occlude(
    model: ModelArg,
    inputs: InputsArg = None,
    patch: Annotated[int, typer.Option("--patch", min=1, help="The grey square's side, in "
                                       "input pixels.")] = 16,
    stride: Annotated[int, typer.Option("--stride", min=1, help="Pixels between patch "
                                        "positions.")] = 4,
    fill: Annotated[float, typer.Option("--fill", help="The square's value in normalised "
                                        "units (0: the data set's mean colour).")] = 0.0,
    target: Annotated[str, typer.Option("--target", help="top (each image's unoccluded top "
                                        "class) or a class index.")] = "top",
    unit: Annotated[
        list[str] | None,
        typer.Option("--unit", "-u", help="MODULE:C whose summed feature map to map; repeat "
                     "for more. Default: the last conv layer's strongest channel."),
    ] = None,
    out: OutOpt = Path("convmaps_out"),
    weights: WeightsOpt = None,
    arch: ArchOpt = None,
    device: DeviceOpt = "cpu",
    png: Annotated[bool, typer.Option("--png/--no-png", help="A figure per image.")] = True,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Images per batch, and patch "
                          "positions per step (memory grows with it).")
    ] = 64,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    shard: ShardOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume/--overwrite", help="Skip images whose maps are done; "
                           "--overwrite replaces occlusion maps of other options.")
    ] = True,
) -> None:
    """Slide a grey square over each input (Zeiler & Fergus, Fig. 7): the target class's
    probability, the most probable class and a unit's activity at every position, into
    OUT/<image key>/occlusion.safetensors and png/occlusion.png."""
    from convmaps.jobs.occlude import Occlude
    from convmaps.options import OccludeOptions

    o = OccludeOptions(model=model, inputs=[str(p) for p in inputs or []], patch=patch,
                       stride=stride, fill=fill, target=target, units=unit or [], out=str(out),
                       weights=weights, arch=arch, device=device, png=png,
                       batch_size=batch_size, workers=workers, threads=threads, shard=shard,
                       resume=resume)
    _job(o, Occlude())


@app.command()
@reports_errors
def invariance(
    model: ModelArg,
    inputs: InputsArg = None,
    transform: Annotated[
        list[str] | None,
        typer.Option("--transform", "-t", help="translate (vertical, pixels), scale (factor) "
                     "or rotate (degrees); repeat for more. Default: all three."),
    ] = None,
    steps: Annotated[int, typer.Option(
        "--steps", min=2, help="Amounts per transform, spread over the paper's range (translate "
        "-60..60 px at 224 px, scale 1..1.8, rotate 0..360 degrees).")] = 9,
    layers: Annotated[
        str | None, typer.Option("--layers", "-l", help="SPEC of the modules whose outputs to "
                                 "compare (default: conv,linear).")
    ] = None,
    out: OutOpt = Path("convmaps_out"),
    weights: WeightsOpt = None,
    arch: ArchOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per "
                                            "batch (each runs with its copies).")] = 8,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    shard: ShardOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume/--overwrite", help="Go on from the last checkpoint; "
                           "--overwrite replaces curves of other options in OUT/invariance.")
    ] = True,
    png: Annotated[bool, typer.Option("--png/--no-png", help="A plot per transform.")] = True,
) -> None:
    """Translate, scale and rotate each input (Zeiler & Fergus, Fig. 5): how far each module's
    output moves and the top class's probability, into OUT/invariance/."""
    from convmaps.jobs.invariance import Invariance
    from convmaps.options import InvarianceOptions

    o = InvarianceOptions(model=model, inputs=[str(p) for p in inputs or []],
                          transforms=transform or ["translate", "scale", "rotate"], steps=steps,
                          layers=layers, out=str(out), weights=weights, arch=arch,
                          batch_size=batch_size, workers=workers, threads=threads, device=device,
                          shard=shard, resume=resume, png=png)
    _job(o, Invariance())


@app.command()
@reports_errors
def explain(
    model: ModelArg,
    inputs: InputsArg = None,
    unit: Annotated[
        list[str] | None,
        typer.Option("--unit", "-u", help="MODULE:C (channel C at its strongest position), "
                     "MODULE:C@Y,X, or MODULE:I for a 1-D output; repeat for more."),
    ] = None,
    depth: Annotated[int, typer.Option("--depth", min=1, help="Conv and linear levels (and "
                                       "the pixels) followed down a path.")] = 3,
    top: Annotated[int, typer.Option("--top", min=1, help="A conv or linear node's children: "
                                     "its largest terms.")] = 3,
    out: OutOpt = Path("convmaps_out"),
    weights: WeightsOpt = None,
    arch: ArchOpt = None,
    device: DeviceOpt = "cpu",
    png: Annotated[bool, typer.Option("--png/--no-png", help="A figure per unit.")] = True,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1,
                                            help="Images per batch.")] = 16,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    shard: ShardOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume/--overwrite", help="Skip images whose trees are done; "
                           "--overwrite replaces trees of other options.")
    ] = True,
) -> None:
    """A unit's value as an exact sum (a conv's: its input channels' kernel-map values plus the
    bias), followed down the largest terms, into OUT/<image key>/explain/<unit>.json and
    png/explain/<unit>.png."""
    from convmaps.jobs.explain import Explain
    from convmaps.options import ExplainOptions

    o = ExplainOptions(model=model, inputs=[str(p) for p in inputs or []], units=unit or [],
                       depth=depth, top=top, out=str(out), weights=weights, arch=arch,
                       device=device, png=png, batch_size=batch_size, workers=workers,
                       threads=threads, shard=shard, resume=resume)
    _job(o, Explain())


@app.command()
@reports_errors
def topk(
    model: ModelArg,
    inputs: InputsArg = None,
    layers: Annotated[
        str | None, typer.Option("--layers", "-l", help="SPEC of the modules to rank (default: "
                                 "conv); 1-D outputs (linear) rank their values.")
    ] = None,
    k: Annotated[int, typer.Option("--k", "-k", min=1, help="Images per channel.")] = 9,
    project: Annotated[
        str, typer.Option("--project", help="Project every entry (deconvnet, guided, gradient) "
                          "and crop it to its receptive field, or none.")
    ] = "deconvnet",
    out: OutOpt = Path("convmaps_out"),
    weights: WeightsOpt = None,
    arch: ArchOpt = None,
    batch_size: BatchOpt = 8,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    shard: ShardOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume/--overwrite", help="Go on from the last checkpoint; "
                           "--overwrite replaces a top-k of other options in OUT/topk.")
    ] = True,
    png: Annotated[bool, typer.Option("--png/--no-png", help="Figures.")] = True,
    png_cap: Annotated[
        int, typer.Option("--png-cap", min=0, help="A figure for the first N channels of "
                          "each module.")
    ] = 16,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Storage dtype of the projections: float32, float16 "
                          "or bfloat16.")
    ] = "float32",
    explain: Annotated[
        bool, typer.Option("--explain", help="Each entry as an exact sum of the layer below "
                           "(depth 2, top 3), and the lower units a unit's k trees share.")
    ] = False,
    max_bytes: MaxBytesOpt = "8GB",
) -> None:
    """Per module and channel, the k images whose maximum over space is largest, with where,
    their receptive-field boxes and projections, into OUT/topk/.

    Under `torchrun --nproc-per-node K -m convmaps topk …` each process takes its shard.
    """
    from convmaps.jobs.topk import Topk
    from convmaps.options import TopkOptions

    o = TopkOptions(model=model, inputs=[str(p) for p in inputs or []], layers=layers, k=k,
                    project=project, out=str(out), weights=weights, arch=arch,
                    batch_size=batch_size, workers=workers, threads=threads, device=device,
                    shard=shard, resume=resume, png=png, png_cap=png_cap, dtype=_dtype(dtype),
                    max_bytes=max_bytes, explain=explain)
    _job(o, Topk())


@app.command()
@reports_errors
def report(
    out: Annotated[Path, typer.Argument(help="An output folder, with any of the parts convmaps "
                                        "writes.")] = Path("convmaps_out"),
    standalone: Annotated[bool, typer.Option(
        "--standalone", help="Put every picture the pages show inside OUT/report/ (hard links, "
        "or copies where the disk makes none), so that report/ alone can be zipped and opened "
        "anywhere.")] = False,
) -> None:
    """Write OUT/report/, a static HTML site of what OUT holds; open OUT/report/index.html from
    disk in any browser (no server, no network)."""
    _report(out, standalone)


def _report(out: Path, standalone: bool) -> None:
    from convmaps.report import build_report

    notes: list[str] = []
    index = _with_progress("", "report", None, lambda _, phase: build_report(
        out, standalone, phase, notes.append), units=lambda phase: phase)
    for note in notes[:20]:
        err_console.print(Text(note, style="yellow"))
    if len(notes) > 20:
        err_console.print(f"… and {len(notes) - 20} more")
    out_console.print(f"wrote {index.parent}; open {index.resolve().as_uri()}", highlight=False)


def _stats_table(title: str, stats: list[Any], per_image: bool = False) -> Table:
    table = Table(title=title, title_justify="left")
    # min/max/mean/std leave NaN out; the NaN column counts them, shown only when there are.
    nan_column = any(s.nans for s in stats)
    for col in ("tensor", "shape", "dtype", "min", "max", "mean", "std", "zeros",
                *(["NaN"] if nan_column else [])):
        table.add_column(col, justify="left" if col in ("tensor", "dtype") else "right")
    for s in stats:
        table.add_row(s.name, _shape(s.shape), s.dtype, f"{s.min:.4g}", f"{s.max:.4g}",
                      f"{s.mean:.4g}", f"{s.std:.4g}", f"{s.zeros:.1%}",
                      *([f"{s.nans:,}"] if nan_column else []))
    return table


def _print_predictions(entries: list[dict[str, Any]], limit: int = 20) -> None:
    """Each image's top-5 classes, as the manifest records them."""
    with_top = [e for e in entries if isinstance(e.get("top5"), list)]
    for e in with_top[:limit]:
        guesses = ", ".join(f"{t.get('class')} {float(t.get('probability', 0)):.1%}"
                            for t in e["top5"] if isinstance(t, dict))
        out_console.print(Text(f"  {e['key']}: {guesses}"))
    if len(with_top) > limit:
        out_console.print(f"  … and {len(with_top) - limit} more (see manifest.json)")


@app.command()
@reports_errors
def show(
    path: Annotated[Path, typer.Argument(help="A .safetensors file or an output folder.")],
) -> None:
    """Summary statistics (shape, dtype, min/max, mean/std, zeros) of a file or a whole dump."""
    from convmaps.io import layout
    from convmaps.io import manifest as manifests
    from convmaps.report.summary import dump_stats, file_stats

    if path.is_dir():
        parts = [(path, layout.MANIFEST, "dump"), (path, layout.PROJECTIONS_MANIFEST,
                                                    "projections"),
                 (path, layout.OCCLUSION_MANIFEST, "occlusion maps"),
                 (path, layout.EXPLAIN_MANIFEST, "explain trees"),
                 (path / layout.TOPK, layout.MANIFEST, "top-k"),
                 (path / layout.INVARIANCE, layout.MANIFEST, "invariance"),
                 (path / layout.FILTERS, layout.MANIFEST, "filters")]
        folders = {layout.TOPK: "top-k", layout.INVARIANCE: "invariance",
                   layout.FILTERS: "filters"}
        if path.name in folders and (path / layout.MANIFEST).is_file():  # one such folder
            parts = [(path, layout.MANIFEST, folders[path.name])]
        found = [(folder, name, what, m) for folder, name, what in parts
                 if (m := manifests.read(folder, name)) is not None]
        if not found:
            raise ConvmapsError(f"{path} holds no convmaps manifest (not a convmaps output "
                                "folder)")
        for folder, name, what, m in found:
            entries = m.get("inputs", [])
            ok = sum(1 for e in entries if e["status"] == "ok")
            out_console.print(f"{folder / name}: {what} of {m.get('model')} "
                              f"({m.get('weights')}), {ok} image(s) ok, {len(entries) - ok} "
                              "skipped", highlight=False)
            if what == "dump":
                _print_predictions(entries)
            if what == "explain trees":
                trees = sum(1 for e in entries for f in e["files"] if f.endswith(".json"))
                out_console.print(f"  {trees} tree(s): <image key>/explain/<unit>.json",
                                  highlight=False)
            elif what in ("dump", "projections", "occlusion maps"):
                for rel, stats in dump_stats(folder, name).items():
                    out_console.print(_stats_table(f"{rel} (over {ok} image(s))", stats))
            else:
                names = [f"{k}.safetensors" for k in m.get("modules", [])] if what == "top-k" \
                    else [layout.INVARIANCE_FILE] if what == "invariance" \
                    else [layout.FILTER_WEIGHTS]
                for file in names:
                    if (folder / file).is_file():
                        out_console.print(_stats_table(str(folder / file),
                                                       file_stats(folder / file)))
        return
    if not path.exists():
        raise ConvmapsError(f"{path} does not exist")
    if not path.is_file():
        from convmaps.errors import file_kind

        raise ConvmapsError(f"{path} is {file_kind(path.stat().st_mode)}, not a .safetensors "
                            "file or an output folder")
    from safetensors import safe_open

    stats = file_stats(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    for k, v in meta.items():
        if not k.startswith("module."):
            out_console.print(Text(f"{k}: {v}", style="dim"))
    out_console.print(_stats_table(str(path), stats))


@app.command("train-lenet")
@reports_errors
def train_lenet(
    data: Annotated[
        Path, typer.Option("--data", help="Folder with (Fashion-)MNIST IDX files.")
    ] = Path("/usr/share/datasets/fashion-mnist"),
    out: Annotated[Path, typer.Option("--out", help="Checkpoint to write.")] = Path(
        "lenet5.safetensors"
    ),
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 15,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    # The defaults repeat convmaps.jobs.train's DEFAULT_BATCH_SIZE/DEFAULT_LR (a test checks), as
    # importing it here would import torch for `convmaps --help`.
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Training batch size.")
    ] = 128,
    lr: Annotated[
        float, typer.Option("--lr", help="Adam's initial learning rate (cosine-annealed).")
    ] = 1e-3,
    samples: Annotated[
        Path | None, typer.Option("--samples", help="Also export test images as PNG here.")
    ] = None,
) -> None:
    """Train the LeNet-5 checkpoint on (Fashion-)MNIST IDX files, as the bundled one was."""
    from convmaps.jobs import train

    metrics = train.train_lenet(data, out, epochs=epochs, seed=seed, batch_size=batch_size,
                                lr=lr, log=lambda s: err_console.print(s))
    out_console.print(f"wrote {out}: test accuracy {float(metrics['test_accuracy']):.2%}")
    if samples is not None:
        train.export_samples(data, samples)
        out_console.print(f"wrote sample images to {samples}")


# click's UsageError (base of BadParameter, NoSuchOption, MissingParameter, ...), whether typer
# uses click itself or its own copy of it, as newer typers do.
_UsageError: type[Exception] = typer.BadParameter.__mro__[1]


def _usage_line(e: Exception) -> str:
    """A click usage error as one line, with the command whose --help tells more."""
    text = " ".join(e.format_message().split())  # type: ignore[attr-defined]
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else "convmaps"
    return f"{text} (see `{path} --help`)"


def main(args: Sequence[str] | None = None) -> int:
    """The `convmaps` entry point: run the app on `args` (default: sys.argv) and return the exit
    code. A usage error (a bad option value, an unknown option, a missing argument) is one line
    on stderr and exit code 2, as click's own; `--help` and `--version` work as usual."""
    try:
        code = app(args, prog_name="convmaps", standalone_mode=False)
    except _UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # plain `convmaps`: the help is shown
            if message := e.format_message().strip():  # type: ignore[attr-defined]
                out_console.print(message, markup=False, highlight=False)
            return int(e.exit_code)  # type: ignore[attr-defined]
        _fail(_usage_line(e))
        return int(e.exit_code)  # type: ignore[attr-defined]
    except typer.Abort:
        _fail("aborted")
        return 1
    return code if isinstance(code, int) else 0
