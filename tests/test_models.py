from __future__ import annotations

import os
import time
import urllib.error

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from convmaps.errors import (
    CheckpointError,
    UnknownModelError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
)
from convmaps.models import build, lenet5, load_model, load_state_file


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
    from convmaps.models import _SkipInit

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


def test_missing_weights_fail_fast_with_what_to_do(hub):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as e:
        load_model("vgg11", "IMAGENET1K_V1")
    msg = str(e.value)
    assert "vgg11-8a719046.pth" in msg and "--weights none" in msg and str(hub) in msg
    assert "\n" not in msg
    assert time.monotonic() - start < 30


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker  # type: ignore[attr-defined]
    path = tmp_path / "evil.pt"
    torch.save({"C1.weight": evil}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_model(str(path), arch="lenet")
    assert not marker.exists()


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


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_broken_checkpoints(tmp_path, content):
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"m{suffix}"
        path.write_bytes(content)
        with pytest.raises(CheckpointError):
            load_state_file(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_file(tmp_path / "missing.pt")
