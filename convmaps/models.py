"""Models: the registry of names, torchvision weights, safe checkpoints and the bundled LeNet-5.

    >>> from convmaps.models import load_model
    >>> lm = load_model("lenet")
    >>> lm.model.C1
    Conv2d(1, 6, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2))
"""

from __future__ import annotations

import difflib
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable
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
    UnknownModelError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
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
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
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


def _load_pretrained(arch: str, weights: Any) -> nn.Module:
    """Through torchvision's own weights API, so its cache (TORCH_HOME) and checks apply."""
    cached = _cached_file(weights.url)
    try:
        with _SkipInit():  # the builder loads the weights strictly: every parameter is replaced
            return torchvision.models.get_model(arch, weights=weights)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        # URLError is an OSError; a damaged cached file raises the others
        if cached.exists():
            raise CheckpointError(f"cached weights {cached} do not load: {e}") from e
        raise WeightsUnavailableError(
            f"weights {arch} {weights.name} are not cached and could not be downloaded "
            f"({type(e).__name__}). Use --weights none, pass --weights PATH to a state dict, or "
            f"place {os.path.basename(weights.url)} in {cached.parent}"
        ) from e


def _refused_globals(e: Exception) -> str:
    msg = str(e)
    for line in msg.splitlines():
        if "GLOBAL" in line or "Unsupported global" in line:
            return line.strip()
    return msg.splitlines()[0] if msg else type(e).__name__


def load_state_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict and its metadata from `.safetensors`, or `.pt/.pth` with weights_only=True.

    A pickle that needs anything beyond tensors and containers is refused; there is no unsafe
    fallback.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if path.suffix not in (".pt", ".pth"):
        raise CheckpointError(
            f"{path}: checkpoints must end in {', '.join(_CHECKPOINT_SUFFIXES)}"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path} is refused: it is not a plain state dict ({_refused_globals(e)}). "
            "convmaps loads .pt/.pth only with weights_only=True; re-save it as a state dict "
            "or as .safetensors."
        ) from e
    except (RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (name -> tensor)")
    return obj, {}


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


def _preset(arch: str) -> Callable[[Any], torch.Tensor]:
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
        preprocess=_preset(arch),
        input_size=_input_size(arch),
        in_channels=first.in_channels if first is not None else 3,
        meta=meta,
    )
