"""core.occlusion: the incremental pass against full forward passes of every occluded image."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from convmaps.core.models import lenet5
from convmaps.core.occlusion import corners, method, occlude, occluded
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


@pytest.mark.parametrize("name", ["alexnet", "resnet18"])
def test_float32_within_range_tolerance(name):
    if name in GRAPHS:
        make, size, modules = GRAPHS[name]
        model, image = _seeded(make(), 1).float(), torch.randn(3, size, size)
    else:
        model, image, modules = _case(name)
        model, image = model.float(), image.float()
    want = _reference(model, image, 9, 13, 0.0, modules)
    got = occlude(model, image, 9, 13, modules=modules)
    _close(got.logits, want["logits"], 1e-5)
    for m in modules:
        _close(got.sums[m], want[m], 1e-5)


GRAPHS = {
    # residual adds (and a 1x1 stride-2 branch beside two 3x3 convs), GoogLeNet's
    # concatenations with in-place F.relu and ceil-mode pools, DenseNet's growing
    # concatenations and average pools, MobileNetV2's depthwise convs, ReLU6 and adds
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=5),
                 96, ["layer1", "layer2.0.downsample", "layer2"]),
    "googlenet": (lambda: torchvision.models.googlenet(weights=None, num_classes=5,
                                                       aux_logits=False, init_weights=False),
                  96, ["inception3a", "inception3b.branch2"]),
    "densenet121": (lambda: torchvision.models.densenet121(weights=None, num_classes=5),
                    64, ["features.denseblock1", "features.transition1"]),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None, num_classes=5),
                     64, ["features.2", "features.4"]),
}


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_traced_graphs_equal_full_passes_in_float64(name):
    make, size, modules = GRAPHS[name]
    model = _seeded(make(), 1)
    image = torch.randn(3, size, size, dtype=torch.double)
    got = occlude(model, image, 16, 24, fill=0.3, modules=modules, batch_size=4)
    assert got.incremental
    want = _reference(model, image, 16, 24, 0.3, modules)
    _close(got.logits, want["logits"], 1e-10)
    for m in modules:
        _close(got.sums[m], want[m], 1e-10)
    assert "no rule" not in method(model)  # every op of these has a rule


class _Shuffled(nn.Module):
    """A channel shuffle (reshape, transpose) between two convs: ops without a rule."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.a(x))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(self.b(x).mean((2, 3)))


class _Branchy(nn.Module):
    """A forward that branches on its input's values: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:
            x = x * 2
        return self.head(x.mean((2, 3)))


def test_ops_without_a_rule_run_in_full_and_agree():
    model = _seeded(_Shuffled())
    image = torch.randn(3, 20, 20, dtype=torch.double)
    said = method(model)
    assert said.startswith("incremental") and "no rule for" in said
    assert "transpose" in said and "view" in said and "Conv2d" not in said
    got = occlude(model, image, 5, 4, modules=["a", "b"])
    assert got.incremental and got.full_from == "view"  # the first op a patch met with no rule
    want = _reference(model, image, 5, 4, 0.0, ["a", "b"])
    _close(got.logits, want["logits"], 1e-10)
    _close(got.sums["b"], want["b"], 1e-10)


def test_models_that_do_not_trace_run_in_full_and_agree():
    model = _seeded(_Branchy())
    image = torch.randn(3, 20, 20, dtype=torch.double)
    assert method(model).startswith("full passes (_Branchy cannot be traced")
    got = occlude(model, image, 6, 5, modules=["a"])
    assert not got.incremental and got.full_from is None
    want = _reference(model, image, 6, 5, 0.0, ["a"])
    _close(got.logits, want["logits"], 1e-10)
    _close(got.sums["a"], want["a"], 1e-10)


class _Head(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


class _TrailingUnderscore(nn.Module):
    """In place by torch's trailing underscore, with no inplace flag (the results used)."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.d, self.h = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3), _Head(4)

    def forward(self, x):
        a = self.c(x).relu_()
        return self.h(torch.relu_(self.d(a)).add_(1.0))


class _Reread(nn.Module):
    """An in-place ReLU's input read again after it: eager mode reads the overwritten values."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.d, self.h = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), \
            _Head(4)

    def forward(self, x):
        a = self.c(x)
        b = torch.nn.functional.relu(a, inplace=True)
        return self.h(self.d(b) + a)


class _ReadsItsResult(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.h = nn.Conv2d(3, 4, 3), _Head(4)

    def forward(self, x):
        y = self.h(self.c(x))
        torch._assert(y.shape[1] == 5, "5 classes")
        return y


EDGES = {
    # name: (model, modules, patch, stride, incremental)
    "trailing underscore": (_TrailingUnderscore, ["c", "d"], 3, 2, True),
    "reread after in place": (_Reread, ["c"], 3, 2, False),  # exact by full passes
    "a container and its child end together": (
        lambda: nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), _Head(4)),
        ["0", "0.1"], 3, 2, True),
    "an empty Sequential": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(), _Head(4)), ["1"], 3, 2,
        False),
    "adaptive (None, 11)": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d((None, 11)), _Head(4)),
        [], 3, 2, True),
    "the result read again": (_ReadsItsResult, [], 3, 2, True),
    "stride past the patch": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), _Head(4)), ["0"], 1, 5,
                              True),
    "batch statistics": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(
        4, track_running_stats=False), _Head(4)), [], 3, 2, True),
}


@pytest.mark.parametrize("name", sorted(EDGES))
def test_edge_cases_equal_the_real_model(name):
    make, modules, patch, stride, incremental = EDGES[name]
    model = make()
    torch.manual_seed(3)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    model = model.eval().double()
    image = torch.randn(3, 11, 13, dtype=torch.double)
    got = occlude(model, image, patch, stride, fill=0.5, modules=modules, batch_size=3)
    assert got.incremental is incremental
    if name == "reread after in place":
        assert method(model) == "full passes (the input of the in-place relu is read again " \
            "after it)"
    if name == "batch statistics":  # the maps then depend on the batch: the same batches
        want = occlude(model, image, patch, stride, fill=0.5, batch_size=3, incremental=False)
        _close(got.logits, want.logits, 1e-10)
        return
    want = _reference(model, image, patch, stride, 0.5, modules)
    _close(got.logits, want["logits"], 1e-10)
    for m in modules:
        _close(got.sums[m], want[m], 1e-10)


def test_a_model_that_returns_a_tuple_is_refused_in_one_line():
    class Pair(nn.Module):
        def forward(self, x):
            return x.mean((2, 3)), x

    with pytest.raises(ConvmapsError, match="returns one tensor of class scores; Pair returns "
                                            "tuple"):
        occlude(Pair(), torch.rand(3, 8, 8), 4, 4)


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
