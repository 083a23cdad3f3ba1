"""Capture: layer selection (SPEC), the layer table, and exact forward hooks.

    >>> import torch
    >>> from convmaps.core.models import lenet5
    >>> net = lenet5().eval()
    >>> out = capture(net, torch.zeros(2, 1, 28, 28), ["C1", "S2"])
    >>> tuple(out["C1"].shape), tuple(out["S2"].shape)
    ((2, 6, 28, 28), (2, 6, 14, 14))
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from convmaps.core.models import feature_root
from convmaps.errors import ConvmapsError, UnknownLayerError

__all__ = [
    "Kind",
    "Layer",
    "LayerRow",
    "Trace",
    "capture",
    "kind_of",
    "layer_table",
    "list_layers",
    "meta_trace",
    "modules_run",
    "select",
    "trace",
]


class Kind(StrEnum):
    """Type words a SPEC may use, and the type column of the layer table."""

    conv = "conv"
    relu = "relu"
    pool = "pool"
    linear = "linear"
    other = "other"


_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def kind_of(module: nn.Module) -> Kind:
    if isinstance(module, nn.Conv2d):
        return Kind.conv
    if isinstance(module, nn.ReLU):
        return Kind.relu
    if isinstance(module, _POOLS):
        return Kind.pool
    if isinstance(module, nn.Linear):
        return Kind.linear
    return Kind.other


@dataclass(frozen=True)
class Layer:
    """A module a SPEC can name: its qualified name, its index in the feature extractor (for
    direct children of it), and the module itself."""

    name: str
    index: int | None
    module: nn.Module = field(repr=False, compare=False)

    @property
    def kind(self) -> Kind:
        return kind_of(self.module)


def _root(model: nn.Module) -> tuple[str, nn.Module]:
    name = feature_root(model)
    return name, (model.get_submodule(name) if name else model)


def list_layers(model: nn.Module) -> list[Layer]:
    """Leaf modules in definition order, plus the feature extractor's non-leaf children (so an
    index like `4` on a ResNet names `layer1`)."""
    root_name, root = _root(model)
    prefix = f"{root_name}." if root_name else ""
    index = {f"{prefix}{n}": i for i, (n, _) in enumerate(root.named_children())}
    out = []
    for name, module in model.named_modules():
        if name and (name in index or not any(True for _ in module.children())):
            out.append(Layer(name, index.get(name), module))
    return out


def _spec_help(layers: Sequence[Layer], root_name: str, conv_only: bool = False) -> str:
    if conv_only:
        convs = [layer.name for layer in layers if layer.kind == Kind.conv]
        return f"conv layers: {_listing(convs)}" if convs else "the model has no conv layers"
    indexed = [layer.index for layer in layers if layer.index is not None]
    where = root_name or "the model's top level"
    idx = f"indices 0-{max(indexed)} (into {where}); " if indexed else ""
    words = ", ".join(k.value for k in Kind if k != Kind.other)
    return f"{idx}names: {_listing([layer.name for layer in layers])}; type words: {words}, all"


def _listing(names: Sequence[str], cap: int = 40) -> str:
    return ", ".join(names[:cap]) + (f", … (+{len(names) - cap})" if len(names) > cap else "")


def select(model: nn.Module, spec: str | None, *, conv_only: bool = False, flag: str = "--layers",
           ran: Collection[str] | None = None) -> list[Layer]:
    """The layers a SPEC names, in model order, each once.

    SPEC items (comma-separated): an index into the feature extractor (`3`), a range (`0-5`), a
    qualified module name (`features.3`, `C3`), or a type word (`conv`, `relu`, `pool`,
    `linear`, `all`). `None` means `all`; a SPEC with no item (`""`, `","`) is an error, as is
    an item that selects nothing (`pool` on a model without pools). With `conv_only`, type
    words keep only Conv2d layers (so `relu` selects nothing) and naming any other layer is an
    error. (The CLI passes its own default, e.g. `all` for `--layers ""`, before calling this.)

    Args:
        ran: the modules that run in eval mode (`modules_run`); when given, type words select
            only those (GoogLeNet's aux heads never run), and naming one that does not is an
            error. `None`: every module counts.

    Raises:
        UnknownLayerError: an empty SPEC, or an item that matches nothing; the message names
            `flag` and lists what exists.
    """
    layers = list_layers(model)
    root_name, _ = _root(model)
    items = [raw.strip() for raw in ("all" if spec is None else spec).split(",")]
    if not any(items):
        raise UnknownLayerError(f"{flag}: empty SPEC {spec!r} selects nothing; "
                                f"{_spec_help(layers, root_name, conv_only)}")
    chosen: dict[str, Layer] = {}
    for item in filter(None, items):
        found = _select_item(model, layers, root_name, item, conv_only, flag, ran)
        if not found:
            what = f"conv layer ({flag} takes conv layers only)" if conv_only else "layer"
            raise UnknownLayerError(f"{flag}: {item!r} selects no {what}; "
                                    f"{_spec_help(layers, root_name, conv_only)}")
        for x in found:
            chosen.setdefault(x.name, x)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(chosen.values(), key=lambda x: order[x.name])


def _select_item(model: nn.Module, layers: list[Layer], root_name: str, item: str,
                 conv_only: bool, flag: str, ran: Collection[str] | None) -> list[Layer]:
    """The layers one non-empty SPEC item names (possibly none, for a type word)."""
    if item == "all" or item in Kind.__members__:
        found = [x for x in layers if (item == "all" or x.kind == item)
                 and (ran is None or x.name in ran)]
        return [x for x in found if x.kind == Kind.conv] if conv_only else found
    by_index = {layer.index: layer for layer in layers if layer.index is not None}
    by_name = {layer.name: layer for layer in layers}
    modules = dict(model.named_modules())
    if m := re.fullmatch(r"(\d+)(?:-(\d+))?", item):
        lo, hi = int(m[1]), int(m[2] or m[1])
        top = max(by_index, default=-1)
        if lo > hi:
            raise UnknownLayerError(f"{flag}: the range {item!r} runs backwards; write "
                                    f"{hi}-{lo}")
        if hi > top or any(i not in by_index for i in range(lo, hi + 1)):
            raise UnknownLayerError(f"{flag}: no layer {item!r}; {_spec_help(layers, root_name)}")
        found = [by_index[i] for i in range(lo, hi + 1)]
    elif item in by_name:
        found = [by_name[item]]
    elif item in modules:
        found = [Layer(item, None, modules[item])]
    else:
        raise UnknownLayerError(f"{flag}: no layer {item!r}; {_spec_help(layers, root_name)}")
    for x in found if conv_only else []:
        if x.kind != Kind.conv:
            raise UnknownLayerError(
                f"{flag} takes conv layers only; {x.name} is "
                f"{type(x.module).__name__} (try {flag} conv)"
            )
    idle = [x.name for x in found if ran is not None and x.name not in ran]
    if idle:
        raise UnknownLayerError(f"{flag}: {', '.join(idle[:3])} never run(s) in eval mode")
    return found


@dataclass
class Trace:
    """One batched forward pass: selected modules' outputs and inputs, key = module name.

    A module called more than once per forward pass (a shared ReLU) gets keys `name`,
    `name@1`, `name@2`, … in call order.
    """

    outputs: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]  # e.g. MaxPool2d(return_indices=True) returns (values, indices)
    return None


@contextmanager
def _borrowed(model: nn.Module) -> Iterator[None]:
    """Give back every submodule's `training` and `inplace` flags and every buffer as found.

    `model.train(flag)` recurses, so restoring only the top-level flag would set every
    submodule to it (a model with some submodules frozen in eval mode would come back all in
    training mode). Buffers are restored into the same tensor objects, only when changed.
    """
    modules = list(model.modules())
    training = [m.training for m in modules]
    inplace = [(m, m.inplace) for m in modules if isinstance(getattr(m, "inplace", None), bool)]
    buffers = [(m, k, b, b._version, b.clone()) for m in modules
               for k, b in m._buffers.items() if b is not None]
    try:
        yield
    finally:
        for m, flag in zip(modules, training, strict=True):
            m.training = flag
        for m, value in inplace:
            m.inplace = value
        with torch.no_grad():
            for m, k, b, version, saved in buffers:
                if m._buffers.get(k) is not b:
                    m._buffers[k] = b
                if b._version != version:
                    b.copy_(saved)


def _where(name: str, prefix: str, model: nn.Module) -> str:
    """The innermost running module as the caller knows it: its qualified name under `prefix`
    (the part of the traced module that is the caller's model), else the model's own class."""
    if name.startswith(prefix) and name != prefix:
        return name.removeprefix(prefix)
    own = model.get_submodule(prefix.removesuffix(".")) if prefix else model
    return f"{type(own).__name__}'s own forward code"


def _guarded(hook: Callable[..., None], bugs: list[BaseException]) -> Callable[..., None]:
    """`hook`, noting in `bugs` whatever it raises, so that the error is not taken for the
    model's own."""
    def guarded(*args: Any) -> None:
        try:
            hook(*args)
        except BaseException as e:
            bugs.append(e)
            raise

    return guarded


def _raised_by(e: BaseException | None, bugs: list[BaseException]) -> bool:
    """Whether `e`, or an exception it was raised from or while handling, is one of `bugs`."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if any(e is b for b in bugs):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _run(model: nn.Module, batch: torch.Tensor, outputs: Collection[str], inputs: Collection[str],
         clone: Collection[str], prefix: str = "") -> tuple[Trace, list[str]]:
    """Forward with hooks, cloning the captures whose keys are in `clone`; returns the trace
    and the keys whose tensors changed after capture (and were not cloned)."""
    got_out: dict[str, torch.Tensor] = {}
    got_in: dict[str, torch.Tensor] = {}
    versions: dict[tuple[str, str], tuple[torch.Tensor, int]] = {}
    calls: dict[str, int] = {}
    running: list[str] = []  # the modules whose forward has begun and not returned
    bugs: list[BaseException] = []  # what convmaps' own hooks raised

    def keep(kind: str, store: dict[str, torch.Tensor], key: str, t: torch.Tensor) -> None:
        t = t.detach()
        if key in clone:
            t = t.clone()
        store[key] = t
        versions[(kind, key)] = (t, t._version)

    def pre_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            running.append(name)
            if name in inputs and (t := _first_tensor(args)) is not None:
                n = calls.get(name, 0)
                keep("in", got_in, name if n == 0 else f"{name}@{n}", t)

        return hook

    def post_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], result: Any) -> None:
            while running and running.pop() != name:
                pass  # a module whose error the model's own code caught never returned
            n = calls.get(name, 0)
            calls[name] = n + 1
            if name in outputs and (t := _first_tensor(result)) is not None:
                keep("out", got_out, name if n == 0 else f"{name}@{n}", t)

        return hook

    handles = []
    with _borrowed(model):
        try:
            for name, module in model.named_modules():
                handles.append(module.register_forward_pre_hook(_guarded(pre_hook(name), bugs)))
                handles.append(module.register_forward_hook(_guarded(post_hook(name), bugs)))
            for module in model.modules():
                if isinstance(getattr(module, "inplace", None), bool):
                    # In-place ReLUs would overwrite a captured conv output; _borrowed restores.
                    module.inplace = False  # type: ignore[assignment]
            model.eval()
            with torch.no_grad():
                try:
                    model(batch)
                except ConvmapsError:
                    raise
                except Exception as e:
                    if _raised_by(e, bugs):
                        raise  # convmaps' own hook failed: a bug, shown as one
                    # Any error of the model's own code (shape asserts raise AssertionError, ...)
                    where = _where(running[-1] if running else prefix, prefix, model)
                    text = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
                    raise ConvmapsError(
                        f"forward pass failed in {where} for input {tuple(batch.shape)}: {text}"
                    ) from e
        finally:
            for h in handles:
                h.remove()
    changed = [key for (_, key), (t, v) in versions.items() if t._version != v]
    return Trace(got_out, got_in), changed


def trace(model: nn.Module, batch: torch.Tensor, outputs: Collection[str],
          inputs: Collection[str] = ()) -> Trace:
    """Outputs of the modules named in `outputs` and inputs of those in `inputs`, exactly.

    The pass runs in eval mode under `torch.no_grad()` with in-place modules switched off.
    Should the model's own forward code still modify a captured tensor in place afterwards
    (e.g. ResNet's `out += identity`), the tensor's version counter shows it: the pass is
    redone with those captures cloned, and later passes of the same model clone them from the
    start (decided once per model, not per batch). The model is left exactly as found: hooks
    removed, and every submodule's `training` and `inplace` flags and buffers restored.

    Raises:
        UnknownLayerError: a name that is no module of `model`.
        ConvmapsError: the forward pass failed (any exception of the model's code, kept as
            `__cause__`); the message names the innermost running module and the input shape.
            An exception of convmaps' own hooks is a bug and propagates as it is.
    """
    return _trace(model, batch, outputs, inputs)


def _trace(model: nn.Module, batch: torch.Tensor, outputs: Collection[str],
           inputs: Collection[str], prefix: str = "") -> Trace:
    """`trace`, where the caller's model is the submodule `prefix` (empty: all of `model`)."""
    names = dict(model.named_modules())
    unknown = [n.removeprefix(prefix) for n in [*outputs, *inputs] if n not in names]
    if unknown:
        raise UnknownLayerError(f"no module named {', '.join(unknown)}")
    # Which captures the model's own code modifies in place is a property of the model: found
    # once (one batch runs twice), then those alone are cloned from the start.
    known = _MUTATED.setdefault(model, set())
    result, changed = _run(model, batch, set(outputs), set(inputs), clone=known, prefix=prefix)
    if changed:
        known.update(changed)
        result, _ = _run(model, batch, set(outputs), set(inputs), clone=known, prefix=prefix)
    return result


# model -> the capture keys its forward code modifies in place after they are captured
_MUTATED: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def capture(model: nn.Module, batch: torch.Tensor, layers: Collection[str]
            ) -> dict[str, torch.Tensor]:
    """The outputs of `layers` (module names) for a batch: `{name: (N, ...) tensor}`."""
    return trace(model, batch, layers).outputs


@dataclass(frozen=True)
class LayerRow:
    """One row of `convmaps layers`; shapes are per image (no batch dim)."""

    index: int | None
    name: str
    type: str
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None
    params: int
    kernel_map_bytes: int | None  # one image's kernel maps in float32, conv layers only
    tap_map_bytes: int | None


def meta_trace(model: nn.Module, input_shape: tuple[int, ...], names: Collection[str],
               inputs: bool = True, on_input: Callable[[torch.Tensor], None] | None = None
               ) -> Trace:
    """The outputs (and, with `inputs`, the inputs) of `names` for one image of `input_shape`
    (C, H, W), from a forward pass on the meta device: real module code, real shapes, every
    call of a reused module (`name@1` …), no values, compute or memory. The input takes the
    parameters' dtype (a float64 model runs too); `on_input` sees it first (`fields` tags it)."""
    state = {k: torch.empty_like(v, device="meta")
             for k, v in [*model.named_parameters(), *model.named_buffers()]}
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    x = torch.empty((1, *input_shape), device="meta", dtype=dtype)
    if on_input is not None:
        on_input(x)

    class _Call(nn.Module):
        def forward(self, batch: torch.Tensor) -> Any:
            return functional_call(model, state, (batch,))

    wrapper = _Call()
    wrapper.add_module("model", model)
    prefixed = [f"model.{n}" for n in names]
    t = _trace(wrapper, x, prefixed, prefixed if inputs else [], prefix="model.")
    strip = len("model.")
    return Trace({k[strip:]: v for k, v in t.outputs.items()},
                 {k[strip:]: v for k, v in t.inputs.items()})


def modules_run(model: nn.Module, input_shape: tuple[int, ...], traced: Trace | None = None
                ) -> frozenset[str]:
    """The names of the modules that run in eval mode for one image of `input_shape` (C, H, W)
    and give a tensor, from one pass on the meta device (GoogLeNet's and Inception's aux heads
    do not run), or from `traced`, a meta trace of every module (`fields.survey`)."""
    if traced is None:
        names = [n for n, _ in model.named_modules() if n]
        traced = meta_trace(model, input_shape, names, inputs=False)
    return frozenset(key.split("@")[0] for key in traced.outputs)


def layer_table(model: nn.Module, input_shape: tuple[int, ...], traced: Trace | None = None
                ) -> list[LayerRow]:
    """Every selectable layer with its per-image input/output shapes for `input_shape` (C, H, W),
    its parameter count and, for convs, the bytes of one image's kernel and tap maps. The
    shapes come from `traced` (a meta trace of every module's inputs and outputs, as
    `fields.survey` gives) or from a meta pass of their own."""
    layers = list_layers(model)
    shapes = traced or meta_trace(model, input_shape, [x.name for x in layers])
    rows = []
    for layer in layers:
        i = shapes.inputs.get(layer.name)
        o = shapes.outputs.get(layer.name)
        in_shape = tuple(i.shape[1:]) if i is not None else None
        out_shape = tuple(o.shape[1:]) if o is not None else None
        km = tm = None
        conv = layer.module
        if isinstance(conv, nn.Conv2d) and out_shape is not None:
            per_pixel = out_shape[0] * out_shape[1] * out_shape[2] * 4
            km = per_pixel * (conv.in_channels // conv.groups)
            tm = per_pixel * conv.kernel_size[0] * conv.kernel_size[1]
        rows.append(
            LayerRow(
                index=layer.index,
                name=layer.name,
                type=type(layer.module).__name__,
                in_shape=in_shape,
                out_shape=out_shape,
                params=sum(p.numel() for p in layer.module.parameters()),
                kernel_map_bytes=km,
                tap_map_bytes=tm,
            )
        )
    return rows
