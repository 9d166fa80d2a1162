"""BitFit offsets join the module's own bias (one op) and give what training the bias itself gives."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from vpdml.modules import bitfit
from vpdml.modules.bitfit import install_bias_offsets

MODULES = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 4, 6)),
    "layer_norm": (lambda: nn.LayerNorm(5), lambda: torch.randn(3, 4, 5)),
    "conv2d": (lambda: nn.Conv2d(3, 5, kernel_size=2, stride=2), lambda: torch.randn(3, 3, 4, 4)),
}


def _with_offset(kind: str) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """A module with an installed offset, its twin whose bias already holds the offset, an input and the offset."""
    make_module, make_input = MODULES[kind]
    torch.manual_seed(0)
    module = make_module()
    with torch.no_grad():
        module.bias.normal_()
    offset = nn.Parameter(torch.randn(module.bias.shape))
    twin = copy.deepcopy(module)
    with torch.no_grad():
        twin.bias.add_(offset)
    install_bias_offsets({"part": module}, lambda name: offset)
    return module, twin, make_input(), offset


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_an_offset_gives_the_output_and_gradient_of_training_the_bias(kind):
    module, twin, inputs, offset = _with_offset(kind)
    weights = torch.randn_like(twin(inputs))
    (module(inputs) * weights).sum().backward()
    (twin(inputs) * weights).sum().backward()
    torch.testing.assert_close(module(inputs), twin(inputs))
    torch.testing.assert_close(offset.grad, twin.bias.grad)


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_one_offset_for_the_batch_joins_the_bias_instead_of_adding_to_the_output(kind, monkeypatch):
    module, twin, inputs, _ = _with_offset(kind)

    def no_output_add(*args, **kwargs):
        raise AssertionError("the offset was added to the output")

    monkeypatch.setattr(bitfit, "add_bias_offset", no_output_add)
    torch.testing.assert_close(module(inputs), twin(inputs))


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_per_sample_offsets_are_added_row_by_row(kind):
    make_module, make_input = MODULES[kind]
    module, inputs = make_module(), make_input()
    rows = torch.randn(inputs.shape[0], module.bias.shape[0])
    expected = []
    for row, sample in zip(rows, inputs, strict=True):
        twin = copy.deepcopy(module)
        with torch.no_grad():
            twin.bias.add_(row)
        expected.append(twin(sample[None]))
    install_bias_offsets({"part": module}, lambda name: rows)
    torch.testing.assert_close(module(inputs), torch.cat(expected))


def test_no_offset_and_a_removed_offset_leave_the_module_as_it_was():
    module, inputs = nn.Linear(6, 5), torch.randn(2, 6)
    plain = module(inputs)
    offset: list[torch.Tensor | None] = [None]
    (installed,) = install_bias_offsets({"part": module}, lambda name: offset[0])
    assert torch.equal(module(inputs), plain)
    offset[0] = torch.ones(5)
    torch.testing.assert_close(module(inputs), plain + 1)
    installed.remove()
    assert "forward" not in module.__dict__
    assert torch.equal(module(inputs), plain)


def test_a_forward_already_set_on_the_instance_is_kept_and_restored():
    """accelerate's offloading hooks replace ``module.forward`` on the instance: the offset goes on its output."""
    module, inputs = nn.Linear(6, 5), torch.randn(2, 6)
    doubled = functools.partial(lambda m, x: nn.Linear.forward(m, x) * 2, module)
    module.forward = doubled
    (installed,) = install_bias_offsets({"part": module}, lambda name: torch.ones(5))
    torch.testing.assert_close(module(inputs), nn.Linear.forward(module, inputs) * 2 + 1)
    installed.remove()
    assert module.forward is doubled


def test_a_subclass_with_its_own_forward_keeps_it():
    class Clamped(nn.Linear):
        def forward(self, x):
            return super().forward(x).clamp(min=0)

    module, inputs = Clamped(6, 5), torch.randn(4, 6)
    install_bias_offsets({"part": module}, lambda name: torch.full((5,), -0.5))
    torch.testing.assert_close(module(inputs), nn.Linear.forward(module, inputs).clamp(min=0) - 0.5)


def test_the_module_tree_and_state_dict_are_unchanged():
    module = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5))
    before = dict(module.state_dict())
    install_bias_offsets(dict(module.named_children()), lambda name: torch.ones(5))
    assert list(module.state_dict()) == list(before)
    assert [type(child) for child in module.children()] == [nn.Linear, nn.LayerNorm]
