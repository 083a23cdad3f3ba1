"""Every core API function that runs a model gives it back as found: weights and buffers,
training flags, in-place flags and hooks (AlexNet: in-place ReLUs, dropout)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from convmaps.core.deconv import Unit


def _snapshot(model: torch.nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, m.training, getattr(m, "inplace", None), len(m._forward_hooks),
              len(m._forward_pre_hooks)) for n, m in model.named_modules()])


def _same(model: torch.nn.Module, before: tuple) -> None:
    state, flags = before
    now_state, now_flags = _snapshot(model)
    assert now_flags == flags
    assert state.keys() == now_state.keys()
    assert all(torch.equal(state[k], now_state[k]) for k in state)


@pytest.mark.parametrize("call", ["occlude", "invariance", "explain"])
@pytest.mark.parametrize("training", [False, True])
def test_the_model_is_unchanged(call, training):
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None).train(training)
    x = torch.randn(3, 67, 67)
    before = _snapshot(model)
    if call == "occlude":
        from convmaps.core.occlusion import occlude

        occlude(model, x, 32, 32, modules=["features.3"])
    elif call == "invariance":
        from convmaps.core.invariance import invariance

        invariance(model, x, "rotate", [0.0, 30.0], ["features.3", "classifier.6"])
    else:
        from convmaps.core.explain import explain

        explain(model, x, Unit("features.3", 5, (1, 1)), depth=2, top=2)
    _same(model, before)
