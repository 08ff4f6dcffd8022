"""VGG's and ResNet's ReLUs run in place, and that changes no number: outputs, gradients and
batch-norm statistics are bitwise those of the same network with out-of-place ReLUs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import models.resnet
from models import build_model


def _out_of_place(net: nn.Module, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Make every ReLU of `net` (modules, and ResNet's functional ones) out of place; returns
    the `inplace` that each functional call asked for."""
    for module in net.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    asked: list[bool] = []

    def relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        asked.append(inplace)
        return F.relu(x, inplace=False)

    functional = SimpleNamespace(**{name: getattr(F, name) for name in dir(F) if name[0] != "_"})
    functional.relu = relu
    monkeypatch.setattr(models.resnet, "F", functional)
    return asked


def _step(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """One training forward and backward (dropout drawn from the same seed every time)."""
    net.train()
    net.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = net(x)
    out.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    return out.detach().clone(), {**grads, **buffers}


@pytest.mark.parametrize(("model", "size"), [("vgg", 64), ("resnet18", 64)])
def test_inplace_relus_change_no_number(
    model: str, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    net = build_model(model, input_size=size)
    assert any(getattr(m, "inplace", False) for m in net.modules() if isinstance(m, nn.ReLU))
    reference = build_model(model, input_size=size)
    reference.load_state_dict(net.state_dict())
    x = torch.rand(4, 1, size, size, generator=torch.Generator().manual_seed(2))

    out, state = _step(net, x)
    with monkeypatch.context() as patched:
        asked = _out_of_place(reference, patched)
        want_out, want_state = _step(reference, x)
    assert all(asked) and (len(asked) > 0) == (model == "resnet18")  # the patch was in force
    assert not any(m.inplace for m in reference.modules() if isinstance(m, nn.ReLU))

    assert torch.equal(out, want_out)
    assert state.keys() == want_state.keys() and len(state) > 10
    for name, value in state.items():
        assert torch.equal(value, want_state[name]), name
