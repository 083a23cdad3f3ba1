"""core.explain: at every node of the tree the sum is exact, the value is the module's real
activation (forward hooks), a conv node's terms are the kernel maps there (decompose), and the
children are the largest terms; on LeNet, AlexNet and VGG11_bn with seeded weights. Then the
`explain` job and command: files, resume, ownership, shards, errors and progress."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision import models
from typer.testing import CliRunner

from convmaps.cli import app
from convmaps.core.decompose import kernel_maps
from convmaps.core.deconv import Unit
from convmaps.core.explain import INPUT, Node, explain, nodes
from convmaps.core.models import lenet5, load_model
from convmaps.errors import ConvmapsError
from convmaps.io.images import decode
from convmaps.jobs.explain import node_record, run_explain
from convmaps.options import ExplainOptions

from .conftest import logged, refused_in_one_line, sharded_like_one, write_image

runner = CliRunner()


def _activations(model: nn.Module, image: torch.Tensor) -> tuple[dict[str, torch.Tensor],
                                                                  dict[str, torch.Tensor]]:
    """Every named module's input and output for one image, kept by forward hooks (cloned
    before any in-place ReLU after it); a module's k-th call again as `name@k`."""
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_m, args, out):
            key = name
            while key in outs:
                key = f"{name}@{int(key.rsplit('@', 1)[1]) + 1 if '@' in key else 1}"
            ins[key] = args[0][0].detach().clone()
            outs[key] = out[0].detach().clone()
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(image[None])
    finally:
        for h in handles:
            h.remove()
    return ins, outs


def _at(t: torch.Tensor, node: Node) -> float:
    p = node.position
    return float(t[node.channel] if p is None else t[node.channel, p[0], p[1]])


def _check_tree(model: nn.Module, image: torch.Tensor, root: Node, top: int) -> int:
    """Every invariant at every node; returns the number of conv nodes checked."""
    ins, outs = _activations(model, image)
    tol = 1e-10 if image.dtype == torch.float64 else 1e-5
    convs = 0
    for node in nodes(root):
        terms = [t.value for t in node.terms]
        scale = max([abs(node.bias), abs(node.value), *map(abs, terms)])
        assert abs(node.bias + sum(terms) - node.value) <= tol * max(scale, 1e-30), node.module
        real = image if node.module == INPUT else outs.get(node.module)
        if real is not None:  # (torch.flatten, a residual add are no module)
            assert _at(real, node) == pytest.approx(node.value, rel=1e-12, abs=1e-12)
        sizes = [abs(v) for v in terms]
        assert sizes == sorted(sizes, reverse=True)
        if node.kind == "Conv2d":
            convs += 1
            conv = model.get_submodule(node.module)
            assert isinstance(conv, nn.Conv2d) and node.position is not None
            km = kernel_maps(conv, ins[node.module])[node.channel, :, *node.position]
            cg = conv.in_channels // conv.groups
            c0 = node.channel // (conv.out_channels // conv.groups) * cg
            got = torch.zeros_like(km)
            for t in node.terms:
                got[t.channel - c0] = t.value
            assert torch.allclose(got, km, rtol=0, atol=tol * max(scale, 1e-30))
            bias = 0.0 if conv.bias is None else float(conv.bias[node.channel].detach())
            assert node.bias == bias
            _check_windows(conv, ins[node.module], node, c0, top, tol * max(scale, 1e-30))
        if node.children:
            first = node.children[0]
            assert (first.channel, first.position) == (node.terms[0].channel,
                                                        node.terms[0].position)
            assert abs(node.terms[0].value) == max(sizes)
            if node.kind in ("Conv2d", "Linear") and node.children[0].module != INPUT:
                assert len(node.children) == min(top, len(node.terms))
            for child, t in zip(node.children, node.terms, strict=False):
                assert (child.module, child.channel, child.position) == \
                    (t.source, t.channel, t.position)
            if node.kind == "add":
                assert len(node.children) == len(node.terms) == 2
    return convs


def _check_windows(conv: nn.Conv2d, x: torch.Tensor, node: Node, c0: int, top: int,
                   atol: float) -> None:
    """A conv node's windows: its `top` largest terms (every colour channel at the pixels), each
    tap `w * x` recomputed from the weights and the padded input, summing to the term."""
    assert node.position is not None
    pixels = node.terms[0].source == INPUT
    assert [w.channel for w in node.windows] == \
        [t.channel for t in (node.terms if pixels else node.terms[:top])]
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    ph, pw = conv.padding  # (the models here pad with ints)
    kh, kw = conv.kernel_size
    rows = [node.position[0] * sh - ph + i * dh for i in range(kh)]
    cols = [node.position[1] * sw - pw + j * dw for j in range(kw)]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = torch.nn.functional.pad(x, (pw, pw, ph, ph), mode=mode)
    value = {t.channel: t.value for t in node.terms}
    for w in node.windows:
        assert (w.rows, w.cols) == (rows, cols)
        patch = padded[w.channel, [r + ph for r in rows]][:, [c + pw for c in cols]]
        want = conv.weight[node.channel, w.channel - c0].detach() * patch
        got = torch.tensor(w.taps, dtype=want.dtype)
        assert torch.allclose(got, want, rtol=0, atol=atol)
        assert abs(got.sum().item() - value[w.channel]) <= atol


def test_lenet_every_node_float64() -> None:
    torch.manual_seed(0)
    model = lenet5().double().eval()
    image = torch.rand(1, 28, 28, dtype=torch.float64)
    root = explain(model, image, Unit("OUTPUT", 3), depth=6, top=2)
    assert root.position is None and root.kind == "Linear"
    mods = {n.module for n in nodes(root)}
    assert {"OUTPUT", "relu6", "F6", "flatten", "C5", "S4", "C3", "S2", "C1"} <= mods
    assert _check_tree(model, image, root, 2) > 3
    # the pixels: one node per colour channel under C1, leaves
    leaves = [n for n in nodes(root) if n.module == INPUT]
    assert leaves and all(not n.children and n.terms[0].value == n.value for n in leaves)


def test_lenet_strongest_position_and_depth() -> None:
    torch.manual_seed(1)
    model = lenet5().eval()
    image = torch.rand(1, 28, 28)
    root = explain(model, image, Unit("C3", 5), depth=1)
    act = model[:4](image[None])[0, 5]
    flat = int(act.flatten().argmax())
    assert root.position == (flat // act.shape[-1], flat % act.shape[-1])
    assert root.children == []  # depth 1: the root's sum only
    assert len(root.terms) == 6
    deep = explain(model, image, Unit("relu3", 5, root.position), depth=2, top=3)
    assert deep.kind == "ReLU" and deep.children[0].module == "C3"
    assert [c.module for c in deep.children[0].children] == ["S2"] * 3
    assert _check_tree(model, image, deep, 3) == 4


def test_alexnet_features_and_classifier() -> None:
    torch.manual_seed(0)
    model = models.alexnet(weights=None).eval()
    image = torch.randn(3, 67, 67)
    root = explain(model, image, Unit("features.10", 7), depth=3, top=3)
    assert _check_tree(model, image, root, 3) == 1 + 3 + 9
    logit = explain(model, image, Unit("classifier.6", 2), depth=2, top=2)
    assert [n.module for n in nodes(logit)] == ["classifier.6", "classifier.5", "classifier.4",
                                                "classifier.5", "classifier.4"]
    _check_tree(model, image, logit, 2)


def test_vgg11_bn_batchnorm_float64() -> None:
    torch.manual_seed(0)
    model = models.vgg11_bn(weights=None)
    for m in model.modules():  # running statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model = model.double().eval()
    image = torch.randn(3, 32, 32, dtype=torch.float64)
    root = explain(model, image, Unit("features.10", 4), depth=3, top=2)
    kinds = {n.kind for n in nodes(root)}
    assert {"ReLU", "BatchNorm2d", "Conv2d", "MaxPool2d"} <= kinds
    assert _check_tree(model, image, root, 2) == 1 + 2 + 4


def test_grouped_dilated_padded_conv_and_avgpool() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([
        ("a", nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2)),
        ("bn", nn.BatchNorm2d(6)),
        ("act", nn.ReLU(inplace=True)),
        ("dw", nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, padding_mode="reflect")),
        ("avg", nn.AvgPool2d(2)),
        ("gap", nn.AdaptiveAvgPool2d((2, 3))),
        ("b", nn.Conv2d(6, 3, 1)),
    ])).eval()
    model.bn.running_mean.uniform_(-1, 1)
    image = torch.randn(4, 13, 11)
    root = explain(model, image, Unit("b", 1, (1, 2)), depth=4, top=3)
    assert [n.kind for n in nodes(root)][:5] == ["Conv2d", "AdaptiveAvgPool2d", "AvgPool2d",
                                                 "Conv2d", "ReLU"]
    assert _check_tree(model, image, root, 3) >= 3


def _seeded_bn(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine parameters that are not the identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def test_resnet18_residual_adds_float64() -> None:
    torch.manual_seed(0)
    model = _seeded_bn(models.resnet18(weights=None)).double().eval()
    image = torch.randn(3, 40, 40, dtype=torch.float64)
    root = explain(model, image, Unit("layer2.0", 3), depth=3, top=2)
    assert root.module == "layer2.0.relu@1" and root.kind == "ReLU"
    adds = [n for n in nodes(root) if n.kind == "add"]
    assert adds and {t.source for t in adds[0].terms} == {"layer2.0.bn2",
                                                          "layer2.0.downsample.1"}
    assert _check_tree(model, image, root, 2) >= 4
    logit = explain(model, image, Unit("fc", 1), depth=2, top=2)
    assert [n.kind for n in nodes(logit)][:3] == ["Linear", "flatten", "AdaptiveAvgPool2d"]
    _check_tree(model, image, logit, 2)


def test_mobilenet_v2_depthwise_relu6_and_adds() -> None:
    torch.manual_seed(0)
    model = _seeded_bn(models.mobilenet_v2(weights=None)).eval()
    image = torch.randn(3, 48, 48)
    root = explain(model, image, Unit("features.3", 5), depth=4, top=2)
    kinds = [n.kind for n in nodes(root)]
    assert kinds[0] == "add" and "ReLU6" in kinds and "BatchNorm2d" in kinds
    assert any(n.kind == "Conv2d" and len(n.terms) == 1 for n in nodes(root))  # depthwise
    assert _check_tree(model, image, root, 2) >= 4
    logit = explain(model, image, Unit("classifier.1", 7), depth=2, top=3)
    assert "adaptive_avg_pool2d" in [n.kind for n in nodes(logit)]
    _check_tree(model, image, logit, 3)


def test_concatenation_picks_the_branch_of_the_channel() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 4, 1)
            self.head = nn.Conv2d(7, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)))

    torch.manual_seed(0)
    model = Two().eval()
    image = torch.randn(2, 9, 9)
    root = explain(model, image, Unit("head", 1), depth=3, top=7)
    cats = [n for n in nodes(root) if n.kind == "cat"]
    assert {c.terms[0].source for c in cats} == {"a", "b"}
    for c in cats:
        assert c.children[0].module == ("a" if c.channel < 3 else "b")
        assert c.children[0].channel == (c.channel if c.channel < 3 else c.channel - 3)
    assert _check_tree(model, image, root, 7) == 1 + 7


def test_a_model_in_training_mode_is_explained_as_in_eval() -> None:
    """torch.fx traces the Python branches of the mode a model is in: explain traces eval's."""

    class TrainOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.r = nn.Conv2d(1, 2, 3), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.r(y * torch.sigmoid(y) if self.training else y)

    model = TrainOnly().train()
    image = torch.rand(1, 8, 8)
    node = explain(model, image, Unit("r", 1, (2, 3)))
    assert model.training  # given back
    with torch.no_grad():
        want = torch.relu(model.a(image[None]))[0, 1, 2, 3]
    assert node.value == pytest.approx(float(want), abs=1e-7)


def test_refusals() -> None:
    with pytest.raises(ConvmapsError, match=r"features\.0\.2 \(SiLU\)"):
        explain(models.efficientnet_b0(weights=None).eval(), torch.rand(3, 32, 32),
                Unit("features.1", 0))

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    with pytest.raises(ConvmapsError, match="cannot be traced"):
        explain(Branchy(), torch.rand(1, 8, 8), Unit("conv", 0))
    odd = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh()).eval()
    with pytest.raises(ConvmapsError, match=r"1 \(Tanh\)"):
        explain(odd, torch.rand(1, 8, 8), Unit("1", 0))
    with pytest.raises(ConvmapsError, match="at least 1"):
        explain(lenet5(), torch.rand(1, 28, 28), Unit("C1", 0), depth=0)

    class Reread(nn.Module):  # eager mode hands `+ a` the ReLU's output: the graph would not
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.a(x)
            return self.b(a.relu_()) + a

    with pytest.raises(ConvmapsError, match="relu_: it writes over its input in place"):
        explain(Reread().eval(), torch.rand(1, 8, 8), Unit("b", 0))


# -- the job and the command -----------------------------------------------------------------



def _records(tree: dict) -> list[dict]:
    return [tree, *(r for c in tree["children"] for r in _records(c))]


def test_job_files_hold_the_trees_of_the_core(tmp_path):
    out = tmp_path / "o"
    m = run_explain(ExplainOptions(model="lenet", out=str(out), units=["C3:5", "OUTPUT:3"],
                                   depth=2, top=2, workers=0, batch_size=3))
    loaded = load_model("lenet")
    assert len(m["inputs"]) == 8 and m["run"]
    for e in m["inputs"]:
        assert e["status"] == "ok"
        assert e["files"] == ["explain/C3:5.json", "explain/OUTPUT:3.json",
                              "png/explain/C3:5.png", "png/explain/OUTPUT:3.png"]
        x = loaded.preprocess(decode(e["source"]))
        for unit in ("C3:5", "OUTPUT:3"):
            record = json.loads((out / e["key"] / "explain" / f"{unit}.json").read_text())
            assert record["unit"] == unit and record["sha256"] == e["sha256"]
            assert record["depth"] == 2 and record["top"] == 2 and record["model"] == "lenet"
            module, channel = unit.split(":")
            want = explain(loaded.model, x, Unit(module, int(channel)), depth=2, top=2)
            got, mine = _records(record["tree"]), _records(node_record(want))
            assert [(r["module"], r["channel"], r["position"]) for r in got] == \
                [(r["module"], r["channel"], r["position"]) for r in mine]
            for r, w in zip(got, mine, strict=True):  # (another thread count may round apart)
                assert r["value"] == pytest.approx(w["value"], rel=1e-5, abs=1e-6)
                assert [c["channel"] for c in r["contributions"][:2]] == \
                    [c["channel"] for c in w["contributions"][:2]]
            for r in _records(record["tree"]):
                total = r["bias"] + r["rest"] + sum(c["value"] for c in r["contributions"])
                big = max(abs(c["value"]) for c in r["contributions"])
                assert abs(total - r["value"]) <= 1e-5 * max(big, abs(r["value"]), 1e-30)
                terms = {c["channel"]: c["value"] for c in r["contributions"]}
                assert len(r["windows"]) == (min(2, len(terms)) if r["kind"] == "Conv2d" else 0)
                for w in r["windows"]:  # each window's taps sum to its term
                    taps = sum(map(sum, w["taps"]))
                    assert abs(taps - terms[w["channel"]]) <= 1e-5 * max(big, 1e-30)
                    assert len(w["taps"]) == len(w["rows"]) == 5 == len(w["cols"])
    tree = json.loads((out / "5_sandal.png/explain/OUTPUT:3.json").read_text())["tree"]
    assert tree["position"] is None and len(tree["contributions"]) == 64  # of F6's 84
    assert tree["children"][0]["module"] == "relu6"


def test_resume_ownership_overwrite_and_a_dump_beside(tmp_path):
    out = tmp_path / "o"
    args = ["explain", "lenet", "--out", str(out), "--unit", "C3:5@2,3", "--depth", "2"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "0 image(s) written, 8 already done" in again.output
    other = runner.invoke(app, [*args, "--top", "1"])
    assert other.exit_code == 1 and "--overwrite" in " ".join(other.output.split())
    replaced = runner.invoke(app, [*args, "--top", "1", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    folder = out / "0_t-shirt-top.png"
    record = json.loads((folder / "explain/C3:5@2,3.json").read_text())
    assert record["top"] == 1 and len(record["tree"]["children"]) == 1
    assert record["tree"]["position"] == [2, 3]
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(app, ["dump", "lenet", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
    assert (folder / "explain/C3:5@2,3.json").is_file()
    assert (folder / "png/explain/C3:5@2,3.png").is_file()
    dump = json.loads((out / "manifest.json").read_text())
    assert all(not f.startswith(("explain", "png/explain")) for e in dump["inputs"]
               for f in e["files"])
    shown = runner.invoke(app, ["show", str(out)])
    assert shown.exit_code == 0 and "explain trees of lenet" in shown.output
    assert "8 tree(s)" in shown.output


def test_shards_give_the_bytes_of_one_process(tmp_path):
    args = ["explain", "lenet", "--unit", "relu3:2", "--workers", "0", "--batch-size", "3"]
    m = sharded_like_one(args, tmp_path, "explain.json")
    assert len(m["inputs"]) == 8


@pytest.mark.parametrize("model,extra,words", [
    ("lenet", ["--unit", "C3:99"], "the channel must be in 0-15"),
    ("lenet", ["--unit", "C3"], "is not MODULE:C"),
    ("lenet", [], "explain needs a unit"),
    ("efficientnet_b0", ["-w", "none", "--unit", "features.1:0"],
     "explain cannot take features.0.2 (SiLU) apart"),
])
def test_bad_units_are_one_line(tmp_path, model, extra, words):
    refused_in_one_line(["explain", model, "--out", str(tmp_path / "o"), *extra], words)
    assert not (tmp_path / "o" / "explain.json").exists()


def test_the_box_is_the_units_receptive_field_where_its_last_op_is_a_function(tmp_path):
    """GoogLeNet's inception3a ends in torch.cat: the box is still the module's field."""
    from convmaps.core.fields import fields

    write_image(tmp_path / "in" / "a.png", (64, 64))
    out = tmp_path / "o"
    result = runner.invoke(app, ["explain", "googlenet", "-w", "none", str(tmp_path / "in"),
                                 "--out", str(out), "--unit", "inception3a:70@10,12",
                                 "--depth", "1"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "a.png/explain/inception3a:70@10,12.json").read_text())
    assert record["tree"]["module"] == "cat"
    model = load_model("googlenet", weights="none").model
    want = fields(model, (3, 224, 224))["inception3a"].box(10, 12)
    assert record["box"] == list(want) and record["box"] != [0, 0, 224, 224]


def test_progress_in_a_log_and_a_titled_figure(tmp_path):
    log = logged(["explain", "lenet", "--out", str(tmp_path / "o"), "--unit", "C5:7"])
    assert "explain: 8/8 images" in log
    from PIL import Image

    with Image.open(tmp_path / "o" / "3_dress.png" / "png" / "explain" / "C5:7.png") as img:
        assert img.width > 400 and img.height > 300


def test_alexnet_runs_are_byte_identical(tmp_path):
    """AlexNet's in-place ReLUs: two runs give the same tree files and figures, byte for byte."""
    write_image(tmp_path / "in" / "a.png", (230, 240))
    args = ["explain", "alexnet", str(tmp_path / "in"), "-w", "none", "--unit", "features.8:3",
            "--depth", "2", "--top", "2", "--workers", "0"]
    for name in ("o1", "o2"):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    files = sorted(p.relative_to(tmp_path / "o1") for p in (tmp_path / "o1" / "a.png").rglob("*")
                   if p.is_file())
    assert any(f.suffix == ".json" for f in files) and any(f.suffix == ".png" for f in files)
    for f in files:
        assert (tmp_path / "o1" / f).read_bytes() == (tmp_path / "o2" / f).read_bytes(), f
