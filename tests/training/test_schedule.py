"""The learning-rate schedule: transformers' cosine by default, the official recipes' cosine length and floor."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from vpdml.training import TrainingArguments
from vpdml.training.optim import cosine_factor, create_scheduler


def _optimizer(*rates: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in rates])


def _rates(scheduler, steps: int) -> list[list[float]]:
    rates = []
    for _ in range(steps):
        rates.append([group["lr"] for group in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def test_cosine_factor_without_length_or_floor_is_transformers_cosine():
    reference = get_cosine_schedule_with_warmup(_optimizer(1.0), num_warmup_steps=3, num_training_steps=20)
    expected = [rate for (rate,) in _rates(reference, 21)]  # past its end transformers' cosine climbs back
    ours = [cosine_factor(step, warmup_steps=3, cosine_steps=20, floor=0.0) for step in range(21)]
    assert ours == pytest.approx(expected, abs=1e-12)


def test_official_cosine_length_and_floor_match_cosine_annealing_per_epoch(tmp_path):
    # The official code steps CosineAnnealingLR(T_max=lr_cosine_length, eta_min=lr_cosine_min) once per epoch; the
    # floor is one absolute rate for every group. At every epoch boundary the per-step schedule gives the same rates.
    steps_per_epoch, epochs, length, floor = 4, 15, 50, 2e-3
    args = TrainingArguments(output_dir=str(tmp_path), epochs=epochs, lr_cosine_epochs=length, lr_min=floor)
    ours = _rates(
        create_scheduler(_optimizer(5e-3, 0.1), args, epochs * steps_per_epoch, steps_per_epoch), 60
    )
    official_optimizer = _optimizer(5e-3, 0.1)
    official = torch.optim.lr_scheduler.CosineAnnealingLR(official_optimizer, T_max=length, eta_min=floor)
    for epoch in range(epochs):
        expected = [group["lr"] for group in official_optimizer.param_groups]
        assert ours[epoch * steps_per_epoch] == pytest.approx(expected, rel=1e-9)
        official_optimizer.step()
        official.step()
    # 15 of 50 epochs: the rate ends near 79% of its start, never at the floor
    cosine = 0.5 * (1 + math.cos(math.pi * 59 / 200))  # the last of 60 steps, of a 200-step cosine
    assert ours[-1][1] == pytest.approx(floor + (0.1 - floor) * cosine) and ours[-1][1] > 0.79 * 0.1
    # a group that starts below the floor stays where it started
    assert _rates(create_scheduler(_optimizer(1e-3), args, 60, 4), 60)[-1] == [1e-3]


def test_a_cosine_shorter_than_the_run_holds_its_floor():
    factors = [cosine_factor(step, warmup_steps=0, cosine_steps=10, floor=0.25) for step in range(20)]
    assert factors[0] == 1.0 and factors[10:] == [0.25] * 10
    assert all(a >= b for a, b in itertools.pairwise(factors))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lr_cosine_epochs": 0}, "lr_cosine_epochs must be a positive number"),
        ({"lr_min": -1e-6}, "lr_min must be a non-negative number"),
        ({"lr_scheduler": "linear", "lr_min": 1e-6}, "do not apply to lr_scheduler='linear'"),
        ({"lr_scheduler": "constant", "lr_cosine_epochs": 50}, "do not apply to lr_scheduler='constant'"),
    ],
)
def test_bad_schedule_settings_say_what_to_change(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        TrainingArguments(output_dir=str(tmp_path), **settings)
