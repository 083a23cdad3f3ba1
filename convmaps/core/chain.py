"""A model as the chain of modules its forward pass runs one after the other (LeNet, AlexNet,
VGG, any `nn.Sequential`): what the DeconvNet down pass walks; and the windows a conv or pool
reads, which incremental occlusion grows its boxes by.

    >>> from convmaps.core.models import lenet5
    >>> [name for name, _ in steps(lenet5())][:3]
    ['C1', 'relu1', 'S2']
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models import VGG, AlexNet

from convmaps.core.fields import _pair
from convmaps.core.graph import last_inside
from convmaps.errors import ConvmapsError

__all__ = ["Window", "ends", "steps", "window"]


def _flat(seq: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, child in seq.named_children():
        if isinstance(child, nn.Sequential):
            out += _flat(child, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", child))
    return out


def steps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) in the order the forward pass runs them; nested Sequentials flattened.

    Raises:
        ConvmapsError: the model is not such a chain.
    """
    if type(model) in (AlexNet, VGG):  # forward: features, avgpool, torch.flatten, classifier
        return [
            *_flat(model.features, "features."),  # type: ignore[arg-type]
            ("avgpool", model.get_submodule("avgpool")),
            ("", nn.Flatten()),  # the torch.flatten call in forward(); no unit can name it
            *_flat(model.classifier, "classifier."),  # type: ignore[arg-type]
        ]
    if isinstance(model, nn.Sequential):
        return _flat(model, "")
    raise ConvmapsError(
        f"{type(model).__name__} is not a sequential chain (nn.Sequential, AlexNet, VGG)"
    )


def ends(chain: Sequence[tuple[str, nn.Module]]) -> dict[str, int]:
    """Module name -> the step whose output is that module's output (containers: their last)."""
    parts = [name.split(".") if name else [] for name, _ in chain]
    return last_inside([[".".join(p[:k]) for k in range(1, len(p) + 1)] for p in parts])


# Per axis (kernel, stride, padding, dilation): output o reads input o*stride - padding +
# t*dilation, t < kernel.
Window = tuple[tuple[int, int, int, int], tuple[int, int, int, int]]


def window(module: nn.Module) -> Window | None:
    """The windows a conv or pool reads, per axis; None for any other module, and for those
    whose windows are not plain (a conv padded other than with zeros or by a 'same'/'valid'
    word, an average pool that pads or rounds up)."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        k, s, p, d = (_pair(module.kernel_size), _pair(module.stride), _pair(module.padding),
                      _pair(module.dilation))
    elif isinstance(module, nn.MaxPool2d):
        k, s = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        p, d = _pair(module.padding), _pair(module.dilation)
    elif isinstance(module, nn.AvgPool2d):
        if module.padding not in (0, (0, 0)) or module.ceil_mode:
            return None  # padded averages count the padding or not; not worth the cases
        k, s = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        p, d = (0, 0), (1, 1)
    else:
        return None
    return (k[0], s[0], p[0], d[0]), (k[1], s[1], p[1], d[1])
