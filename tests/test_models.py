from __future__ import annotations

import inspect
import os
import re
import shlex
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from typer.testing import CliRunner

from convmaps.cli import app
from convmaps.core.models import build, lenet5, load_model, load_state_file
from convmaps.errors import (
    CheckpointError,
    UnknownModelError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
)

from .conftest import no_hang, write_image

_GET_STATE_DICT = torchvision.models.WeightsEnum.get_state_dict


def test_lenet_structure():
    net = lenet5()
    names = [n for n, _ in net.named_children()]
    assert names == ["C1", "relu1", "S2", "C3", "relu3", "S4", "C5", "relu5", "flatten", "F6",
                     "relu6", "OUTPUT"]
    assert len(set(names)) == len(names)  # the notebook's reused name dropped relu5
    assert net.C1.padding == (2, 2) and net.C3.in_channels == 6 and net.C5.out_channels == 120
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_weights_none_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = load_model("alexnet", "none").model.state_dict()
    assert torch.equal(torch.rand(1), expected_next)
    b = load_model("alexnet", "none").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_model_lists_close_matches():
    with pytest.raises(UnknownModelError, match="Did you mean: alexnet"):
        load_model("alexnt")
    with pytest.raises(UnknownModelError, match="vgg16"):
        load_model("vgg61")


def test_unknown_weights_name_lists_choices():
    with pytest.raises(UnknownModelError, match="IMAGENET1K_V1"):
        load_model("alexnet", "IMAGENET9")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache, and no network: any download attempt fails as offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_pretrained_weights_load_from_the_hub_cache(hub):
    weights = torchvision.models.AlexNet_Weights.IMAGENET1K_V1
    torch.manual_seed(7)
    state = torchvision.models.alexnet().state_dict()
    hub.mkdir(parents=True)
    torch.save(state, hub / os.path.basename(weights.url))
    loaded = load_model("alexnet")  # DEFAULT
    assert loaded.weights == "IMAGENET1K_V1"
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert not loaded.model.training


@pytest.mark.parametrize("arch", ["resnet18", "squeezenet1_1"])
def test_pretrained_load_skips_init_yet_matches_a_plain_load(hub, arch):
    """Built without random init, then loaded: parameters and buffers (BatchNorm statistics
    included) equal the file's, and the forward pass equals torchvision's own init+load."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    torch.manual_seed(3)
    state = {k: v + 0.01 if v.is_floating_point() else v
             for k, v in torchvision.models.get_model(arch).state_dict().items()}
    hub.mkdir(parents=True)
    torch.save(state, hub / os.path.basename(weights.url))
    torch.manual_seed(11)
    expected_next = torch.rand(1)
    torch.manual_seed(11)
    model = load_model(arch).model
    assert torch.equal(torch.rand(1), expected_next)  # no random init drew from the RNG
    got = model.state_dict()
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    reference = torchvision.models.get_model(arch)
    reference.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(x), reference.eval()(x))


def test_skip_init_leaves_parameters_alone_and_other_tensors_not():
    from convmaps.core.models import _SkipInit

    p, t = torch.nn.Parameter(torch.zeros(4, 4)), torch.zeros(4, 4)
    with _SkipInit():
        torch.nn.init.kaiming_uniform_(p)
        p.data.normal_()  # .data is a plain tensor: a real write, as everywhere else
        torch.nn.init.kaiming_uniform_(t)
    assert not torch.equal(p.detach(), torch.zeros(4, 4))  # only via .data
    assert not torch.equal(t, torch.zeros(4, 4))
    q = torch.nn.Parameter(torch.zeros(3))
    with _SkipInit():
        torch.nn.init.normal_(q)
        q.uniform_()
    assert torch.equal(q.detach(), torch.zeros(3))


def test_missing_weights_fail_with_what_to_do_and_print_nothing(hub, capsys):
    with pytest.raises(WeightsUnavailableError) as e:
        load_model("vgg11", "IMAGENET1K_V1")
    msg = str(e.value)
    assert "vgg11-8a719046.pth" in msg and "--weights none" in msg and str(hub) in msg
    assert "\n" not in msg
    # torch hub writes "Downloading: ..." to stdout before it tries; a failed load hides it
    assert capsys.readouterr() == ("", "")
    assert torchvision.models.WeightsEnum.get_state_dict is _GET_STATE_DICT  # restored


def test_missing_weights_through_the_cli_print_only_the_error(hub, tmp_path):
    result = CliRunner().invoke(app, ["filters", "vgg11", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: weights vgg11 IMAGENET1K_V1 are not cached")
    assert result.stderr.count("\n") == 1


class _Evil:
    """A pickle payload: unpickling it runs `touch MARKER`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _hostile(path: Path, marker: Path, arch: str = "alexnet") -> Path:
    """A state dict of `arch` with one value replaced by the payload, saved with torch.save."""
    state: dict[str, object] = dict(build(arch, init=False).state_dict())
    state[next(iter(state))] = _Evil(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _alexnet_cache(hub: Path) -> Path:
    return hub / os.path.basename(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url)


def _assert_refused(error: BaseException, path: Path, marker: Path) -> None:
    msg = str(error)
    assert isinstance(error, UnsafeCheckpointError), msg
    assert "\n" not in msg and str(path) in msg and "posix.system" in msg
    assert not marker.exists()


@pytest.mark.parametrize("weights", [None, "DEFAULT", "IMAGENET1K_V1"])
def test_hostile_cached_weights_are_refused(hub, tmp_path, weights):
    marker = tmp_path / "pwned"
    cached = _hostile(_alexnet_cache(hub), marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_model("alexnet", weights)
    _assert_refused(e.value, cached, marker)
    assert torchvision.models.WeightsEnum.get_state_dict is _GET_STATE_DICT  # restored


def test_hostile_weights_file_and_checkpoint_model_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    for suffix in (".pt", ".pth"):
        path = _hostile(tmp_path / f"evil{suffix}", marker)
        for model, weights, arch in (("alexnet", str(path), None), (str(path), None, "alexnet")):
            with pytest.raises(UnsafeCheckpointError) as e:
                load_model(model, weights, arch)
            _assert_refused(e.value, path, marker)
    path = _hostile(tmp_path / "lenet.pt", marker, "lenet")
    with pytest.raises(UnsafeCheckpointError) as e:
        load_model("lenet", str(path))
    _assert_refused(e.value, path, marker)


def _cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("case", ["dump", "dump-name", "dump-file", "dump-model", "filters",
                                  "filters-file", "layers"])
def test_hostile_pickles_are_refused_by_every_command(hub, tmp_path, case):
    marker, out = tmp_path / "pwned", tmp_path / "out"
    image = write_image(tmp_path / "in" / "a.png")
    evil = _hostile(tmp_path / "evil.pth", marker)
    cached = _hostile(_alexnet_cache(hub), marker)
    args, path = {
        "dump": (["dump", "alexnet", image, "--out", out], cached),
        "dump-name": (["dump", "alexnet", image, "--weights", "IMAGENET1K_V1", "--out", out],
                      cached),
        "dump-file": (["dump", "alexnet", image, "--weights", evil, "--out", out], evil),
        "dump-model": (["dump", evil, image, "--arch", "alexnet", "--out", out], evil),
        "filters": (["filters", "alexnet", "--out", out], cached),
        "filters-file": (["filters", "alexnet", "--weights", evil, "--out", out], evil),
        "layers": (["layers", "alexnet", "--weights", "DEFAULT"], cached),
    }[case]
    result = _cli(*args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    assert result.stderr.startswith(f"error: {path} is refused: it would call posix.system.")
    assert result.stderr.count("\n") == 1
    assert not marker.exists()


def test_no_classification_builder_loads_weights_around_get_state_dict():
    """The weights_only patch wraps WeightsEnum.get_state_dict; a torchvision release whose
    builders loaded weights another way (or overrode the method) would bypass it."""
    for arch in torchvision.models.list_models(module=torchvision.models):
        enum = torchvision.models.get_model_weights(arch)
        owners = [c for c in enum.__mro__ if "get_state_dict" in vars(c)]
        assert owners == [torchvision.models.WeightsEnum], arch
        builder = torchvision.models.get_model_builder(arch)
        source = inspect.getsource(sys.modules[builder.__module__])
        assert "get_state_dict(" in source, arch
        for call in ("torch.load(", "load_state_dict_from_url(", "load_url("):
            assert call not in source, (arch, call)


def _seeded_state(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """A random state dict in the form torchvision's checkpoint for `arch` has."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    kwargs = {"aux_logits": True, "init_weights": False} if arch == "googlenet" else {}
    torch.manual_seed(seed)
    model = torchvision.models.get_model(
        arch, num_classes=len(weights.meta["categories"]), **kwargs
    )
    return {k: v + 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}


def test_legit_cached_weights_load_through_torchvision_post_processing(hub):
    hub.mkdir(parents=True)
    # densenet: the released files use the old key names (`norm.1`), which its builder renames
    state = _seeded_state("densenet121", 5)
    old = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.(weight|bias|running_\w+)$",
                  r"\1.\2.\3", k): v for k, v in state.items()}
    assert old.keys() != state.keys()
    torch.save(old, hub / os.path.basename(torchvision.models.DenseNet121_Weights.DEFAULT.url))
    got = load_model("densenet121").model.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    # googlenet: the file holds the aux heads, which its builder drops after loading
    state = _seeded_state("googlenet", 6)
    assert any(k.startswith("aux1.") for k in state)
    torch.save(state, hub / os.path.basename(torchvision.models.GoogLeNet_Weights.DEFAULT.url))
    model = load_model("googlenet").model
    got = model.state_dict()
    assert model.aux1 is None and model.transform_input  # the builder's post-processing ran
    assert set(got) == {k for k in state if not k.startswith(("aux1.", "aux2."))}
    assert all(torch.equal(got[k], state[k]) for k in got)


@pytest.mark.parametrize("content", [b"hello world, this is text\n", b"\x80\x02garbage"])
def test_unreadable_cached_weights_are_one_line(hub, content):
    cached = _alexnet_cache(hub)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_model("alexnet")
    assert str(cached) in str(e.value) and "\n" not in str(e.value)


def test_text_file_as_weights_is_one_line(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello world, this is text\n")  # 'h' is a pickle opcode: once a KeyError
    with pytest.raises(CheckpointError) as e:
        load_model("alexnet", str(path))
    assert str(e.value).startswith(f"{path} is not a readable checkpoint")
    assert "\n" not in str(e.value)
    result = _cli("layers", "alexnet", "--weights", path)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.startswith(f"error: {path} is not a readable checkpoint")


@pytest.mark.parametrize("bad", ["sparse", "meta", "int", "str-key", "list"])
def test_state_dicts_of_unusable_values_are_refused(tmp_path, bad):
    state: dict = dict(build("lenet").state_dict())
    if bad == "sparse":
        state["C1.bias"] = state["C1.bias"].to_sparse()
    elif bad == "meta":
        state["C1.bias"] = torch.empty(6, device="meta")
    elif bad == "int":
        state["C1.bias"] = 3
    elif bad == "str-key":
        state[7] = torch.zeros(1)
    else:
        state = list(state.values())  # type: ignore[assignment]
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path / "m.pt"), arch="lenet")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "m.pt") in msg
    assert {"sparse": "C1.bias is a torch.sparse_coo tensor", "meta": "C1.bias is a meta tensor",
            "int": "'C1.bias' is of type int", "str-key": "key 7 is not a name",
            "list": "but a list"}[bad] in msg


def test_safetensors_file_that_is_not_one(tmp_path):
    path = tmp_path / "m.safetensors"
    torch.save(build("lenet").state_dict(), path)  # a torch zip under the wrong name
    with pytest.raises(CheckpointError) as e:
        load_model(str(path))
    assert str(e.value).startswith(f"{path} is not a readable safetensors file")
    assert "\n" not in str(e.value)


def test_checkpoint_round_trip_safetensors_and_pt(tmp_path):
    net = build("lenet")
    state = {k: v.clone() + 1 for k, v in net.state_dict().items()}
    save_file(state, tmp_path / "m.safetensors", {"arch": "lenet"})
    torch.save(state, tmp_path / "m.pt")
    for model, arch in ((str(tmp_path / "m.safetensors"), None), (str(tmp_path / "m.pt"), "lenet")):
        got = load_model(model, arch=arch).model.state_dict()
        assert all(torch.equal(got[k], state[k]) for k in state)
    got = load_model("lenet", str(tmp_path / "m.pt")).model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_checkpoint_needs_arch(tmp_path):
    torch.save(build("lenet").state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="--arch"):
        load_model(str(tmp_path / "m.pt"))


def test_mismatched_checkpoint_names_keys(tmp_path):
    state = build("lenet").state_dict()
    del state["C3.bias"]
    state["F6.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path / "m.pt"), arch="lenet")
    msg = str(e.value)
    assert "missing: C3.bias" in msg and "unexpected: extra.weight" in msg and "F6.weight" in msg


def test_checkpoint_with_other_class_count(tmp_path):
    state = lenet5(num_classes=4).state_dict()
    torch.save(state, tmp_path / "m.pt")
    assert load_model(str(tmp_path / "m.pt"), arch="lenet").model.OUTPUT.out_features == 4


def test_weights_that_are_no_file_say_what_they_are(tmp_path, fifo):
    """A FIFO would block torch forever; a folder or a device is no checkpoint either."""
    (tmp_path / "dir.pt").mkdir()
    for path, kind in ((fifo(tmp_path / "pipe.pt"), "a named pipe"),
                       (tmp_path / "dir.pt", "a directory"),
                       (Path("/dev/zero"), "a character device")):
        with pytest.raises(CheckpointError, match=f"checkpoint {path} is {kind}.*, not a file"):
            no_hang(load_model, "lenet", str(path))


def test_a_fifo_in_the_hub_cache_is_one_line(hub, fifo):
    weights = torchvision.models.SqueezeNet1_1_Weights.DEFAULT
    cached = fifo(hub / os.path.basename(weights.url))
    with pytest.raises(CheckpointError, match=f"cached weights {cached} is a named pipe.*"
                                              "delete it"):
        no_hang(load_model, "squeezenet1_1")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_broken_checkpoints(tmp_path, content):
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"m{suffix}"
        path.write_bytes(content)
        with pytest.raises(CheckpointError):
            load_state_file(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_file(tmp_path / "missing.pt")


def test_a_plain_pickle_is_refused_in_one_line_without_torchs_warning(tmp_path):
    """A process of its own: pytest would catch the warning before it reached stderr."""
    import pickle
    import subprocess
    import sys

    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"C1.weight": [1.0]}, protocol=4))
    run = subprocess.run([sys.executable, "-m", "convmaps", "layers", "lenet", "--weights",
                          str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "refused" in lines[0], lines
