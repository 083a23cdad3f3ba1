"""Models: the registry of names, torchvision weights, safe checkpoints and the bundled LeNet-5.

    >>> from convmaps.core.models import load_model
    >>> lm = load_model("lenet")
    >>> lm.model.C1
    Conv2d(1, 6, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2))
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import pickle
import re
import stat
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.transforms import v2 as T

from convmaps.errors import (
    CheckpointError,
    ConvmapsError,
    UnknownModelError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
    file_kind,
)

__all__ = [
    "LENET_MEAN",
    "LENET_STD",
    "LoadedModel",
    "build",
    "bundled_lenet_path",
    "feature_root",
    "lenet5",
    "lenet_preset",
    "load_model",
    "load_state_file",
    "model_names",
    "normalisation",
    "preset",
]

# Fashion-MNIST training-set statistics; `train-lenet` normalises with the same numbers.
LENET_MEAN = 0.2860
LENET_STD = 0.3530
SEED = 0  # `--weights none` is a seeded random init so that runs are reproducible.
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclass
class LoadedModel:
    """A model in eval mode plus what a run needs to describe and feed it."""

    model: nn.Module
    arch: str
    weights: str  # what the weights are: an enum name, "none", "bundled" or a file path
    preprocess: Callable[[Any], torch.Tensor]
    input_size: tuple[int, int]
    in_channels: int
    meta: dict[str, str] = field(default_factory=dict)


def lenet5(num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 as the classic notebook builds it, with a uniquely named ReLU after C1, C3, C5, F6.

    (The notebook reused one ReLU name, which silently dropped the ReLU after C5.)
    """
    return nn.Sequential(
        OrderedDict(
            [
                ("C1", nn.Conv2d(1, 6, kernel_size=5, padding=2)),
                ("relu1", nn.ReLU()),
                ("S2", nn.MaxPool2d(2)),
                ("C3", nn.Conv2d(6, 16, kernel_size=5)),
                ("relu3", nn.ReLU()),
                ("S4", nn.MaxPool2d(2)),
                ("C5", nn.Conv2d(16, 120, kernel_size=5)),
                ("relu5", nn.ReLU()),
                ("flatten", nn.Flatten()),
                ("F6", nn.Linear(120, 84)),
                ("relu6", nn.ReLU()),
                ("OUTPUT", nn.Linear(84, num_classes)),
            ]
        )
    )


def lenet_preset() -> T.Compose:
    """The LeNet preprocessing: grayscale, 28x28, scaled to [0, 1], Fashion-MNIST normalised."""
    return T.Compose(
        [
            T.Grayscale(num_output_channels=1),
            T.Resize((28, 28), antialias=True),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize([LENET_MEAN], [LENET_STD]),
        ]
    )


def bundled_lenet_path() -> Path:
    """The LeNet-5 checkpoint shipped as package data (made by `convmaps train-lenet`)."""
    return Path(str(resources.files("convmaps") / "data" / "lenet5.safetensors"))


def _torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_names() -> list[str]:
    """Every name MODEL accepts: `lenet` and torchvision's classification models."""
    return ["lenet", *_torchvision_names()]


def _check_arch(arch: str) -> str:
    names = model_names()
    if arch in names:
        return arch
    folded = {n.lower(): n for n in names}  # VGG16 -> vgg16 first, then look-alikes
    close = ([folded[arch.lower()]] if arch.lower() in folded else []) + [
        n for n in difflib.get_close_matches(arch.lower(), names, n=5, cutoff=0.5)
        if n != folded.get(arch.lower())]
    close = close[:5]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {arch!r}.{hint} Run `convmaps layers --help` for the forms MODEL takes "
        "(a torchvision classifier name, `lenet`, or a checkpoint file with --arch)."
    )


def feature_root(model: nn.Module) -> str:
    """The Sequential that integer layer indices count in: `features` where it exists, else the
    model itself (LeNet's top-level Sequential; the top-level children of other models)."""
    features = getattr(model, "features", None)
    return "features" if isinstance(features, nn.Sequential) else ""


class _SkipInit(TorchFunctionMode):
    """Skips the random init of parameters while a model is built only to receive a full state
    dict: a strict `load_state_dict` overwrites every parameter anyway, and initialising VGG16
    costs 2 s of a 2.2 s load. Buffers and everything else run as usual."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # nn.init passes it by keyword
        if isinstance(target, nn.Parameter) and (
            getattr(func, "__module__", None) == "torch.nn.init"
            or func in (torch.Tensor.uniform_, torch.Tensor.normal_)
        ):
            return target
        return func(*args, **kwargs)


def build(arch: str, num_classes: int | None = None, init: bool = True) -> nn.Module:
    """The architecture with a seeded random init (never downloads anything). `init=False`
    leaves the parameters uninitialised, for a caller that loads a full state dict next."""
    arch = _check_arch(arch)
    if not init:
        with _SkipInit():
            return build(arch, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        if arch == "lenet":
            return lenet5(num_classes or 10)
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return torchvision.models.get_model(arch, weights=None, **kwargs)


def _weights_enum(arch: str) -> Any:
    return torchvision.models.get_model_weights(arch)


def _pick_weights(arch: str, spec: str) -> Any:
    enum = _weights_enum(arch)
    if spec.upper() == "DEFAULT":
        return enum.DEFAULT
    names = [w.name for w in enum]
    if spec in names:
        return enum[spec]
    raise UnknownModelError(
        f"{arch} has no weights {spec!r}; choose one of: DEFAULT, {', '.join(names)}, none, "
        "or a checkpoint file path."
    )


def _cached_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _is_file(path: Path, what: str, remedy: str = "") -> bool:
    """Whether `path` is there, checked before torch or safetensors open it: it is an error
    when it is there but is no regular file (a symlink to one is fine), as reading a FIFO
    would block forever and a device never end."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return False
    except OSError as e:
        raise CheckpointError(f"{what} {path} cannot be read: {e.strerror or e}{remedy}") from e
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{what} {path} is {file_kind(mode)}, not a file{remedy}")
    return True


def _one_line(e: BaseException) -> str:
    """An exception's text on one line (torch's messages span several)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _refusal_reason(message: str) -> str:
    """What a weights_only load refused: the global it would have called, or torch's reason."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"it would call {found.group(1)}"
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    reason = next((ln for ln in lines if not ln.startswith(skip)), "it holds more than tensors")
    return reason.removeprefix("WeightsUnpickler error:").strip()


_RESAVE = "re-save it as a plain state dict or as .safetensors"


def _load_error(path: str | Path, e: Exception, remedy: str = _RESAVE) -> CheckpointError:
    """The one-line error for a pickle checkpoint that torch.load(weights_only=True) rejected."""
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
        return UnsafeCheckpointError(
            f"{path} is refused: {_refusal_reason(str(e))}. convmaps loads .pt/.pth only with "
            f"weights_only=True (tensors and containers); {remedy}."
        )
    return CheckpointError(
        f"{path} is not a readable checkpoint ({type(e).__name__}: {_one_line(e)}); {remedy}."
    )


def _check_state(state: object, source: str | Path) -> dict[str, torch.Tensor]:
    """`state` if it is a state dict of ordinary (dense, CPU or GPU, not meta) tensors."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{source} does not hold a state dict (name -> tensor) but a {type(state).__name__}"
        )
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(
                f"{source} does not hold a state dict (name -> tensor): key {key!r} is not a name"
            )
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{source} does not hold a state dict (name -> tensor): {key!r} is of type "
                f"{type(value).__name__}, not a tensor"
            )
        if value.layout != torch.strided or value.is_meta:
            kind = "a meta tensor (no data)" if value.is_meta else f"a {value.layout} tensor"
            raise CheckpointError(
                f"{source}: {key} is {kind}; a checkpoint needs dense tensors with data"
            )
    return state


# Held while torchvision's loader is patched, so that two loads never interleave their patch
# and restore (which could leave the patch in place, or restore the wrong function).
_HUB_LOCK = threading.Lock()


@contextlib.contextmanager
def _weights_only_hub(cached: Path) -> Iterator[None]:
    """While active, torchvision's pretrained weights load with torch.load(weights_only=True).

    Every torchvision builder fetches its weights with the documented
    `weights.get_state_dict(progress=..., check_hash=True)`, which forwards its keyword
    arguments to `torch.hub.load_state_dict_from_url` (whose `weights_only` defaults to False).
    Wrapping that one method to force `weights_only=True` keeps everything else torchvision
    does: its cache under TORCH_HOME, the download and its hash check, and each builder's own
    post-processing (densenet's key renames, googlenet/inception dropping their aux heads,
    num_classes and transform_input from the weights' metadata). The alternatives are worse:
    calling get_state_dict ourselves and building with weights=None loses that
    post-processing; setting TORCH_FORCE_WEIGHTS_ONLY_LOAD mutates os.environ, which child
    processes inherit and which clashes with a user's TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD; patching
    torch.load changes every load in the process, not just torchvision's weights.
    tests/test_models.py checks that no classification builder loads weights another way.

    The patch is process-wide while it lasts: another thread that builds a pretrained
    torchvision model meanwhile also loads with weights_only=True (the safe direction). Hub
    prints "Downloading: ..." on stdout; that line (with anything other threads print
    meanwhile) is captured and re-emitted on stderr, and dropped when the load fails, so a
    failed offline load prints only its error.
    """
    enum = torchvision.models.WeightsEnum
    with _HUB_LOCK:
        original = enum.__dict__["get_state_dict"]

        def get_state_dict(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
            kwargs["weights_only"] = True  # even if a builder ever passes False
            kwargs.setdefault("map_location", "cpu")  # convmaps builds on the CPU
            try:
                with _quiet_pickle():
                    state = original(self, *args, **kwargs)
            except Exception as e:  # a damaged pickle raises nearly anything
                if not cached.exists():
                    raise  # not cached and not downloaded: _load_pretrained says what to do
                raise _load_error(cached, e, f"delete it, or replace it with {self.url}") from e
            return _check_state(state, f"cached weights {cached}")

        captured = io.StringIO()
        failed = True
        enum.get_state_dict = get_state_dict
        try:
            with contextlib.redirect_stdout(captured):
                yield
            failed = False
        finally:
            enum.get_state_dict = original
            lines = captured.getvalue().splitlines(keepends=True)
            sys.stderr.write("".join(
                ln for ln in lines if not (failed and ln.startswith("Downloading: "))
            ))


@contextlib.contextmanager
def _quiet_pickle() -> Iterator[None]:
    """torch's two-line warning about a pickle protocol it did not write: a file that is
    refused gets one clear line instead, and a file that loads needs no warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        yield


def _load_pretrained(arch: str, weights: Any) -> nn.Module:
    """Through torchvision's own weights API, so its cache (TORCH_HOME) and checks apply, but
    with weights_only=True (see _weights_only_hub)."""
    cached = _cached_file(weights.url)
    _is_file(cached, "cached weights", f"; delete it, or replace it with {weights.url}")
    try:
        # the builder loads the weights strictly: every parameter is replaced
        with _weights_only_hub(cached), _SkipInit():
            return torchvision.models.get_model(arch, weights=weights)
    except ConvmapsError:
        raise
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        # URLError is an OSError; a state dict that does not fit raises a RuntimeError
        if cached.exists():
            raise CheckpointError(f"cached weights {cached} do not load: {_one_line(e)}") from e
        raise WeightsUnavailableError(
            f"weights {arch} {weights.name} are not cached and could not be downloaded "
            f"({type(e).__name__}). Use --weights none, pass --weights PATH to a state dict, or "
            f"place {os.path.basename(weights.url)} in {cached.parent}"
        ) from e


def load_state_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict and its metadata from `.safetensors`, or `.pt/.pth` with weights_only=True.

    A pickle that needs anything beyond tensors and containers is refused; there is no unsafe
    fallback.
    """
    path = Path(path)
    if not _is_file(path, "checkpoint"):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file: {_one_line(e)}"
            ) from e
        return _check_state(state, path), meta
    if path.suffix not in (".pt", ".pth"):
        raise CheckpointError(
            f"{path}: checkpoints must end in {', '.join(_CHECKPOINT_SUFFIXES)}"
        )
    try:
        with _quiet_pickle():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged pickle raises nearly anything (KeyError for text)
        raise _load_error(path, e) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return _check_state(obj, path), {}


def _apply_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    if problems:
        raise CheckpointError(f"{source} does not fit the architecture; " + "; ".join(problems))
    model.load_state_dict(state)


def _num_classes(state: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    """The class count a checkpoint was trained for, from its last Linear layer."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    key = f"{linears[-1]}.weight"
    return int(state[key].shape[0]) if key in state else None


def preset(arch: str) -> Callable[[Any], torch.Tensor]:
    if arch == "lenet":
        return lenet_preset()
    transforms: Callable[[Any], torch.Tensor] = _weights_enum(arch).DEFAULT.transforms()
    return transforms


def _input_size(arch: str) -> tuple[int, int]:
    if arch == "lenet":
        return (28, 28)
    crop = getattr(_weights_enum(arch).DEFAULT.transforms(), "crop_size", [224])
    return (crop[0], crop[-1])


def _is_checkpoint(model: str) -> bool:
    return model.endswith(_CHECKPOINT_SUFFIXES) or os.sep in model


def load_model(model: str, weights: str | None = None, arch: str | None = None) -> LoadedModel:
    """Resolve MODEL and --weights/--arch into an eval-mode model on the CPU.

    Args:
        model: a torchvision classifier name, `lenet`, or a checkpoint path (with `arch`).
        weights: `DEFAULT`, a torchvision weights name, `none`, or a checkpoint path.
            Default: `DEFAULT` for torchvision models, the bundled checkpoint for `lenet`.
        arch: the architecture of a checkpoint MODEL (read from its metadata when absent).

    Raises:
        UnknownModelError, WeightsUnavailableError, CheckpointError, UnsafeCheckpointError.
    """
    if _is_checkpoint(model):
        state, meta = load_state_file(model)
        arch = arch or meta.get("arch")
        if not arch:
            raise CheckpointError(f"{model}: name its architecture with --arch (e.g. --arch vgg16)")
        weights_label, state_source = str(model), str(model)
    else:
        if arch and arch != model:
            raise UnknownModelError(f"--arch is for checkpoint files; {model!r} names a model")
        arch = _check_arch(model)
        spec = weights or ("bundled" if arch == "lenet" else "DEFAULT")
        state, meta, state_source = {}, {}, ""
        if spec.lower() == "none":
            weights_label = "none"
        elif arch == "lenet" and spec == "bundled":
            state, meta = load_state_file(bundled_lenet_path())
            weights_label, state_source = "bundled", "bundled LeNet-5"
        elif _is_checkpoint(spec):
            state, meta = load_state_file(spec)
            weights_label, state_source = spec, spec
        elif arch == "lenet":
            raise UnknownModelError(
                f"lenet weights {spec!r}: use the bundled default, none, or a checkpoint path"
            )
        else:
            chosen = _pick_weights(arch, spec)
            net = _load_pretrained(arch, chosen)
            return _finish(net, arch, chosen.name, {"weights_url": chosen.url})
    arch = _check_arch(arch)
    net = build(arch, init=not state)  # _apply_state checks that `state` covers every key
    classes = _num_classes(state, net) if state else None
    if classes is not None and classes != _num_classes(net.state_dict(), net):
        net = build(arch, classes, init=False)  # e.g. a LeNet trained for 4 classes
    if state:
        _apply_state(net, state, state_source)
    return _finish(net, arch, weights_label, meta)


def _finish(net: nn.Module, arch: str, weights: str, meta: dict[str, str]) -> LoadedModel:
    net.eval()
    first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    return LoadedModel(
        model=net,
        arch=arch,
        weights=weights,
        preprocess=preset(arch),
        input_size=_input_size(arch),
        in_channels=first.in_channels if first is not None else 3,
        meta=meta,
    )


def normalisation(preprocess: Callable[[Any], torch.Tensor]) -> tuple[list[float], list[float]]:
    """The (mean, std) a preprocessing preset normalises with, so that a preprocessed input
    can be drawn as the picture it came from: torchvision's `ImageClassification` presets
    carry them as attributes, a `Compose` (the LeNet preset) in its `Normalize` step. No
    normalisation is (0, 1)."""
    mean, std = getattr(preprocess, "mean", None), getattr(preprocess, "std", None)
    if mean is not None and std is not None:
        return [float(m) for m in mean], [float(s) for s in std]
    for step in getattr(preprocess, "transforms", []):
        if isinstance(step, T.Normalize | torchvision.transforms.Normalize):
            return [float(m) for m in step.mean], [float(s) for s in step.std]
    return [0.0], [1.0]

