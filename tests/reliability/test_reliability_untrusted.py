"""Untrusted files: nothing is unpickled, tampered or truncated files fail clearly, tokens are never written."""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import vpdml
import vpdml.hub
from helpers.models import tiny_vit
from helpers.toy_images import NORMALISATION, layout_splits, write_image_folder
from vpdml.cli import main
from vpdml.training import TrainingArguments, build_model, train

pytestmark = pytest.mark.usefixtures("single_thread")

SRC = Path(vpdml.__file__).resolve().parent
TOKEN = "hf_" + "Zq7" * 12


# --------------------------------------------------------------------------------------------------
# No unpickling anywhere
# --------------------------------------------------------------------------------------------------


def test_the_library_never_unpickles():
    """No ``pickle``/``dill``/``joblib``/``marshal`` import, and every ``torch.load`` passes ``weights_only=True``."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                if any(
                    name.split(".")[0] in ("pickle", "dill", "joblib", "marshal", "cloudpickle")
                    for name in names
                ):
                    offenders.append(f"{path.name}:{node.lineno} imports {names}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
            ):
                base = node.func.value
                if isinstance(base, ast.Name) and base.id == "torch":
                    safe = any(
                        kw.arg == "weights_only"
                        and isinstance(kw.value, ast.Constant)
                        and kw.value.value is True
                        for kw in node.keywords
                    )
                    if not safe:
                        offenders.append(
                            f"{path.name}:{node.lineno} calls torch.load without weights_only=True"
                        )
    assert not offenders, offenders


def _adapter(folder: Path) -> Path:
    model = get_peft_model(
        tiny_vit(), vpdml.VisualPromptDMLConfig(num_prompts=2, embedding_dim=8, num_classes=3)
    )
    model.save_pretrained(folder)
    return folder


class _RunsCode:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_a_pickled_bin_adapter_is_refused_without_running_its_code(tmp_path):
    folder = _adapter(tmp_path / "adapter")
    weights = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    with open(folder / "adapter_model.bin", "wb") as file:
        pickle.dump({**weights, "payload": _RunsCode(marker)}, file)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        PeftModel.from_pretrained(tiny_vit(), folder)
    assert not marker.exists()


def test_a_truncated_or_reshaped_adapter_fails_before_use(tmp_path):
    folder = _adapter(tmp_path / "adapter")
    path = folder / "adapter_model.safetensors"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(SafetensorError, match="incomplete metadata"):
        PeftModel.from_pretrained(tiny_vit(), folder)
    path.write_bytes(good)
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("proj.weight"))
    save_file({**tensors, key: torch.zeros(5, 5)}, str(path))
    with pytest.raises(ValueError, match=r"proj\.weight has shape \(5, 5\), the config expects"):
        PeftModel.from_pretrained(tiny_vit(), folder)


@pytest.mark.parametrize("tamper", ["missing", "unexpected", "nan"])
def test_an_adapter_with_missing_extra_or_non_finite_tensors_is_refused(tmp_path, tamper):
    # PEFT itself only warns about missing keys (leaving those weights random) and ignores extra ones.
    folder = _adapter(tmp_path / "adapter")
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if "vpdml_prompts" in k)
    if tamper == "missing":
        del tensors[key]
        message = r"missing \['base_model\.vpdml_prompts"
    elif tamper == "unexpected":
        tensors["base_model.vpdml_prompts.prompts.layer_99"] = torch.zeros(2, 2)
        message = r"unexpected \['base_model\.vpdml_prompts\.prompts\.layer_99'\]"
    else:
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        message = "contains NaN or Inf"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(tiny_vit(), folder)


# --------------------------------------------------------------------------------------------------
# Tampered checkpoints
# --------------------------------------------------------------------------------------------------

_SETTINGS = {
    "max_steps": 2,
    "classes_per_batch": 4,
    "samples_per_class": 2,
    "image_size": 32,
    "checkpoint_every_steps": 2,
    "show_progress": False,
}


def _model(num_classes: int):
    torch.manual_seed(0)
    return build_model(tiny_vit(0, num_hidden_layers=1), "vptsp-g", num_classes, num_prompts=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    splits = layout_splits(num_classes=12, per_class=4, seed=2, validation_classes=0)
    train(
        _model(splits.num_train_classes),
        splits,
        TrainingArguments(output_dir=str(root / "run"), **_SETTINGS),
        image_processor=NORMALISATION,
    )
    return splits, root / "run" / "checkpoints" / "step-2"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(path.stat().st_size // 2, 1)])


def _retype(path: Path) -> None:
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    save_file({**tensors, key: tensors[key].double()}, str(path))


def _reshape(path: Path) -> None:
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if k.endswith("proj.weight"))
    save_file({**tensors, key: torch.zeros(3, 3)}, str(path))


TAMPERING = [
    ("trainer_state.json", _truncate, r"trainer_state\.json is not valid JSON \(truncated or edited\?\)"),
    (
        "adapter_model.safetensors",
        _truncate,
        r"adapter_model\.safetensors is not a readable safetensors file",
    ),
    (
        "adapter_model.safetensors",
        _reshape,
        r"(?s)adapter_model\.safetensors does not fit this adapter.*has shape \(3, 3\), the config expects",
    ),
    ("vpdml_training_state.safetensors", _truncate, "is not a readable safetensors file"),
    ("vpdml_training_state.safetensors", _retype, r"torch\.float64, this adapter expects .* torch\.float32"),
    ("optimizer.safetensors", _truncate, r"optimizer\.safetensors is not a readable safetensors file"),
    ("optimizer.json", Path.unlink, r"optimizer\.json is missing: the checkpoint folder is incomplete"),
    ("scheduler.json", _truncate, r"scheduler\.json is not valid JSON"),
    ("rng_state_0.safetensors", _truncate, r"rng_state_0\.safetensors is not a readable safetensors file"),
]


@pytest.mark.parametrize(
    ("name", "tamper", "message"), TAMPERING, ids=[f"{n}-{t.__name__.strip('_')}" for n, t, _ in TAMPERING]
)
def test_a_tampered_checkpoint_is_refused_naming_the_file(checkpoint, tmp_path, name, tamper, message):
    splits, original = checkpoint
    copy = tmp_path / "checkpoints" / "step-2"
    shutil.copytree(original, copy)
    tamper(copy / name)
    args = TrainingArguments(output_dir=str(tmp_path), resume_from_checkpoint=str(copy), **_SETTINGS)
    with pytest.raises(ValueError if name != "optimizer.json" else FileNotFoundError, match=message):
        train(_model(splits.num_train_classes), splits, args, image_processor=NORMALISATION)


# --------------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------------


def test_the_hub_token_is_not_in_a_repr():
    assert TOKEN not in repr(TrainingArguments(output_dir="x", hub_token=TOKEN))


def test_vpdml_train_never_prints_logs_or_writes_the_token(tmp_path, monkeypatch, capsys, caplog):
    pushed = []
    monkeypatch.setattr(vpdml.hub, "push_adapter_to_hub", lambda *a, **k: pushed.append(k) or "https://hub/x")
    backbone = tmp_path / "backbone"
    tiny_vit(0, num_hidden_layers=1).save_pretrained(backbone)
    images = write_image_folder(tmp_path / "images", num_classes=4, per_class=2)
    output = tmp_path / "run"
    flags = ["--dataset", "imagefolder", "--data-dir", str(images), "--backbone", str(backbone)]
    flags += ["--method", "vpt", "--output-dir", str(output), "--max-steps", "2", "--classes-per-batch", "2"]
    flags += ["--image-size", "32", "--recall-at", "1", "--checkpoint-every-steps", "1", "--no-show-progress"]
    flags += ["--push-to-hub", "me/tiny", "--hub-token", TOKEN]
    caplog.set_level(logging.DEBUG)
    with pytest.warns(UserWarning, match="No image processor"):
        assert main(["train", *flags]) == 0
    assert pushed == [{"token": TOKEN, "private": False}]  # handed to the Hub client, and nowhere else
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text
    written = [path for path in output.rglob("*") if path.is_file()]
    assert any(path.name == "trainer_state.json" for path in written)
    for path in written:
        assert TOKEN.encode() not in path.read_bytes(), path
    assert (
        json.loads((output / "checkpoints" / "step-2" / "trainer_state.json").read_text())["args"].get(
            "hub_token"
        )
        is None
    )
    assert os.environ.get("HF_TOKEN") != TOKEN
