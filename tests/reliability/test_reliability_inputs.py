"""Bad input through the public API: each case gives a clear error (what, where, how to fix).

Cases already covered elsewhere are listed in docs/reliability.md with their tests; this file adds the rest:
unreadable image files, odd image modes and sizes from disk, adapter configs with unknown or missing fields,
an empty batch, and a loss that turns NaN during training.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import load_file

import vpdml
from helpers.models import tiny_vit
from helpers.toy_images import NORMALISATION, layout_splits, write_image_folder
from vpdml.cli import main
from vpdml.data import DMLTransformDataset, load_dml_dataset, transforms_from_processor
from vpdml.training import NonFiniteLossError, TrainingArguments, build_model, train

pytestmark = pytest.mark.usefixtures("single_thread")


def _decode_all(splits) -> dict[str, str]:
    """Decode every image of every split; ``{file name: error message}`` for those that fail."""
    _, transform = transforms_from_processor(NORMALISATION, 32)
    errors = {}
    for split in (splits.train, splits.test):
        images = DMLTransformDataset(split, transform)
        for index in range(len(images)):
            try:
                images[index]
            except ValueError as error:
                errors[str(error).split("(file ")[1].split(")")[0].rsplit("/", 2)[-1]] = str(error)
    return errors


def test_unreadable_and_truncated_image_files_name_the_file(tmp_path):
    root = write_image_folder(tmp_path / "images", num_classes=4, per_class=3)
    truncated = root / "class_00" / "1.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    (root / "class_02" / "2.png").write_bytes(b"not an image at all")
    errors = _decode_all(load_dml_dataset("imagefolder", data_dir=root))
    assert set(errors) == {"1.png", "2.png"}
    assert "class_00/1.png" in errors["1.png"] and "truncated" in errors["1.png"]
    assert "class_02/2.png" in errors["2.png"] and "re-save or remove it" in errors["2.png"]


def test_any_mode_and_size_from_disk_becomes_a_normalised_rgb_tensor(tmp_path):
    """Grayscale, RGBA, palette, CMYK (JPEG), 16-bit PNG; 1x1, very thin and large images."""
    rng = np.random.default_rng(0)
    folder_a, folder_b = tmp_path / "images" / "a", tmp_path / "images" / "b"
    folder_a.mkdir(parents=True)
    folder_b.mkdir(parents=True)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    rgb.convert("L").save(folder_a / "gray.png")
    rgb.convert("RGBA").save(folder_a / "rgba.png")
    rgb.convert("P").save(folder_a / "palette.png")
    rgb.convert("CMYK").save(folder_a / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65536, (40, 40), dtype=np.uint16)).save(folder_b / "deep16.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder_b / "one_pixel.png")
    Image.new("RGB", (3, 700), (200, 0, 0)).save(folder_b / "thin.png")
    Image.new("RGB", (1500, 1000), (0, 0, 200)).save(folder_b / "large.jpg")
    splits = load_dml_dataset("imagefolder", data_dir=tmp_path / "images")
    train_transform, eval_transform = transforms_from_processor(NORMALISATION, 32)
    for split in (splits.train, splits.test):
        for transform in (train_transform, eval_transform):
            for sample in DMLTransformDataset(split, transform, seed=0):
                assert sample["pixel_values"].shape == (3, 32, 32)
                assert sample["pixel_values"].dtype == torch.float32
                assert torch.isfinite(sample["pixel_values"]).all()


def test_empty_image_folder_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="doesn't contain any data files"):
        load_dml_dataset("imagefolder", data_dir=tmp_path / "empty")


def test_embed_refuses_an_empty_batch_and_non_tensors():
    model = get_peft_model(
        tiny_vit(), vpdml.VisualPromptDMLConfig(num_prompts=2, embedding_dim=8, semantic_proxies="none")
    )
    with pytest.raises(ValueError, match=r"empty batch \(B = 0\)"):
        model.embed(torch.zeros(0, 3, 32, 32))
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        model.embed(np.zeros((2, 3, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match=r"got \(3, 32, 32\)"):
        model.embed(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="smaller than one 8x8 patch"):
        model.embed(torch.zeros(1, 3, 4, 4))


def _saved_adapter(tmp_path: Path) -> tuple[Path, dict]:
    model = get_peft_model(
        tiny_vit(), vpdml.VisualPromptDMLConfig(num_prompts=2, embedding_dim=8, num_classes=3)
    )
    model.save_pretrained(tmp_path)
    return tmp_path, json.loads((tmp_path / "adapter_config.json").read_text())


def test_adapter_config_with_an_unknown_field_warns_naming_it(tmp_path):
    folder, config = _saved_adapter(tmp_path)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "num_promts": 5}))
    with pytest.warns(
        UserWarning, match=r"field\(s\) \['num_promts'\] that VisualPromptDMLConfig does not know"
    ):
        loaded = PeftModel.from_pretrained(tiny_vit(), folder)
    assert loaded.peft_config["default"].num_prompts == 2


@pytest.mark.parametrize("field", ["num_prompts", "embedding_dim", "pooling"])
def test_adapter_config_missing_a_weight_shape_field_is_refused(tmp_path, field):
    folder, config = _saved_adapter(tmp_path)
    del config[field]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"lacks the field\(s\) \['{field}'\]"):
        PeftModel.from_pretrained(tiny_vit(), folder)


def test_adapter_config_with_a_bad_value_or_broken_json_is_refused(tmp_path):
    folder, config = _saved_adapter(tmp_path)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "num_prompts": "ten"}))
    with pytest.raises(ValueError, match="num_prompts must be an integer >= 0, got 'ten'"):
        PeftModel.from_pretrained(tiny_vit(), folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(json.JSONDecodeError):
        PeftModel.from_pretrained(tiny_vit(), folder)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    splits = layout_splits(num_classes=12, per_class=4, seed=2, validation_classes=0)
    torch.manual_seed(1)
    model = build_model(tiny_vit(1, num_hidden_layers=1), "vptsp-g", splits.num_train_classes, num_prompts=2)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        classes_per_batch=4,
        samples_per_class=2,
        image_size=32,
        checkpoint_every_steps=1,
        keep_checkpoints=None,
        show_progress=False,
    )

    def diverge(state):  # what a too-high learning rate does, on cue: the weights turn NaN after step 2
        if state.global_step == 2:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if param.requires_grad and "vpdml_head" in name:
                        param.fill_(math.nan)

    with pytest.raises(NonFiniteLossError, match=r"NaN or Inf between optimizer steps 3 and 3") as caught:
        train(model, splits, args, image_processor=NORMALISATION, step_callback=diverge)
    message = str(caught.value)
    assert "last good checkpoint is kept" in message and f"checkpoints{os.sep}step-2)" in message
    assert "resume_from_checkpoint='latest'" in message
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step-1", "step-2"]
    for tensor in load_file(str(tmp_path / "checkpoints" / "step-2" / "adapter_model.safetensors")).values():
        assert torch.isfinite(tensor).all()
    assert not (tmp_path / "adapter_model.safetensors").exists()  # nothing released from broken weights


def test_cli_reports_a_corrupt_image_without_a_traceback(tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", num_classes=4, per_class=2)
    (root / "class_03" / "1.png").write_bytes(b"garbage")
    backbone = tmp_path / "backbone"
    tiny_vit(0, num_hidden_layers=1).save_pretrained(backbone)
    flags = [
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(root),
        "--backbone",
        str(backbone),
        "--method",
        "vpt",
    ]
    flags += ["--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--classes-per-batch", "2"]
    flags += ["--image-size", "32", "--no-show-progress"]
    with pytest.warns(UserWarning, match="No image processor"):
        assert main(["train", *flags]) == 1
    error = capsys.readouterr().err
    assert "vpdml train: error: Image" in error and "class_03/1.png" in error and "cannot be decoded" in error
