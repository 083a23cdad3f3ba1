"""core.occlusion: the incremental pass against full forward passes of every occluded image."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from convmaps.core.models import lenet5
from convmaps.core.occlusion import corners, occlude, occluded
from convmaps.errors import ConvmapsError


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model.eval().double()


def _reference(model, image, patch, stride, fill, modules):
    """Every occluded image through the whole model, one at a time (no batching, no boxes)."""
    h, w = image.shape[1:]
    out: dict[str, list] = {"logits": []} | {m: [] for m in modules}

    def keep(name):
        return lambda _, __, o: out[name].append(o.detach().sum((2, 3))[0])

    hooks = [model.get_submodule(m).register_forward_hook(keep(m)) for m in modules]
    try:
        for y in corners(h, patch, stride):
            for x in corners(w, patch, stride):
                with torch.no_grad():
                    out["logits"].append(
                        model(occluded(image, [(y, y + patch, x, x + patch)], fill))[0])
    finally:
        for hook in hooks:
            hook.remove()
    ny, nx = len(corners(h, patch, stride)), len(corners(w, patch, stride))
    return {k: torch.stack(v).reshape(ny, nx, -1) for k, v in out.items()}


TINY = {
    # stride, padding, dilation, ceil_mode, avg pool, batch norm, an in-place ReLU, Tanh
    "tiny": lambda: nn.Sequential(
        nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.Conv2d(5, 6, 3, padding=2, dilation=2), nn.Tanh(),
        nn.AvgPool2d(2), nn.Conv2d(6, 4, (3, 1), stride=(1, 2)),
        nn.Flatten(), nn.LazyLinear(7)),
}


def _case(name):
    if name == "lenet":
        return _seeded(lenet5()), torch.randn(1, 28, 28, dtype=torch.double), ["C1", "C3"]
    if name == "tiny":
        model = TINY["tiny"]()
        model(torch.zeros(1, 3, 30, 27))  # the lazy linear's size
        return _seeded(model), torch.randn(3, 30, 27, dtype=torch.double), ["0", "4", "7"]
    arch = getattr(torchvision.models, name)(weights=None)
    return _seeded(arch), torch.randn(3, 67, 70, dtype=torch.double), ["features.0",
                                                                       "features.3"]


def _close(got, want, tol):
    """Equal to `tol` relative to the map's range (seeded weights make large values)."""
    assert got.shape == want.shape
    assert (got - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("name,patch,stride", [
    ("lenet", 4, 3), ("lenet", 9, 5), ("tiny", 4, 3), ("tiny", 9, 5), ("tiny", 27, 2),
    ("alexnet", 4, 13), ("alexnet", 16, 11), ("vgg11", 9, 13),
])
def test_incremental_equals_full_passes_in_float64(name, patch, stride):
    model, image, modules = _case(name)
    want = _reference(model, image, patch, stride, 0.3, modules)
    got = occlude(model, image, patch, stride, fill=0.3, modules=modules, batch_size=5)
    assert got.incremental
    _close(got.logits, want["logits"], 1e-10)
    for m in modules:
        _close(got.sums[m], want[m], 1e-10)


def test_the_first_full_module_is_named():
    model, image, _ = _case("alexnet")
    got = occlude(model, image, 9, 5)
    # 67 px: the 2x2 map after features.12 is covered by every patch's region at some layer,
    # or reaches the classifier's flatten; either way something ran in full
    assert got.full_from is not None


def test_float32_within_range_tolerance():
    model, image, modules = _case("alexnet")
    model, image = model.float(), image.float()
    want = _reference(model, image, 9, 13, 0.0, modules)
    got = occlude(model, image, 9, 13, modules=modules)
    _close(got.logits, want["logits"], 1e-5)


def test_non_chain_models_run_in_full_and_agree():
    model = _seeded(torchvision.models.resnet18(weights=None, num_classes=5))
    image = torch.randn(3, 40, 40, dtype=torch.double)
    got = occlude(model, image, 12, 10, modules=["layer1"])
    assert not got.incremental and got.full_from is None
    want = _reference(model, image, 12, 10, 0.0, ["layer1"])
    _close(got.logits, want["logits"], 1e-10)
    _close(got.sums["layer1"], want["layer1"], 1e-10)


def test_captum_grid():
    assert corners(10, 4, 3) == [0, 3, 6]  # ceil((10 - 4) / 3) + 1; the last cut at the edge
    assert corners(224, 16, 4)[-1] == 208 and len(corners(224, 16, 4)) == 53
    with pytest.raises(ConvmapsError, match="does not fit"):
        corners(8, 9, 1)


def test_the_model_is_left_as_found():
    model, image, _ = _case("lenet")
    model.train()
    occlude(model, image, 8, 8)
    assert all(m.training for m in model.modules())
