"""Fault injection: SIGKILL a real training process at seeded random points, resume, compare with a clean run.

The child process runs :func:`vpdml.training.train` on a tiny random ViT and generated images, with a checkpoint
after every optimizer step, ``resume_from_checkpoint="latest"`` (a fresh start while there is none), a validation
split (so ``best/`` is written during training) and checkpoint rotation. It prints ``STEP n`` after each step and
then pauses briefly, so a kill can land anywhere: between steps, in the middle of writing a checkpoint, rotating
the old ones, saving ``best/``, or evaluating. The resumed run must end bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vpdml.training.checkpoints import latest_checkpoint

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent

CHILD = """
import sys
sys.path[:0] = [{here!r}, {tests!r}]
from test_reliability_interrupts import train_tiny
train_tiny(sys.argv[1], pause=float(sys.argv[2]))
print("DONE", flush=True)
"""


def train_tiny(output_dir: str | Path, *, pause: float = 0.0) -> None:
    """The run under test (in the child process, and in-process for the reference)."""
    from transformers import (  # not conftest: importing every backbone family costs seconds
        ViTConfig,
        ViTModel,
    )

    from helpers.toy_images import NORMALISATION, layout_splits
    from vpdml.training import TrainingArguments, build_model, train

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        splits = layout_splits(num_classes=18, per_class=4, seed=3, validation_classes=3)
        torch.manual_seed(5)
        config = ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            image_size=32,
            patch_size=8,
        )
        backbone = ViTModel(config).eval()
        model = build_model(
            backbone,
            "vptsp-g",
            splits.num_train_classes,
            num_prompts=2,
            class_prompts=2,
            gru_dropout=0.2,
            pooling="mean",
        )
        args = TrainingArguments(
            output_dir=str(output_dir),
            max_steps=10,
            classes_per_batch=4,
            samples_per_class=2,
            image_size=32,
            learning_rate=1e-2,
            proxy_learning_rate=0.1,
            train_crop_scale=(0.5, 1.0),
            eval_steps=3,
            log_every=2,
            checkpoint_every_steps=1,
            keep_checkpoints=2,
            resume_from_checkpoint="latest",
            show_progress=False,
        )

        def report(state) -> None:
            print(f"STEP {state.global_step}", flush=True)
            time.sleep(pause)

        train(model, splits, args, image_processor=NORMALISATION, step_callback=report if pause else None)
    finally:
        torch.set_num_threads(previous)


def _run(
    script: Path,
    output_dir: Path,
    *,
    pause: float = 0.0,
    kill_after_step: int | None = None,
    delay: float = 0.0,
) -> tuple[str, int]:
    """Run the child; with ``kill_after_step``, SIGKILL it ``delay`` seconds after it reports that step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, str(script), str(output_dir), str(pause)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if kill_after_step is not None and line.strip() == f"STEP {kill_after_step}":
                time.sleep(delay)
                process.kill()  # SIGKILL: no handler, no cleanup, files left as they are
                break
        process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    return "".join(lines), process.returncode


@pytest.mark.parametrize("seed", [0])
def test_sigkilled_training_resumes_bit_identical_to_an_uninterrupted_run(tmp_path, seed):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(here=str(HERE), tests=str(TESTS)))

    reference_dir = tmp_path / "reference"
    train_tiny(reference_dir)  # in-process: the same code, one intra-op thread as in the child

    rng = random.Random(seed)
    run_dir = tmp_path / "interrupted"
    first = rng.randint(1, 3)
    kill_points = [first, rng.randint(first + 2, 8)]  # +2: the next step may be saved before the kill lands
    for step in kill_points:
        output, code = _run(script, run_dir, pause=0.15, kill_after_step=step, delay=rng.uniform(0, 0.25))
        assert code == -signal.SIGKILL, f"the child was not killed after step {step}:\n{output[-3000:]}"
        assert f"STEP {step}" in output
        assert latest_checkpoint(run_dir / "checkpoints") is not None
    train_tiny(run_dir)  # the final resume runs in-process: same code, saves a process start-up

    reference = load_file(str(reference_dir / "adapter_model.safetensors"))
    resumed = load_file(str(run_dir / "adapter_model.safetensors"))
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads(
        (reference_dir / "metrics.json").read_text()
    )
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.endswith((".tmp", ".old"))]
