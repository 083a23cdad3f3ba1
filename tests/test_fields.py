"""Receptive fields: known values, perturbation on tiny models, and the product path (interval
composition) against an independent surrogate backward pass on torchvision's CNNs."""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from convmaps.core.fields import Field, box, fields
from convmaps.core.models import build
from convmaps.errors import ConvmapsError, UnknownLayerError


def _clip(b: tuple[int, int, int, int], h: int, w: int) -> tuple[int, int, int, int]:
    return max(b[0], 0), max(b[1], 0), min(b[2], h), min(b[3], w)


def _meta_model(arch: str) -> nn.Module:
    """A torchvision model without the cost of its random init (geometry needs no weights)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                return torchvision.models.get_model(arch, weights=None).eval()
        except NotImplementedError:  # RegNet computes its widths with real tensors
            return build(arch, init=False).eval()


# ---------------------------------------------------------------------------------------------
# Known values (from the literature, and worked by hand)


def test_alexnet_known_values():
    f = fields(_meta_model("alexnet"), (3, 224, 224))
    assert f["features.10"].size == (163, 163) and f["features.10"].jump == (16, 16)
    assert f["features.12"].size == (195, 195) and f["features.12"].jump == (32, 32)
    assert f["features.7"].box(6, 6) == (62, 62, 161, 161)
    assert f["features.0"].box(0, 0) == (-2, -2, 9, 9)  # 11x11, stride 4, padding 2
    assert f["classifier.6"] == Field(size=(224, 224), jump=(0, 0), offset=(0, 0))
    assert box(_meta_model("alexnet"), (3, 224, 224), "features.7", 6, 6) == (62, 62, 161, 161)


def test_dilation_by_hand():
    # stride-2 conv: size 3, jump 2, offset -1; then k=3, dilation 2, padding 2: the taps of
    # position 0 are -2, 0, 2 -> input rows [-1 - 2*2, -1 + 2*2 + 3) = [-5, 6)
    net = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1),
                        nn.Conv2d(1, 1, 3, dilation=2, padding=2),
                        nn.Conv2d(1, 1, (1, 3), dilation=(1, 3)))
    f = fields(net, (1, 20, 20))
    assert f["1"] == Field((11, 11), (2, 2), (-5, -5), shape=(10, 10), dims=(1, 2))
    # (1, 3) kernel with column dilation 3: columns reach 2*3 jumps of 2 further
    assert f["2"].size == (11, 23) and f["2"].offset == (-5, -5) and f["2"].shape == (10, 4)
    assert f["2"].box(3, 1) == (1, -3, 12, 20)


def test_same_padding_even_kernel_is_asymmetric():
    # torch pads d*(k-1) = 3 for k=4: one before, two after
    f = fields(nn.Sequential(nn.Conv2d(1, 1, (4, 2), padding="same")), (1, 9, 7))
    assert f["0"].box(0, 0) == (-1, 0, 3, 2) and f["0"].shape == (9, 7)


def test_vectorised_boxes_match_box():
    f = fields(_meta_model("alexnet"), (3, 200, 232))["features.5"]
    pos = torch.tensor([[[0, 0], [3, 7]], [[11, 13], [-1, 20]]])
    got = f.boxes(pos)
    assert got.shape == (2, 2, 4) and got.dtype == torch.int64
    for idx in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        y, x = pos[idx].tolist()
        assert tuple(got[idx].tolist()) == f.box(y, x)


# ---------------------------------------------------------------------------------------------
# Tiny models, checked by perturbation in float64


class _Graph(nn.Module):
    """Residual add, a concatenation of branches with different fields, an uneven adaptive pool,
    a squeeze-excitation product, an NHWC linear, a channel shuffle and an asymmetric pad."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, (1, 5), padding=(0, 4), dilation=(1, 2))
        self.down = nn.Conv2d(8, 6, 1, stride=2)
        self.main = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.pad = nn.ZeroPad2d((1, 2, 0, 3))
        self.se = nn.Conv2d(6, 6, 1)
        self.adapt = nn.AdaptiveAvgPool2d((3, 4))
        self.mlp = nn.Linear(6, 6)
        self.pad2 = nn.ConstantPad2d((-1, 0, 2, -1), 0.0)
        self.last = nn.Conv2d(6, 3, 2, padding="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.stem(x)))
        x = torch.cat([self.a(x), self.b(x)], 1)
        x = self.main(x) + self.down(x)
        x = self.pad(x)
        x = x * self.se(x.mean((2, 3), keepdim=True))  # no sigmoid: it saturates
        x1, x2 = x.chunk(2, dim=1)
        x = torch.cat([x2, x1], 1).view(len(x), 2, 3, *x.shape[2:]).transpose(1, 2).reshape(x.shape)
        x = self.adapt(x)
        x = self.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.last(self.pad2(x))


class _Shapes(nn.Module):
    """Indexing and concatenation along the spatial axes (the two halves of the rows swapped),
    a strided column slice, movedim, a squeezed global max and expand."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c1(x)
        half = x.shape[2] // 2
        x = torch.cat([x[:, :, half:], x[:, :, :half]], 2)[..., 1::2]
        x = torch.movedim(F.relu(torch.movedim(x, 1, -1)), -1, 1)
        y = self.c2(x)
        g = x.amax(dim=(2, 3))[:, :, None].unsqueeze(3)
        return self.c3(y[:, :, 1:-1] + g.expand(-1, -1, y.shape[2] - 2, y.shape[3]) * 1e-3)


def _chain() -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("c1", nn.Conv2d(2, 3, 3, stride=2, padding=1)),
        ("r1", nn.ReLU()),
        ("p1", nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)),
        ("c2", nn.Conv2d(3, 3, 3, padding=3, dilation=3)),
        ("p2", nn.AvgPool2d(2, 2, padding=1, ceil_mode=True)),
        ("c3", nn.Conv2d(3, 2, (2, 4), padding="same")),
        ("zp", nn.ZeroPad2d((2, 0, 1, 3))),
        ("c4", nn.Conv2d(2, 2, 3, stride=(1, 2))),
        ("ap", nn.AdaptiveAvgPool2d((4, 3))),
        ("flat", nn.Flatten()),
        ("fc", nn.Linear(24, 3)),
    ]))


def _positive(net: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    net = net.double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(0.5, 1.0)
    return net


def _units(net: nn.Module, name: str, x: torch.Tensor, f: Field,
           positions: list[tuple[int, int]]) -> torch.Tensor:
    """The outputs of module `name` at the given positions (summed over channels) for each
    image of the batch x: (N, len(positions))."""
    got: list[torch.Tensor] = []
    handle = net.get_submodule(name).register_forward_hook(lambda m, a, o: got.append(o))
    try:
        with torch.no_grad():
            net(x)
    finally:
        handle.remove()
    out = got[0]
    assert f.dims is not None
    cols = []
    for y, xx in positions:
        idx: list[Any] = [slice(None)] * (out.dim() - 1)
        idx[f.dims[0]], idx[f.dims[1]] = y, xx
        cols.append(out[(slice(None), *idx)].reshape(len(x), -1).sum(1))
    return torch.stack(cols, 1)


def _edges(b: tuple[int, int, int, int], h: int, w: int) -> list[tuple[Any, Any]]:
    """The box's edge lines (row or column index, span) that lie within the image."""
    t, le, bo, r = _clip(b, h, w)
    lines: list[tuple[Any, Any]] = []
    if 0 <= b[0] < h:
        lines.append((b[0], slice(le, r)))
    if 0 < b[2] <= h:
        lines.append((b[2] - 1, slice(le, r)))
    if 0 <= b[1] < w:
        lines.append((slice(t, bo), b[1]))
    if 0 < b[3] <= w:
        lines.append((slice(t, bo), b[3] - 1))
    return lines


def _agrees(b: tuple[int, int, int, int], support: tuple[int, int, int, int], h: int, w: int
            ) -> bool:
    """The support lies in the box, and reaches each edge of the box that lies in the image.
    (An edge beyond the image may sit further out than any real pixel: a dilated tap that
    lands in the padding counts its virtual pixels.)"""
    c = _clip(b, h, w)
    inside = c[0] <= support[0] and c[1] <= support[1] and support[2] <= c[2] \
        and support[3] <= c[3]
    tight = [(b[0] >= 0, support[0] == b[0]), (b[1] >= 0, support[1] == b[1]),
             (b[2] <= h, support[2] == b[2]), (b[3] <= w, support[3] == b[3])]
    return inside and all(ok for within, ok in tight if within)


@pytest.mark.parametrize("make,size", [(_chain, (2, 37, 29)), (_Graph, (2, 41, 38)),
                                       (_Shapes, (2, 30, 27))])
def test_perturbation_outside_never_changes_inside_edges_do(make, size):
    net = _positive(make())
    f = fields(net, size)
    _, h, w = size
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((1, *size), generator=gen, dtype=torch.float64) + 0.5
    edges_seen = 0
    for name, field in f.items():
        if field.dims is None:
            assert field.box(0, 0) == (0, 0, h, w)
            continue
        n_rows, n_cols = field.shape
        positions = sorted({(0, 0), (n_rows - 1, n_cols - 1), (n_rows // 2, n_cols // 3)})
        if "Pad" in type(net.get_submodule(name)).__name__:
            # a pad's own padding positions depend on no pixel; their box is the geometric one
            # they would have if the map went on (see convmaps.core.fields), so test a real position
            positions = [(n_rows // 2, n_cols // 2)]
        base = _units(net, name, x, field, positions)
        outside, probes = [], []
        for k, (y, xx) in enumerate(positions):
            b = field.box(y, xx)
            t, le, bo, r = _clip(b, h, w)
            # everything outside the box re-drawn (twice), and everything re-drawn
            z = torch.rand((3, *size), generator=gen, dtype=torch.float64) * 5
            z[:2, :, t:bo, le:r] = x[0, :, t:bo, le:r]
            outside.append(z)
            # a large value added along each edge line of the box that lies in the image: with
            # positive weights some pixel of it reaches the unit (through max pools too)
            for line in _edges(b, h, w):
                z = x.clone()
                z[(0, slice(None), *line)] += 1e6
                probes.append((k, str(line), z))
        same = _units(net, name, torch.cat(outside), field, positions)
        real = []
        for k, pos in enumerate(positions):
            assert torch.equal(same[3 * k:3 * k + 2, k], base[:, k].expand(2)), (name, pos)
            # a unit that sees only padding depends on no pixel; its box is geometric
            real.append(bool(same[3 * k + 2, k] != base[0, k]))
        if not probes:
            continue  # every box reaches past all four edges
        moved = _units(net, name, torch.cat([z for *_, z in probes]), field, positions)
        missed = [(positions[k], line) for i, (k, line, _) in enumerate(probes)
                  if real[k] and moved[i, k] == base[0, k]]
        assert not missed, (name, missed)
        edges_seen += sum(real[k] for k, *_ in probes)
    assert edges_seen > 20


def test_graph_fields_by_hand():
    f = fields(_Graph(), (2, 41, 38))
    # stem: size 3 jump 2 offset -1; pool k3 s2 p1: size 7, jump 4, offset -3
    assert f["pool"] == Field((7, 7), (4, 4), (-3, -3), shape=(11, 10), dims=(1, 2))
    # branch b: columns, taps -4, -2, 0, 2, 4 -> 7 + 8*4 = 39, offset -3 - 16
    assert f["b"].size == (7, 39) and f["b"].offset == (-3, -19)
    # the SE product makes every position see the union of the whole padded map
    assert not f["mlp"].affine and f["mlp"].dims == (0, 1)  # (H, W, C)
    assert len({f["mlp"].box(y, x) for y in range(3) for x in range(4)}) == 1
    assert f["adapt"].rows is not None and f["last"].shape == (4, 3)


def test_shapes_fields_by_hand():
    f = fields(_Shapes(), (2, 30, 27))
    # c1 (15x14): rows [2i-1, 2i+2); the cat's rows 0-7 are c1's rows 7-14, then rows 0-6;
    # the slice keeps c1's columns 1, 3, …: [4j+1, 4j+4)
    assert f["c1"].box(8, 1) == (15, 1, 18, 4)
    c2 = f["c2"]
    assert not c2.affine and c2.shape == (15, 7)
    # at the seam: cat rows 6, 7, 8 are c1's rows 13, 14, 0; column -1 is padding
    assert c2.box(7, 0) == (-1, -3, 30, 8)
    assert f["c3"].box(0, 0)[0] < 0 and f["c3"].shape == (13, 7)


def test_unknown_functions_are_reported_or_left_out():
    class Roll(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.roll(x, 1, dims=3)

    net = nn.Sequential(nn.Conv2d(1, 1, 3), Roll(), nn.Conv2d(1, 1, 3))
    with pytest.raises(ConvmapsError, match="receptive field of 1: cannot follow roll"):
        fields(net, (1, 9, 9))
    assert sorted(fields(net, (1, 9, 9), strict=False)) == ["0"]
    wrap = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular"))
    with pytest.raises(ConvmapsError, match="cannot follow pad \\(circular padding\\)"):
        fields(wrap, (1, 9, 9))
    # reflect padding counts as virtual pixels, like zeros
    reflect = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    assert fields(reflect, (1, 9, 9))["0"].box(0, 0) == (-1, -1, 2, 2)


def test_fields_left_out_are_logged_once(caplog: pytest.LogCaptureFixture):
    class Roll(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.roll(x, 1, dims=3)

    net = nn.Sequential(nn.Conv2d(1, 1, 3), Roll(), nn.Conv2d(1, 1, 3), nn.ReLU())
    with caplog.at_level(logging.WARNING, logger="convmaps"):
        assert sorted(fields(net, (1, 9, 9), strict=False)) == ["0"]
    [record] = caplog.records
    assert record.name == "convmaps" and record.levelno == logging.WARNING
    assert record.getMessage() == "no receptive field for 1, 2, 3 (cannot follow roll)"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="convmaps"):
        fields(nn.Sequential(nn.Conv2d(1, 1, 3)), (1, 9, 9), strict=False)
    assert not caplog.records  # nothing left out, nothing said


def test_box_errors():
    net = _chain()
    with pytest.raises(UnknownLayerError, match="no module named 'c9'"):
        box(net, (2, 37, 29), "c9", 0, 0)
    with pytest.raises(ConvmapsError, match="outside c1's 19×15 output"):
        box(net, (2, 37, 29), "c1", 19, 0)
    with pytest.raises(ConvmapsError, match="give \\(C, H, W\\)"):
        fields(net, (37, 29))  # type: ignore[arg-type]


def test_fields_leave_the_model_as_found(tiny_cnn):
    tiny_cnn.train()
    tiny_cnn.relu2.eval()
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    flags = [(m.training, getattr(m, "inplace", None)) for m in tiny_cnn.modules()]
    f = fields(tiny_cnn, (3, 10, 10))
    assert f["conv2"].box(0, 0) == (-3, -3, 6, 6) and f["conv2"].box(1, 1) == (1, 1, 10, 10)
    assert f["fc"].dims is None
    assert flags == [(m.training, getattr(m, "inplace", None)) for m in tiny_cnn.modules()]
    assert all(torch.equal(before[k], v) for k, v in tiny_cnn.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_cnn.modules())


def test_shared_module_gets_a_key_per_call():
    relu = nn.ReLU()

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.relu, self.c2 = nn.Conv2d(1, 1, 3), relu, nn.Conv2d(1, 1, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.c2(self.relu(self.c1(x))))

    f = fields(Twice(), (1, 12, 12))
    assert f["relu"].size == (3, 3) and f["relu@1"].size == (5, 5)


# ---------------------------------------------------------------------------------------------
# Independent check: support of a one-hot backward pass through a positive surrogate


_IDENTITY = {"batch_norm", "layer_norm", "group_norm", "instance_norm", "relu", "relu6",
             "hardtanh", "sigmoid", "hardsigmoid", "hardswish", "silu", "gelu", "dropout"}


class _Surrogate(TorchFunctionMode):
    """Uniform positive conv/linear weights without bias, average pools for max pools, the
    identity for norms and nonlinearities, ones for any other parameter: every path from an input
    pixel to a unit then carries a positive gradient, so the gradient's support is exactly the
    set of pixels that can influence it."""

    def __init__(self, params: set[int]) -> None:
        super().__init__()
        self.params = params

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        args = list(args)

        def get(i: int, key: str, default: Any) -> Any:
            return args[i] if len(args) > i else kwargs.get(key, default)

        if name == "conv2d":
            # uniform weights: each output channel is the box-filtered sum of its group's input
            # channels, computed as one single-channel conv per group (float64 grouped convs
            # are slow on the CPU)
            x, w, groups = args[0], get(1, "weight", None), get(6, "groups", 1)
            n, c, h, wd = x.shape
            xs = x.reshape(n, groups, c // groups, h, wd).sum(2).reshape(n * groups, 1, h, wd)
            box = torch.full((1, 1, *w.shape[-2:]), 1.0 / w[0].numel(), dtype=torch.float64)
            y = F.conv2d(xs, box, None, get(3, "stride", 1), get(4, "padding", 0),
                         get(5, "dilation", 1))
            shape = y.shape[-2:]
            return y.reshape(n, groups, 1, *shape).expand(
                n, groups, w.shape[0] // groups, *shape).reshape(n, w.shape[0], *shape).contiguous()
        if name == "linear":
            w = get(1, "weight", None)
            return F.linear(args[0], torch.full(w.shape, 1.0 / w.shape[1], dtype=torch.float64))
        if name == "max_pool2d":
            assert get(4, "dilation", 1) in (1, (1, 1), [1, 1])
            y = F.avg_pool2d(args[0], get(1, "kernel_size", None), get(2, "stride", None),
                             get(3, "padding", 0), get(5, "ceil_mode", False))
            return (y, torch.zeros_like(y, dtype=torch.int64)) if get(
                6, "return_indices", False) else y
        if name == "adaptive_max_pool2d":
            return F.adaptive_avg_pool2d(args[0], get(1, "output_size", None))
        if name in _IDENTITY:
            return args[0]

        def swap(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and id(v) in self.params:
                return torch.ones(v.shape, dtype=torch.float64)
            return v

        return func(*[swap(a) for a in args], **{k: swap(v) for k, v in kwargs.items()})


def _surrogate_boxes(model: nn.Module, size: tuple[int, int, int],
                     seeds: dict[str, tuple[Field, list[tuple[int, int]]]]
                     ) -> dict[tuple[str, int, int], tuple[int, int, int, int]]:
    """Bounding box of the input-gradient support of each seed (channels summed)."""
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:  # first call only
            if name not in outputs:
                outputs[name] = (out[0] if isinstance(out, tuple) else out).clone()

        return hook

    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in seeds]
    params = {id(t) for t in [*model.parameters(), *model.buffers()]}
    x = (torch.rand((1, *size), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64) + 0.5).requires_grad_()
    try:
        with _Surrogate(params):
            model(x)
    finally:
        for h in handles:
            h.remove()
    found = {}
    for name, (field, positions) in seeds.items():
        out = outputs[name][0]
        assert field.dims is not None
        for y, xx in positions:
            idx: list[Any] = [slice(None)] * out.dim()
            idx[field.dims[0]], idx[field.dims[1]] = y, xx
            (grad,) = torch.autograd.grad(out[tuple(idx)].sum(), x, retain_graph=True)
            support = (grad[0] != 0).any(0)
            rows = support.any(1).nonzero()[:, 0]
            cols = support.any(0).nonzero()[:, 0]
            found[(name, y, xx)] = (int(rows.min()), int(cols.min()), int(rows.max()) + 1,
                                    int(cols.max()) + 1)
    return found


def _check_model(arch: str, size: tuple[int, int, int], per_model: int) -> None:
    model = _meta_model(arch)
    f = fields(model, size)
    maps = [k for k, v in f.items() if v.dims is not None and "@" not in k]
    step = max(1, len(maps) // per_model)
    chosen = maps[step - 1::step][:per_model] + maps[-1:]
    seeds = {}
    for i, name in enumerate(chosen):
        n_rows, n_cols = f[name].shape
        corner = [(0, 0), (n_rows // 2, n_cols // 2), (n_rows - 1, n_cols - 1),
                  (0, n_cols - 1)][i % 4]
        seeds[name] = (f[name], [corner])
    got = _surrogate_boxes(model, size, seeds)
    for (name, y, x), support in got.items():
        assert _agrees(f[name].box(y, x), support, *size[1:]), (arch, name, y, x, support)
    # the model is left as found: its parameters are still on their device, in eval mode
    assert not model.training


FAST = {  # one or two of each family, at sizes that keep the float64 surrogate quick
    "alexnet": 224, "vgg11": 112, "resnet18": 128, "resnext50_32x4d": 96, "squeezenet1_0": 160,
    "densenet121": 64, "googlenet": 96, "inception_v3": 160, "mobilenet_v2": 96,
    "mobilenet_v3_small": 128, "mnasnet0_5": 96, "shufflenet_v2_x0_5": 128,
    "efficientnet_b0": 96, "efficientnet_v2_s": 96, "regnet_y_400mf": 96, "regnet_x_400mf": 96,
    "convnext_tiny": 64,
}
SLOW = sorted(
    set(torchvision.models.list_models(module=torchvision.models)) - set(FAST)
    - {n for n in torchvision.models.list_models(module=torchvision.models)
       if n.startswith(("vit_", "swin_", "maxvit"))}
)


@pytest.mark.parametrize("arch", sorted(FAST))
def test_fields_match_surrogate_backward(arch):
    _check_model(arch, (3, FAST[arch], FAST[arch]), per_model=6)


@pytest.mark.slow
@pytest.mark.parametrize("arch", SLOW)  # every other CNN classifier: ~30 s in all
def test_fields_match_surrogate_backward_every_cnn(arch):
    _check_model(arch, (3, 128, 128), per_model=8)
