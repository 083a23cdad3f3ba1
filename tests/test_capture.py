from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from convmaps.core import capture as capture_module
from convmaps.core.capture import capture, layer_table, list_layers, modules_run, select, trace
from convmaps.core.models import build, load_model
from convmaps.errors import ConvmapsError, UnknownLayerError

from .conftest import recompute


def _check_chain(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [layer.name for layer in list_layers(model)]
    got = capture(model, x, names)
    assert list(got) == names
    modules = dict(model.named_modules())
    prev = x
    for name in names:
        if prev.dim() > got[name].dim():  # torch.flatten in the model's forward code
            prev = prev.flatten(1)
        expected = recompute(modules[name], prev)
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-5, msg=name)
        prev = got[name]
    return got


def test_inplace_relu_does_not_overwrite_conv_output(tiny_cnn):
    x = torch.randn(2, 3, 10, 10)
    got = capture(tiny_cnn, x, ["conv1", "relu1"])
    expected = F.conv2d(x, tiny_cnn.conv1.weight, tiny_cnn.conv1.bias, padding=1)
    assert (got["conv1"] < 0).any(), "a conv output must keep its negatives"
    torch.testing.assert_close(got["conv1"], expected)
    torch.testing.assert_close(got["relu1"], expected.clamp(min=0))
    assert tiny_cnn.relu1.inplace is True  # restored afterwards


def test_chain_tiny(tiny_cnn):
    _check_chain(tiny_cnn, torch.randn(3, 3, 10, 10))


@pytest.mark.parametrize("arch,shape", [("alexnet", (2, 3, 96, 96)), ("vgg11", (2, 3, 32, 32))])
def test_chain_torchvision(arch, shape):
    model = build(arch).eval()
    got = _check_chain(model, torch.randn(shape))
    assert (got["features.0"] < 0).any()


def test_chain_bundled_lenet():
    model = load_model("lenet").model
    got = _check_chain(model, torch.randn(4, 1, 28, 28))
    assert set(got) >= {"C1", "relu1", "S2", "C3", "relu3", "S4", "C5", "relu5", "F6", "OUTPUT"}


def test_hooks_removed_and_mode_restored_even_on_error(tiny_cnn):
    tiny_cnn.train()
    with pytest.raises(ConvmapsError, match="forward pass failed in conv1"):
        capture(tiny_cnn, torch.randn(1, 2, 10, 10), ["conv1"])
    capture(tiny_cnn, torch.randn(1, 3, 10, 10), ["conv1", "fc"])
    assert tiny_cnn.training
    for m in tiny_cnn.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


class _Residual(nn.Module):
    """Forward code that modifies a submodule's output in place, as ResNet's `out += x`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y += x
        return y


def test_inplace_in_forward_code_is_detected():
    torch.manual_seed(0)
    model = _Residual().eval()
    x = torch.randn(1, 2, 6, 6)
    got = capture(model, x, ["conv"])
    torch.testing.assert_close(got["conv"], F.conv2d(x, model.conv.weight, model.conv.bias,
                                                     padding=1))


def test_shared_module_called_twice_gets_two_keys():
    relu = nn.ReLU()
    model = nn.Sequential()
    model.add_module("relu", relu)
    model.add_module("lin", nn.Linear(3, 3))
    model.forward = lambda x: relu(model.lin(relu(x)))  # type: ignore[method-assign]
    x = torch.randn(2, 3)
    got = trace(model, x, ["relu"], ["relu"])
    assert set(got.outputs) == {"relu", "relu@1"}
    torch.testing.assert_close(got.inputs["relu"], x)
    torch.testing.assert_close(got.outputs["relu@1"], model.lin(x.clamp(min=0)).clamp(min=0))


def test_select_grammar():
    model = build("alexnet")
    names = lambda spec, **kw: [x.name for x in select(model, spec, **kw)]  # noqa: E731
    assert names("0,3") == ["features.0", "features.3"]
    assert names("3,0,3") == ["features.0", "features.3"]  # model order, once each
    assert names("0-2") == ["features.0", "features.1", "features.2"]
    assert names("features.3,classifier.1") == ["features.3", "classifier.1"]
    assert names("pool") == ["features.2", "features.5", "features.12", "avgpool"]
    assert names("conv") == [f"features.{i}" for i in (0, 3, 6, 8, 10)]
    assert len(names("linear")) == 3
    assert len(names(None)) == len(names("all")) == 21
    assert names("all", conv_only=True) == names("conv")


def test_select_lenet_names():
    model = build("lenet")
    assert [x.name for x in select(model, "C3,0")] == ["C1", "C3"]
    assert [x.name for x in select(model, "relu")] == ["relu1", "relu3", "relu5", "relu6"]


@pytest.mark.parametrize("spec", ["13", "5-99", "features.99", "convolution"])
def test_select_unknown_lists_what_exists(spec):
    with pytest.raises(UnknownLayerError) as e:
        select(build("alexnet"), spec)
    msg = str(e.value)
    assert "indices 0-12" in msg and "features.3" in msg and "conv" in msg
    assert "\n" not in msg


def test_select_conv_only_refuses_other_layers():
    with pytest.raises(UnknownLayerError, match="--kernels takes conv layers only; features.1"):
        select(build("alexnet"), "0,1", conv_only=True, flag="--kernels")


def _conv_out(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@pytest.mark.parametrize("arch,size", [("alexnet", 224), ("vgg11", 64), ("lenet", 28),
                                       ("alexnet", 127)])
def test_layer_table_matches_real_forward(arch, size):
    model = build(arch).eval()
    channels = 1 if arch == "lenet" else 3
    rows = layer_table(model, (channels, size, size))
    real = trace(model, torch.randn(1, channels, size, size), [r.name for r in rows],
                 [r.name for r in rows])
    for r in rows:
        assert r.out_shape == tuple(real.outputs[r.name].shape[1:]), r.name
        assert r.in_shape == tuple(real.inputs[r.name].shape[1:]), r.name
        module = model.get_submodule(r.name)
        assert r.params == sum(p.numel() for p in module.parameters())
        if isinstance(module, nn.Conv2d):
            h = _conv_out(r.in_shape[1], module.kernel_size[0], module.stride[0],
                          module.padding[0], module.dilation[0])
            w = _conv_out(r.in_shape[2], module.kernel_size[1], module.stride[1],
                          module.padding[1], module.dilation[1])
            assert r.out_shape == (module.out_channels, h, w)
            km = torch.empty(module.out_channels, module.in_channels // module.groups, h, w)
            assert r.kernel_map_bytes == km.numel() * 4


def test_layer_table_indices():
    rows = layer_table(build("alexnet"), (3, 224, 224))
    assert [r.index for r in rows[:13]] == list(range(13))
    assert rows[13].name == "avgpool" and rows[13].index is None


# --- the model comes back exactly as found ---------------------------------------------------


def _state(model: nn.Module) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]],
                                       dict[str, torch.Tensor]]:
    """Every submodule's training flag, every inplace flag, and a copy of every buffer."""
    modules = list(model.named_modules())
    return ([(n, m.training) for n, m in modules],
            [(n, m.inplace) for n, m in modules if hasattr(m, "inplace")],
            {k: v.clone() for k, v in model.named_buffers()})


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so equal means bit-identical (NaN and -0.0 included)."""
    return t.reshape(-1).view(torch.uint8)


def _assert_same_state(model: nn.Module, before) -> None:
    flags, inplace, buffers = _state(model)
    assert flags == before[0]
    assert inplace == before[1]
    assert buffers.keys() == before[2].keys()
    for k, v in buffers.items():
        assert v.dtype == before[2][k].dtype and torch.equal(_bits(v), _bits(before[2][k])), k
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def _mixed_bn_model() -> nn.Sequential:
    """Submodules with mixed training flags, BatchNorm (buffers) and a mixed set of inplace."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=False),
                          nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a model that trains
    model[6].eval()
    with torch.no_grad():  # non-trivial running stats, so a changed one shows
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("call", ["trace", "capture", "layer_table", "select", "list_layers",
                                  "failing_trace"])
def test_every_capture_function_leaves_the_model_as_found(call):
    model = _mixed_bn_model()
    before = _state(model)
    x = torch.randn(2, 3, 8, 8)
    names = [n for n, _ in model.named_modules() if n]
    if call == "trace":
        trace(model, x, names, names)
    elif call == "capture":
        capture(model, x, names)
    elif call == "layer_table":
        layer_table(model, (3, 8, 8))
    elif call == "select":
        select(model, "all")
    elif call == "list_layers":
        list_layers(model)
    else:
        with pytest.raises(ConvmapsError):
            capture(model, torch.randn(2, 5, 8, 8), names)
    _assert_same_state(model, before)
    # The model still behaves as a training model would: its BatchNorm in train mode moves.
    model(x)
    assert not torch.equal(model[4].running_mean, before[2]["4.running_mean"])
    assert torch.equal(model[1].running_mean, before[2]["1.running_mean"])


def test_layer_table_leaves_vgg11_bn_as_found_and_its_next_forward_unchanged():
    model = build("vgg11_bn").eval()
    before = _state(model)
    layer_table(model, (3, 32, 32))
    _assert_same_state(model, before)
    model(torch.randn(1, 3, 32, 32))  # in eval mode, so BatchNorm must not move its stats
    _assert_same_state(model, before)


class _MovesBuffer(nn.Module):
    """A module whose eval-mode forward changes a buffer in place and replaces another."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("last", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        self.last = x.detach()[0, :3].clone()
        return x * 2


def test_buffers_changed_by_forward_code_are_restored_in_place():
    model = nn.Sequential(_MovesBuffer())
    count, last = model[0].count, model[0].last
    trace(model, torch.randn(2, 3), ["0"])
    assert model[0].count is count and model[0].last is last
    assert count.item() == 0 and torch.equal(last, torch.zeros(3))


# --- forward failures are one line --------------------------------------------------------


class _Asserts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Identity(), _Check())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _Check(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == 4, f"Wrong width! Expected 4 but got {x.shape[-1]}"
        return x


class _TopAsserts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.lin(x)  # a module ran and returned, then the model's own code fails
        raise KeyError("no such head")


@pytest.mark.parametrize("model,where,words", [
    (_Asserts(), "inner.1", "Wrong width! Expected 4 but got 5"),
    (_TopAsserts(), "_TopAsserts's own forward code", "'no such head'"),
])
def test_any_forward_exception_becomes_one_line_naming_module_and_shape(model, where, words):
    x = torch.randn(2, 5) if isinstance(model, _Asserts) else torch.randn(2, 4)
    for fn in (lambda: capture(model, x, ["inner" if isinstance(model, _Asserts) else "lin"]),
               lambda: layer_table(model, tuple(x.shape[1:]))):
        with pytest.raises(ConvmapsError) as e:
            fn()
        msg = str(e.value)
        assert f"forward pass failed in {where} for input (" in msg and words in msg, msg
        assert "\n" not in msg and e.value.__cause__ is not None
        assert not isinstance(e.value.__cause__, ConvmapsError)


def test_a_bug_in_convmaps_hooks_is_not_taken_for_a_model_error(monkeypatch, tiny_cnn):
    def broken(value: object) -> None:
        raise RuntimeError("bug in a convmaps hook")

    monkeypatch.setattr(capture_module, "_first_tensor", broken)
    x = torch.randn(1, 3, 10, 10)
    with pytest.raises(RuntimeError, match="bug in a convmaps hook") as e:
        capture(tiny_cnn, x, ["conv1"])
    assert not isinstance(e.value, ConvmapsError)
    for m in tiny_cnn.modules():  # the hooks are still removed
        assert not m._forward_hooks and not m._forward_pre_hooks
    monkeypatch.undo()
    # the model's own failure, with the same hooks, stays the one-line ConvmapsError
    with pytest.raises(ConvmapsError, match="forward pass failed in conv1 for input"):
        capture(tiny_cnn, torch.randn(1, 2, 10, 10), ["conv1"])


# --- selections that select nothing ---------------------------------------------------------


@pytest.mark.parametrize("spec,kw,words", [
    ("relu", {"conv_only": True, "flag": "--kernels"}, "--kernels: 'relu' selects no conv layer"),
    ("pool", {"conv_only": True, "flag": "--kernels"}, "--kernels: 'pool' selects no conv layer"),
    ("linear", {"conv_only": True, "flag": "--taps"}, "--taps: 'linear' selects no conv layer"),
    ("conv,relu", {"conv_only": True, "flag": "--taps"}, "'relu' selects no conv layer"),
    ("", {"conv_only": True, "flag": "--kernels"}, "--kernels: empty SPEC ''"),
    (" , ", {}, "--layers: empty SPEC ' , '"),
    ("pool", {"conv_only": True, "flag": "--layers"}, "--layers: 'pool' selects no conv layer"),
])
def test_select_refuses_a_spec_that_selects_nothing(spec, kw, words):
    with pytest.raises(UnknownLayerError) as e:
        select(build("lenet"), spec, **kw)
    msg = str(e.value)
    assert words in msg and "\n" not in msg
    assert ("C1, C3, C5" in msg) if kw.get("conv_only") else ("names: C1" in msg)


def test_select_type_word_the_model_lacks_is_an_error():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU())
    with pytest.raises(UnknownLayerError, match="'pool' selects no layer"):
        select(model, "pool")
    assert [x.name for x in select(model, None)] == ["0", "1"]  # None still means all


# --- type words select modules that run ------------------------------------------------------


def test_type_words_select_only_modules_that_run_explicit_idle_names_are_errors():
    # weights do not matter (the passes run on meta); aux heads as googlenet(weights=None) has
    model = torchvision.models.googlenet(aux_logits=True, init_weights=False)
    ran = modules_run(model, (3, 224, 224))
    assert "aux1.conv.conv" not in ran and "inception3a.branch1.conv" in ran
    chosen = {x.name for x in select(model, "conv,pool", ran=ran)}
    assert "inception3a.branch1.conv" in chosen and "maxpool1" in chosen
    assert not any(name.startswith(("aux1", "aux2")) for name in chosen)
    assert {x.name for x in select(model, None, ran=ran)} <= ran
    assert {x.name for x in select(model, "all", ran=ran)} <= ran
    for spec in ("aux1.conv.conv", "conv1,aux2.fc1"):
        with pytest.raises(UnknownLayerError, match="never run.* in eval mode"):
            select(model, spec, ran=ran)
    # without `ran`, as before: every module, idle or not
    assert "aux1.conv.conv" in {x.name for x in select(model, "conv")}


def test_a_model_that_modifies_its_captures_runs_twice_once_not_every_batch():
    """ResNet's `out += identity` modifies a captured bn2 output: the first batch finds it (and
    runs again with that capture cloned); later batches clone it from the start."""
    from convmaps.core.models import build

    model = build("resnet18").eval()
    passes = []
    model.register_forward_pre_hook(lambda m, a: passes.append(1))
    x = torch.randn(2, 3, 64, 64)
    first = trace(model, x, ["layer1.0.bn2", "fc"])
    assert len(passes) == 2
    for _ in range(3):
        again = trace(model, x, ["layer1.0.bn2", "fc"])
    assert len(passes) == 5  # one pass a batch from now on
    torch.testing.assert_close(again.outputs["layer1.0.bn2"], first.outputs["layer1.0.bn2"])
    with torch.no_grad():  # the capture is bn2's own output, before the residual add
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        block = model.layer1[0]
        want = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(stem)))))
    torch.testing.assert_close(again.outputs["layer1.0.bn2"], want)
