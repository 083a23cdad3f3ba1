"""A model as the chain of modules its forward pass runs one after the other (LeNet, AlexNet,
VGG, any `nn.Sequential`): what the DeconvNet down pass and incremental occlusion walk.

    >>> from convmaps.core.models import lenet5
    >>> [name for name, _ in steps(lenet5())][:3]
    ['C1', 'relu1', 'S2']
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models import VGG, AlexNet

from convmaps.errors import ConvmapsError

__all__ = ["ends", "steps"]


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
    found: dict[str, int] = {}
    for i, (name, _) in enumerate(chain):
        parts = name.split(".") if name else []
        for k in range(1, len(parts) + 1):
            found[".".join(parts[:k])] = i
    return found
