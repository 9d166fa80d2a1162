"""Determinism: the same seed and process count give the same numbers, run after run, on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers.models import tiny_vit
from helpers.toy_images import NORMALISATION, layout_splits
from vpdml.training import TrainingArguments, build_model, train

pytestmark = pytest.mark.usefixtures("single_thread")


def _run(output_dir, seed: int) -> dict:
    splits = layout_splits(num_classes=18, per_class=4, seed=4, validation_classes=3)
    torch.manual_seed(0)  # the same initial weights; the run's own randomness comes from args.seed
    model = build_model(
        tiny_vit(0, num_hidden_layers=2), "vptsp-g", splits.num_train_classes, num_prompts=2, gru_dropout=0.2
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        seed=seed,
        max_steps=6,
        classes_per_batch=4,
        samples_per_class=2,
        image_size=32,
        train_crop_scale=(0.5, 1.0),
        learning_rate=1e-2,
        proxy_learning_rate=0.1,
        eval_steps=3,
        log_every=1,
        show_progress=False,
    )
    train(model, splits, args, image_processor=NORMALISATION)
    return json.loads((output_dir / "metrics.json").read_text())


def test_same_seed_gives_identical_metrics_and_weights(tmp_path):
    first, second = _run(tmp_path / "a", seed=3), _run(tmp_path / "b", seed=3)
    assert first == second  # exact float equality of every metric, the selected step and the warm-up losses
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    _run(tmp_path / "c", seed=4)
    other = load_file(str(tmp_path / "c" / "adapter_model.safetensors"))
    assert not all(
        torch.equal(a[key], other[key]) for key in a
    )  # the seed does drive crops, batches, dropout
