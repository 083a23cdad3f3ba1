"""Projections: the chain and autograd implementations against each other, against
torch.autograd.grad, and against results worked out by hand."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convmaps.core.capture import capture
from convmaps.core.deconv import (
    Method,
    Mode,
    Unit,
    output_shapes,
    parse_unit,
    project,
    project_each,
    project_jobs,
)
from convmaps.core.fields import fields
from convmaps.core.models import build, load_model
from convmaps.errors import ConvmapsError

METHODS = [Method.chain, Method.autograd]
F64 = torch.float64


def _double(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()


def _shake_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, so that BatchNorm is not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))  # type: ignore[union-attr]
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)  # type: ignore[union-attr]
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _reference_grad(model: nn.Module, image: torch.Tensor, module: str, channel: int,
                    position: tuple[int, int] | None) -> tuple[torch.Tensor, tuple | None]:
    """torch.autograd.grad of one unit on an untouched copy of the model: the module's first
    output is kept (the copy passed on, so later in-place ops cannot touch it)."""
    model = copy.deepcopy(model).eval()
    kept: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor | None:
        if kept:
            return None
        kept.append(out)
        return out.clone()

    handle = model.get_submodule(module).register_forward_hook(hook)
    x = image[None].clone().requires_grad_(True)
    model(x)
    handle.remove()
    out = kept[0][0]
    if out.dim() == 1:
        value = out[channel]
    else:
        plane = out[channel]
        if position is None:  # the strongest position, first in row-major order on ties
            best = plane.max()
            position = next((y, xx) for y in range(plane.shape[0])
                            for xx in range(plane.shape[1]) if plane[y, xx] == best)
        value = plane[position]
    (grad,) = torch.autograd.grad(value, x)
    return grad[0], position


# ------------------------------------------------------------- chain == autograd (float64)


@pytest.fixture(scope="module")
def alexnet64() -> nn.Module:
    return _double(build("alexnet"))


@pytest.fixture(scope="module")
def vgg11_64() -> nn.Module:
    return _double(build("vgg11"))


@pytest.fixture(scope="module")
def lenet64() -> nn.Module:
    return _double(load_model("lenet").model)


CASES = {
    # conv, ReLU, max-pool, the last pool, the adaptive avgpool, linear, the output
    "alexnet": ("alexnet64", (3, 64, 64), [
        "features.0:3", "features.1:4", "features.2:5@3,4", "features.3:7", "features.10:9",
        "features.12:11", "avgpool:2@4,1", "classifier.1:33", "classifier.6:5"]),
    "vgg11": ("vgg11_64", (3, 32, 32), [
        "features.0:3", "features.2:5", "features.8:7@1,2", "features.20:3", "avgpool:1@6,6",
        "classifier.0:100", "classifier.6:999"]),
    "lenet": ("lenet64", (1, 28, 28), [
        "C1:2", "relu1:2@5,5", "S2:3", "C3:7", "S4:15@2,3", "C5:100", "F6:40", "OUTPUT:3"]),
}


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("case", list(CASES))
def test_chain_and_autograd_agree(case, mode, request):
    fixture, shape, texts = CASES[case]
    model = request.getfixturevalue(fixture)
    image = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    shapes = output_shapes(model, shape)
    units = [parse_unit(t, model, shapes) for t in texts]
    chain = project(model, image, units, mode, method=Method.chain)
    auto = project(model, image, units, mode, method=Method.autograd)
    nonzero = 0
    for a, b in zip(chain, auto, strict=True):
        assert a.unit == b.unit and a.position == b.position and a.value == b.value
        assert a.map.dtype == F64 and a.map.shape == shape
        if b.map.abs().max() > 0:
            nonzero += 1
            assert _rel(a.map, b.map) < 1e-10, a.unit
        else:
            assert a.map.abs().max() == 0, a.unit
    assert nonzero >= len(units) - 1  # a dead ReLU unit may project to zero, not more


def _odd_chain() -> nn.Sequential:
    """Every chain rule in its less common forms: dilation, groups, uneven strides, padded and
    ceil-mode dilated max-pools, average pools, overlapping adaptive windows, BatchNorm."""
    torch.manual_seed(7)
    net = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2)),
        ("bn1", nn.BatchNorm2d(6)),
        ("relu1", nn.ReLU(inplace=True)),
        ("pool1", nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True)),
        ("conv2", nn.Conv2d(6, 4, (3, 2), stride=(1, 3), padding=(1, 0), groups=2)),
        ("relu2", nn.ReLU()),
        ("avg", nn.AvgPool2d(2, stride=1)),
        ("adaptive", nn.AdaptiveAvgPool2d((4, 3))),
        ("block", nn.Sequential(nn.Flatten(), nn.Dropout(), nn.Linear(48, 9), nn.ReLU())),
        ("out", nn.Linear(9, 4)),
    ])).double().eval()
    return _shake_batchnorm(net)


@pytest.mark.parametrize("mode", list(Mode))
def test_chain_rules_of_less_common_modules(mode):
    net = _odd_chain()
    image = torch.randn(3, 29, 23, dtype=F64, generator=torch.Generator().manual_seed(8))
    shapes = output_shapes(net, (3, 29, 23))
    # adaptive windows: 6 rows -> 4 overlap, 1 column -> 3 repeat it
    assert shapes["avg"][1:] == (6, 1) and shapes["adaptive"][1:] == (4, 3)
    alive = int(capture(net, image[None], ["block"])["block"][0].argmax())  # a ReLU output > 0
    units = [Unit(name, 1) for name in ("conv1", "bn1", "pool1", "conv2", "avg", "adaptive",
                                         "block.2", "out")] + [Unit("block", alive)]
    chain = project(net, image, units, mode, method=Method.chain)
    auto = project(net, image, units, mode, method=Method.autograd)
    for a, b in zip(chain, auto, strict=True):
        assert (a.position, a.value) == (b.position, b.value)
        assert b.map.abs().max() > 0, a.unit
        assert _rel(a.map, b.map) < 1e-10, a.unit


def test_conv_stride_that_does_not_divide_needs_output_padding(alexnet64):
    # conv1 maps 64 (+2*2 padding) to 15 with stride 4; transposing 15 gives only 61 rows
    assert (64 + 4 - 11) % 4 != 0
    image = torch.randn(3, 64, 64, dtype=F64)
    (p,) = project(alexnet64, image, [Unit("features.3", 0)], method=Method.chain)
    assert p.map.shape == (3, 64, 64)


# ------------------------------------------------- windows == whole maps, the reference


def _edge_units(model: nn.Module, shape: tuple[int, ...], modules: list[str]) -> list[Unit]:
    """Units of each module at its corners (windows cut by every image edge), its middle, and
    its strongest position (position None)."""
    shapes = output_shapes(model, shape)
    units = []
    for i, name in enumerate(modules):
        c, h, w = shapes[name]
        for j, where in enumerate([(0, 0), (h - 1, w - 1), (0, w - 1), (h // 2, w // 2), None]):
            units.append(Unit(name, (3 * i + j) % c, where))
    return units


def _tiny_chain() -> nn.Sequential:
    """Uneven strides, padding, groups, ceil_mode, a dilated pool, average pools and an
    adaptive pool of plain windows (which windows follow), on a non-square input (the odd
    chain has a dilated conv)."""
    torch.manual_seed(11)
    net = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(2, 6, (3, 5), stride=(2, 3), padding=(2, 1))),
        ("bn1", nn.BatchNorm2d(6)),
        ("relu1", nn.ReLU(inplace=True)),
        ("pool1", nn.MaxPool2d(2, stride=2, ceil_mode=True)),  # 13 -> 7: the last reads 1
        ("conv2", nn.Conv2d(6, 8, 3, padding=1, groups=2)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2, stride=1, dilation=2, ceil_mode=True)),
        ("avg", nn.AvgPool2d((2, 3), stride=(1, 2))),
        ("adaptive", nn.AdaptiveAvgPool2d((2, 1))),
        ("drop", nn.Dropout()),
        ("conv3", nn.Conv2d(8, 5, 1)),
    ])).double().eval()
    return _shake_batchnorm(net)


WINDOW_CASES = {
    "alexnet": ("alexnet64", (3, 64, 64), ["features.0", "features.2", "features.3",
                                           "features.8", "features.10", "features.12"]),
    "vgg11": ("vgg11_64", (3, 32, 32), ["features.0", "features.4", "features.8",
                                        "features.13", "features.18"]),
    "lenet": ("lenet64", (1, 28, 28), ["C1", "S2", "C3", "relu3", "S4"]),
    "tiny": ("tiny64", (2, 23, 31), ["conv1", "bn1", "pool1", "conv2", "pool2", "avg",
                                     "adaptive", "conv3"]),
    "odd": ("odd64", (3, 29, 23), ["conv1", "pool1", "conv2", "avg"]),
}


@pytest.fixture(scope="module")
def tiny64() -> nn.Module:
    return _tiny_chain()


@pytest.fixture(scope="module")
def odd64() -> nn.Module:
    return _odd_chain()


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_windows_equal_whole_maps(case, mode, request):
    """The chain on each unit's window gives the whole-map chain's maps (float64: 1e-10), and
    autograd's; trimmed, a map is its window, which holds the unit's receptive-field box."""
    fixture, shape, modules = WINDOW_CASES[case]
    model = request.getfixturevalue(fixture)
    images = torch.randn((2, *shape), dtype=F64, generator=torch.Generator().manual_seed(4))
    units = _edge_units(model, shape, modules)
    jobs = [(i % 2, u) for i, u in enumerate(units)]
    windowed = project_jobs(model, images, jobs, mode, batch_size=4, method=Method.chain)
    whole = project_jobs(model, images, jobs, mode, method=Method.chain, windowed=False)
    auto = project_jobs(model, images, jobs, mode, method=Method.autograd)
    trimmed = project_jobs(model, images, jobs, mode, batch_size=4, method=Method.chain,
                           trim=True)
    boxes = fields(model, shape)
    nonzero = cut = 0
    for a, b, c, t in zip(windowed, whole, auto, trimmed, strict=True):
        assert (a.position, a.value) == (b.position, b.value) == (t.position, t.value)
        assert a.map.shape == shape and a.origin == (0, 0)
        if b.map.abs().max() == 0:
            assert a.map.abs().max() == 0, a.unit
            continue
        nonzero += 1
        assert _rel(a.map, b.map) < 1e-10, a.unit
        assert _rel(a.map, c.map) < 1e-10, a.unit
        # the trimmed map is the same map, cut to a window that holds the box
        (y, x), (h, w) = t.origin, t.map.shape[-2:]
        top, left, bottom, right = boxes[a.unit.module].box(*a.position)
        assert y <= top and x <= left and bottom <= y + h and right <= x + w, a.unit
        if case in ("alexnet", "vgg11", "lenet"):  # no dilation: the box is the window
            assert (y, x, y + h, x + w) == (top, left, bottom, right), a.unit
        cut += (h, w) != shape[1:]
        placed = torch.zeros(shape[0], shape[1] + 2 * h, shape[2] + 2 * w, dtype=F64)
        placed[:, h + y:2 * h + y, w + x:2 * w + x] = t.map
        assert torch.equal(placed[:, h:h + shape[1], w:w + shape[2]], a.map), a.unit
        assert torch.count_nonzero(placed) == torch.count_nonzero(a.map)  # 0 off the image
    assert nonzero >= len(units) // 2 and cut >= 5  # at least the first module's


@pytest.mark.parametrize("name,shape", [("alexnet", (3, 224, 224)), ("vgg11", (3, 64, 64))])
def test_windows_equal_whole_maps_in_float32(name, shape):
    """Float32, random weights (weights none): every mode to 1e-5 of the largest value."""
    model = build(name).eval()
    image = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    units = _edge_units(model, shape, [convs[0], convs[2], convs[-1]])
    for mode in Mode:
        windowed = project(model, image, units, mode, method=Method.chain)
        whole = project(model, image, units, mode, method=Method.chain, windowed=False)
        for a, b in zip(windowed, whole, strict=True):
            assert a.map.dtype == torch.float32 and a.value == b.value
            torch.testing.assert_close(a.map, b.map, rtol=0,
                                       atol=1e-5 * float(b.map.abs().max()))


def test_linear_units_and_windows_in_one_chunk(alexnet64):
    """Units of 1-D outputs go down over whole maps beside windowed ones, in slices of
    batch_size seeds however many an image has."""
    images = torch.randn(3, 3, 64, 64, dtype=F64, generator=torch.Generator().manual_seed(9))
    units = [Unit("features.10", c) for c in range(5)] + [Unit("classifier.4", c)
                                                        for c in range(5)]
    jobs = [(i % 3, u) for i, u in enumerate(units * 2)]
    for mode in Mode:
        small = project_jobs(alexnet64, images, jobs, mode, batch_size=2, method=Method.chain)
        whole = project_each(alexnet64, images[[i for i, _ in jobs]], [u for _, u in jobs],
                             mode, method=Method.chain, windowed=False)
        for a, b in zip(small, whole, strict=True):
            assert (a.unit, a.position) == (b.unit, b.position)
            assert math.isclose(a.value, b.value, rel_tol=1e-9, abs_tol=1e-12)  # other batches
            assert _rel(a.map, b.map) < 1e-10, a.unit


@pytest.mark.parametrize("method", METHODS)
def test_jobs_run_each_image_forward_once(alexnet64, method):
    """project_jobs: an image with many jobs runs forward once (the chain: however many jobs;
    autograd: once per batch_size of them), and gives what one row per job gives."""
    images = torch.randn(3, 3, 64, 64, dtype=F64, generator=torch.Generator().manual_seed(10))
    which = [0, 2, 2, 1, 0, 2, 0, 0, 2, 1, 2, 2]
    units = [Unit(f"features.{(3, 6, 10)[i % 3]}", i) for i in range(len(which))]
    rows: list[int] = []
    handle = alexnet64.features[0].register_forward_hook(lambda m, a, o: rows.append(len(a[0])))
    try:
        got = project_jobs(alexnet64, images, list(zip(which, units, strict=True)), Mode.guided,
                           batch_size=3, method=method)
    finally:
        handle.remove()
    if method == Method.chain:
        assert sum(rows) == 3
    else:
        assert sum(rows) == sum(math.ceil(which.count(i) / 3) for i in range(3))
    each = project_each(alexnet64, images[which], units, Mode.guided, method=method,
                        windowed=False)
    for a, b in zip(got, each, strict=True):
        assert (a.unit, a.position) == (b.unit, b.position)
        assert math.isclose(a.value, b.value, rel_tol=1e-9, abs_tol=1e-12)
        assert _rel(a.map, b.map) < 1e-12, a.unit
    with pytest.raises(ConvmapsError, match="job image 3 is not among the 3 images"):
        project_jobs(alexnet64, images, [(3, units[0])])


# ----------------------------------------------------- gradient mode == torch.autograd.grad


class _Functional(nn.Module):
    """ReLUs in every form the forward code of real models uses: a shared in-place module
    called twice, F.relu, torch.relu_, Tensor.relu."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 8, 3, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2)
        self.fc = nn.Linear(8 * 2 * 2, 5)  # for 13x13 inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = F.relu(self.pool(x), inplace=False)
        x = self.conv2(x)
        x = torch.relu_(x)
        x = self.relu(self.conv3(x))
        x = torch.flatten(x, 1).relu()
        return self.fc(x)


def _functional_as_sequential(model: _Functional) -> nn.Sequential:
    """The same computation written as a chain of modules."""
    return nn.Sequential(OrderedDict([
        ("conv1", model.conv1), ("relu1", nn.ReLU()), ("pool", model.pool), ("relu2", nn.ReLU()),
        ("conv2", model.conv2), ("relu3", nn.ReLU()), ("conv3", model.conv3),
        ("relu4", nn.ReLU()), ("flatten", nn.Flatten()), ("relu5", nn.ReLU()), ("fc", model.fc),
    ]))


def _gradient_cases() -> list[tuple[str, tuple[int, ...], list[str]]]:
    return [
        ("alexnet", (3, 64, 64), ["features.0:3", "features.3:5@2,2", "features.10:9",
                                  "classifier.6:5"]),
        ("resnet18", (3, 32, 32), ["conv1:3", "layer1.0.conv2:5", "layer1.0.bn2:4",
                                   "layer1.1:7", "layer2.1.bn2:1@2,2", "layer4:11", "fc:9"]),
        ("functional", (3, 13, 13), ["conv1:2", "conv2:3@1,1", "conv3:4", "fc:2"]),
    ]


def _gradient_model(name: str) -> nn.Module:
    if name == "functional":
        torch.manual_seed(0)
        return _Functional().double().eval()
    return _shake_batchnorm(_double(build(name)))


@pytest.mark.parametrize("name,shape,texts", _gradient_cases())
def test_gradient_mode_is_autograd_grad(name, shape, texts):
    """One unit at a time, autograd's own backward kernels run: bit for bit the reference. In a
    batch (and in the chain) the sums may run in another order: equal to 1e-12."""
    model = _gradient_model(name)
    image = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    shapes = output_shapes(model, shape)
    units = [parse_unit(t, model, shapes) for t in texts]
    methods = [Method.chain, Method.autograd] if name == "alexnet" else [Method.autograd]
    for method in methods:
        batched = project(model, image, units, Mode.gradient, method=method)
        for p in batched:
            expected, position = _reference_grad(model, image, p.unit.module, p.unit.channel,
                                                 p.unit.position)
            assert p.position == position
            assert expected.abs().max() > 0, p.unit
            assert _rel(p.map, expected) < 1e-12, (method, p.unit)
            if method == Method.autograd:
                (alone,) = project(model, image, [p.unit], Mode.gradient, method=method)
                assert torch.equal(alone.map, expected), p.unit


@pytest.mark.parametrize("mode", list(Mode))
def test_functional_and_reused_relus_behave_as_modules(mode):
    """A shared in-place ReLU, F.relu, torch.relu_ and Tensor.relu, projected by autograd, give
    what the chain gives on the same network written as a Sequential of ReLU modules."""
    model = _gradient_model("functional")
    seq = _functional_as_sequential(model)
    image = torch.randn(3, 13, 13, dtype=F64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(image[None]), seq(image[None]), rtol=0, atol=0)
    units = [Unit("conv2", 3), Unit("conv3", 4), Unit("fc", 2)]
    got = project(model, image, units, mode, method=Method.autograd)
    expected = project(seq, image, units, mode, method=Method.chain)
    for a, b in zip(got, expected, strict=True):
        assert b.map.abs().max() > 0
        assert _rel(a.map, b.map) < 1e-10, a.unit
    assert model.relu.inplace is True


# ----------------------------------------------------------------- results worked by hand


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("position", [(0, 0), (5, 7), (14, 14)])
def test_conv1_seed_is_the_filter_in_place(alexnet64, method, position):
    """d out[c, y, x] / d in[:, u, v] = W[c, :, u - y*s + p, v - x*s + p]: the filter itself,
    not flipped, with its corner at (y*s - p, x*s - p), cut at the image's edges."""
    conv = alexnet64.features[0]
    s, p, k = conv.stride[0], conv.padding[0], conv.kernel_size[0]
    y, x = position
    canvas = torch.zeros(3, 64 + 2 * k, 64 + 2 * k, dtype=F64)
    top, left = y * s - p + k, x * s - p + k  # offset by k: the canvas has a k-pixel margin
    canvas[:, top : top + k, left : left + k] = conv.weight[6]
    expected = canvas[:, k : k + 64, k : k + 64]
    image = torch.randn(3, 64, 64, dtype=F64)
    for mode in Mode:
        (got,) = project(alexnet64, image, [Unit("features.0", 6, position)], mode,
                         method=method)
        assert got.position == position
        assert torch.equal(got.map, expected), mode


def _hand_net() -> tuple[nn.Sequential, torch.Tensor]:
    lin1 = nn.Linear(3, 4)
    lin2 = nn.Linear(4, 2)
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[1.0, 2, 0], [0, -1, 1], [2, 0, -1], [1, 1, 1]]))
        lin1.bias.copy_(torch.tensor([0.0, 0, 0, -10]))  # h = [5, 1, -1, -4]: mixed signs
        lin2.weight.copy_(torch.tensor([[3.0, -2, -5, 7], [1, 1, 1, 1]]))
    net = nn.Sequential(nn.Flatten(), lin1, nn.ReLU(), lin2).double()
    return net, torch.tensor([[[1.0, 2, 3]]], dtype=F64)  # a (1, 1, 3) "image"


@pytest.mark.parametrize("method", METHODS)
def test_relu_rules_by_hand(method):
    net, image = _hand_net()
    w1 = net[1].weight.detach()
    h = net[1](image.flatten()[None])[0]
    assert torch.equal(h, torch.tensor([5.0, 1, -1, -4], dtype=F64))
    signal = torch.tensor([3.0, -2, -5, 7], dtype=F64)  # W2 row 0, the seed through lin2
    on = (h > 0).double()
    expected = {
        Mode.gradient: (signal * on) @ w1,  # [3, -2, 0, 0] @ w1
        Mode.deconvnet: signal.clamp(min=0) @ w1,  # [3, 0, 0, 7] @ w1: whatever the forward did
        Mode.guided: (signal.clamp(min=0) * on) @ w1,  # [3, 0, 0, 0] @ w1
    }
    assert len({tuple(v.tolist()) for v in expected.values()}) == 3
    for mode, want in expected.items():
        (got,) = project(net, image, [Unit("3", 0)], mode, method=method)
        assert got.value == float(net(image)[0, 0].detach())
        assert torch.equal(got.map.flatten(), want), mode


@pytest.mark.parametrize("method", METHODS)
def test_overlapping_pool_windows_add(method):
    """MaxPool 3/2 over 5 columns: windows 0-2 and 2-4 both choose column 2. The signal there is
    the sum of both (max_unpool2d would keep only one of them)."""
    fc = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[2.0, 3.0]]))
    net = nn.Sequential(nn.MaxPool2d(3, 2), nn.Flatten(), fc).double()
    image = torch.tensor([[[0.0, 1, 9, 1, 0], [0, 0, 0, 0, 0], [1, 0, 2, 0, 1]]], dtype=F64)
    for mode in Mode:
        (got,) = project(net, image, [Unit("2", 0)], mode, method=method)
        expected = torch.zeros_like(image)
        expected[0, 0, 2] = 5.0
        assert torch.equal(got.map, expected), mode
        assert got.value == 2 * 9 + 3 * 9


@pytest.mark.parametrize("method", METHODS)
def test_bias_never_enters(method):
    """With no ReLU or max-pool below the unit, nothing in the forward pass can change the
    projection: new biases (and BN means) must give the same map, in every mode."""
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.AvgPool2d(2),
        nn.Conv2d(4, 3, 2), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Dropout(), nn.Linear(27, 5),
    ).double().eval()
    _shake_batchnorm(net)
    other = copy.deepcopy(net)
    with torch.no_grad():
        for m in other.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.add_(torch.randn_like(m.bias) * 10)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(5.0)  # type: ignore[operator]
    image = torch.randn(2, 16, 16, dtype=F64)
    units = [Unit("0", 1, (3, 4)), Unit("3", 2, (1, 1)), Unit("7", 4)]
    for mode in Mode:
        a = project(net, image, units, mode, method=method)
        b = project(other, image, units, mode, method=method)
        for p, q in zip(a, b, strict=True):
            assert p.value != q.value
            assert p.map.abs().max() > 0
            assert torch.equal(p.map, q.map), (mode, p.unit)


@pytest.mark.parametrize("method", METHODS)
def test_bias_of_the_unit_layer_does_not_enter(alexnet64, method):
    """The unit's own bias moves its value, never its projection (even through ReLUs below)."""
    image = torch.randn(3, 64, 64, dtype=F64)
    for unit in [Unit("features.10", 5, (1, 2)), Unit("classifier.6", 8)]:
        other = copy.deepcopy(alexnet64)
        with torch.no_grad():
            other.get_submodule(unit.module).bias.add_(3.0)
        for mode in Mode:
            (p,) = project(alexnet64, image, [unit], mode, method=method)
            (q,) = project(other, image, [unit], mode, method=method)
            assert q.value == pytest.approx(p.value + 3.0, rel=1e-12)
            assert p.map.abs().max() > 0
            assert torch.equal(p.map, q.map), (mode, unit)


def test_deconvnet_is_signed(alexnet64):
    image = torch.randn(3, 64, 64, dtype=F64)
    for method in METHODS:
        for p in project(alexnet64, image, [Unit("features.3", 5), Unit("classifier.6", 1)],
                         Mode.deconvnet, method=method):
            assert p.map.min() < 0 < p.map.max()


@pytest.mark.parametrize("method", METHODS)
def test_ties_pick_the_first_spatial_maximum(method):
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
    net = nn.Sequential(conv).double()
    image = torch.zeros(1, 4, 5, dtype=F64)
    image[0, 2, 1] = image[0, 0, 4] = image[0, 3, 0] = 7.0  # flat 11, 4, 15: the first is 4
    image[0, 1, 3] = image[0, 3, 3] = -2.0  # channel 1's maxima (2) at flat 8 and 18
    ones = torch.zeros_like(image)
    (a, b) = project(net, image, [Unit("0", 0), Unit("0", 1)], Mode.gradient, method=method)
    assert (a.position, a.value) == ((0, 4), 7.0)
    assert (b.position, b.value) == ((1, 3), 2.0)
    ones[0, 0, 4] = 1.0
    assert torch.equal(a.map, ones)


# ------------------------------------------------------------------------------ batching


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_one_by_one(alexnet64, method):
    g = torch.Generator().manual_seed(5)
    images = torch.randn(4, 3, 64, 64, dtype=F64, generator=g)
    units = [Unit("features.10", c) for c in range(0, 40, 3)] + [Unit("features.3", 2, (1, 1)),
                                                              Unit("classifier.4", 17)]
    together = project(alexnet64, images[0], units, Mode.guided, batch_size=64, method=method)
    small = project(alexnet64, images[0], units, Mode.guided, batch_size=3, method=method)
    for p, q, u in zip(together, small, units, strict=True):
        (alone,) = project(alexnet64, images[0], [u], Mode.guided, method=method)
        for other in (q, alone):
            assert (p.unit, p.position) == (other.unit, other.position)
            # batch size changes a threaded GEMM's summation order: float64 low bits only
            assert math.isclose(p.value, other.value, rel_tol=1e-12)
            assert _rel(other.map, p.map) < 1e-12
    # different images, several units each, in mixed order: the plan groups them in chunks
    which = [0, 3, 1, 0, 2, 3, 3, 1, 0]
    each_units = [units[i % len(units)] for i in range(len(which))]
    each = project_each(alexnet64, images[which], each_units, Mode.deconvnet, batch_size=4,
                        method=method)
    for i, p in zip(which, each, strict=True):
        (alone,) = project(alexnet64, images[i], [p.unit], Mode.deconvnet, method=method)
        assert p.position == alone.position
        assert math.isclose(p.value, alone.value, rel_tol=1e-12)
        assert _rel(alone.map, p.map) < 1e-12


def test_auto_picks_the_chain_only_for_chains(alexnet64):
    image = torch.randn(3, 64, 64, dtype=F64)
    units = [Unit("features.10", 1)]
    auto = project(alexnet64, image, units)
    assert torch.equal(auto[0].map, project(alexnet64, image, units, method=Method.chain)[0].map)
    model = _gradient_model("functional")
    with pytest.raises(ConvmapsError, match="not a sequential chain"):
        project(model, torch.randn(3, 13, 13, dtype=F64), [Unit("fc", 1)], method=Method.chain)
    project(model, torch.randn(3, 13, 13, dtype=F64), [Unit("fc", 1)])  # auto: autograd


# ------------------------------------------------------------------------ dtype and state


def test_computes_in_the_image_dtype_and_leaves_the_model_alone():
    model = build("alexnet").eval()
    image = torch.randn(3, 64, 64)
    (p32,) = project(model, image, [Unit("features.3", 1)])
    assert p32.map.dtype == torch.float32
    (p64,) = project(model, image.double(), [Unit("features.3", 1)])  # float32 model
    (ref,) = project(_double(model), image.double(), [Unit("features.3", 1)])
    assert p64.map.dtype == F64 and torch.equal(p64.map, ref.map)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(p32.map, ref.map.float(), rtol=1e-4, atol=1e-6)


def _state(model: nn.Module) -> dict[str, object]:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
        "inplace": [getattr(m, "inplace", None) for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                  for m in model.modules()],
    }


def _assert_same(before: dict[str, object], model: nn.Module) -> None:
    after = _state(model)
    for key in ("training", "inplace", "requires_grad", "grads", "hooks"):
        assert before[key] == after[key], key
    old, new = before["tensors"], after["tensors"]
    assert isinstance(old, dict) and isinstance(new, dict) and old.keys() == new.keys()
    for k in old:
        assert torch.equal(old[k], new[k]), k


@pytest.mark.parametrize("method", METHODS)
def test_model_is_left_as_found(method):
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )
    _shake_batchnorm(model)
    model.train()
    model[4].eval()  # mixed flags must come back mixed
    model[0].bias.requires_grad_(False)
    before = _state(model)
    image = torch.randn(3, 8, 8)
    for mode in Mode:
        project(model, image, [Unit("1", 2), Unit("6", 1)], mode, method=method)
    with pytest.raises(ConvmapsError):
        project(model, image, [Unit("1", 9)], method=method)
    _assert_same(before, model)


def test_resnet_is_left_as_found():
    model = _shake_batchnorm(build("resnet18"))
    model.train()
    before = _state(model)
    project(model, torch.randn(3, 32, 32), [Unit("layer2", 3), Unit("fc", 1)])
    _assert_same(before, model)


# ---------------------------------------------------------------------------------- units


@pytest.fixture(scope="module")
def lenet_shapes(lenet64):
    return output_shapes(lenet64, (1, 28, 28))


def test_parse_unit_forms(lenet64, lenet_shapes):
    assert parse_unit("C3:4", lenet64, lenet_shapes) == Unit("C3", 4)
    assert parse_unit("3:4@9,0", lenet64, lenet_shapes) == Unit("C3", 4, (9, 0))  # SPEC index
    assert parse_unit(" OUTPUT : 9 ", lenet64, lenet_shapes) == Unit("OUTPUT", 9)
    assert str(Unit("C3", 4, (9, 0))) == "C3:4@9,0"


@pytest.mark.parametrize("text,message", [
    ("C3:16", r"C3 has output \(16, 10, 10\); the channel must be in 0-15"),
    ("C3:2@10,0", r"y must be in 0-9, x in 0-9"),
    ("C3:2@0,10", r"y must be in 0-9, x in 0-9"),
    ("OUTPUT:10", r"the index must be in 0-9"),
    ("F6:1@0,0", r"which is 1-D; write F6:I, I in 0-83"),
    ("C3", r"is not MODULE:C"),
    ("C3:-1", r"is not MODULE:C"),
    ("C9:1", r"no layer 'C9'"),
    ("conv:1", r"'conv' names 3 modules"),
    ("99:1", r"no layer '99'"),
])
def test_bad_units_are_one_line_errors(lenet64, lenet_shapes, text, message):
    with pytest.raises(ConvmapsError, match=message) as info:
        parse_unit(text, lenet64, lenet_shapes)
    assert "\n" not in str(info.value)


def test_a_module_that_runs_twice_is_refused():
    model = build("resnet18")
    shapes = output_shapes(model, (3, 32, 32))
    with pytest.raises(ConvmapsError, match="layer1.0.relu runs more than once"):
        parse_unit("layer1.0.relu:1", model, shapes)
    assert parse_unit("relu:1", model, shapes) == Unit("relu", 1)  # the stem's runs once


@pytest.mark.parametrize("method", METHODS)
def test_project_checks_units_against_the_real_output(lenet64, method):
    image = torch.randn(1, 28, 28, dtype=F64)
    for unit, message in [(Unit("C3", 16), "0-15"), (Unit("C3", 1, (0, 10)), "x in 0-9"),
                          (Unit("OUTPUT", 3, (0, 0)), "1-D")]:
        with pytest.raises(ConvmapsError, match=message) as info:
            project(lenet64, image, [unit], method=method)
        assert "\n" not in str(info.value)
    with pytest.raises(ConvmapsError, match="one image"):
        project(lenet64, image[None], [Unit("C3", 1)])


@pytest.mark.parametrize("method", METHODS)
def test_works_under_no_grad_and_inference_mode(lenet64, method):
    image = torch.randn(1, 28, 28, dtype=F64)
    (want,) = project(lenet64, image, [Unit("C3", 1)], method=method)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            (got,) = project(lenet64, image.clone(), [Unit("C3", 1)], method=method)
        assert torch.equal(got.map, want.map)
