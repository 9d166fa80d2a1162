"""Two CPU processes (gloo) train like one process on the same global batch.

The same script runs once as a single process and once under ``torch.distributed.run`` with two processes
(``ACCELERATE_USE_CPU=1`` makes accelerate use gloo on the CPU). What must hold:

* both ranks end with bit-identical adapters and semantic-proxy state (DDP averages gradients; the state rows each
  rank updates are all-gathered after every forward pass);
* the two-process run equals the one-process run on the same global batch: the loss is the global-batch Proxy
  Anchor loss on both, so only floating-point summation order differs. Tolerances: logged losses 1e-5 relative,
  parameters and semantic state 1e-4 absolute, retrieval metrics equal (to 1e-9).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    sys.path.insert(0, {tests!r})
    import torch

    torch.set_num_threads(1)
    from accelerate import PartialState
    from safetensors.torch import save_file

    from helpers.models import tiny_vit
    from helpers.toy_images import NORMALISATION, layout_splits
    from vpdml.training import TrainingArguments, build_model, train

    out = Path(sys.argv[1])
    splits = layout_splits(num_classes=24, per_class=4, seed=2, validation_classes=4)
    backbone = tiny_vit(1, num_hidden_layers=2)
    torch.manual_seed(1)
    model = build_model(
        backbone,
        "vptsp-g",
        splits.num_train_classes,
        num_prompts=4,
        class_prompts=2,
        pooling="mean",
        bitfit=True,
        class_prompt_storage=sys.argv[2],
        proxy_negatives=None if sys.argv[3] == "all" else int(sys.argv[3]),
        proxy_pass_tokens=None if sys.argv[4] == "all" else float(sys.argv[4]),
    )
    args = TrainingArguments(
        output_dir=str(out), epochs=2, classes_per_batch=4, samples_per_class=2, learning_rate=1e-2,
        proxy_learning_rate=0.1, image_size=32, train_crop_scale=(0.5, 1.0), eval_batch_size=7, log_every=2,
        checkpoint_every_steps=5, show_progress=False,
    )
    result = train(model, splits, args, image_processor=NORMALISATION)
    state = PartialState()
    tensors = {{name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}}
    bank = model.base_model.dml_proxies["default"]
    tensors.update({{name: buffer.contiguous() for name, buffer in bank.named_buffers()}})
    save_file(tensors, str(out / f"rank{{state.process_index}}.safetensors"))
    report = {{"metrics": result.metrics, "history": result.history, "num_processes": state.num_processes}}
    (out / f"rank{{state.process_index}}.json").write_text(json.dumps(report))
    """
)


def run(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize(
    ("storage", "negatives", "tokens"),
    [("dense", "all", "all"), ("sparse", "all", "all"), ("dense", "5", "all"), ("dense", "all", "0.25")],
)
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, storage, negatives, tokens):
    """``sparse`` class prompts have row-sparse gradients, which bypass DDP and are all-gathered by vpdml. With 5
    sampled negatives (of the 16 classes outside a batch) the learnable proxies are row-sparse too, and every process
    must draw the one-process run's sample from the global batch's classes. A token subset in the proxy pass draws
    per (seed, micro-step, rank), so two processes draw other subsets than one: there only the ranks must agree."""
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run([*launcher, str(script), str(tmp_path / "two"), storage, negatives, tokens], tmp_path)
    if tokens != "all":
        rank0, rank1 = (load_file(str(tmp_path / f"two/rank{rank}.safetensors")) for rank in (0, 1))
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), key
        return
    run([sys.executable, str(script), str(tmp_path / "one"), storage, negatives, tokens], tmp_path)

    reports = {
        name: json.loads((tmp_path / name).read_text()) for name in ("one/rank0.json", "two/rank0.json")
    }
    assert reports["one/rank0.json"]["num_processes"] == 1 and reports["two/rank0.json"]["num_processes"] == 2

    # Both ranks hold exactly the same adapter and semantic-proxy state.
    rank0, rank1 = (
        load_file(str(tmp_path / "two/rank0.safetensors")),
        load_file(str(tmp_path / "two/rank1.safetensors")),
    )
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert (tmp_path / "two/checkpoints/step-5/rng_state_1.safetensors").is_file()

    # ... and the same as one process on the same global batches.
    single = load_file(str(tmp_path / "one/rank0.safetensors"))
    for key in single:
        if "attn_k" in key:
            # Key biases add the same constant to every attention logit of a query: softmax ignores it, so their
            # true gradient is 0 and Adam turns float noise (which differs with summation order) into lr-sized
            # steps. They cannot change any output, which the metric check below confirms.
            continue
        torch.testing.assert_close(rank0[key], single[key], atol=1e-4, rtol=0, msg=key)
    one, two = reports["one/rank0.json"], reports["two/rank0.json"]
    for kind in ("zero_shot", "trained"):
        for split, metrics in one["metrics"][kind].items():
            assert two["metrics"][kind][split] == pytest.approx(metrics, abs=1e-9), (kind, split)
    assert [row.keys() for row in one["history"]] == [row.keys() for row in two["history"]]
    for row_one, row_two in zip(one["history"], two["history"], strict=True):
        if "loss" in row_one:
            assert row_two["loss"] == pytest.approx(row_one["loss"], rel=1e-5)
