"""Run folders for the tests: one written without training (a tiny backbone folder with an image processor and a
model saved next to metrics.json, a model card and plots, as `vpdml train` leaves them), and a short real LoRA
training run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import ViTImageProcessor, ViTModel

import vpdml
from helpers.models import tiny_vit
from vpdml import hub
from vpdml.training import TrainingArguments, TrainResult, build_model, train

#: the backbone folder's preprocessing (not ImageNet's, so a test sees it travel)
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
EMBEDDING_DIM = 16


def write_backbone(folder: Path) -> Path:
    """A 2-layer ViT (32 x 32 images, 8 x 8 patches) and its image processor, as a local "Hub" folder."""
    tiny_vit(0, num_hidden_layers=2).save_pretrained(folder)
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=list(MEAN), image_std=list(STD)
    ).save_pretrained(folder)
    return folder


def randomize_(model: torch.nn.Module, names: tuple[str, ...], seed: int = 3) -> None:
    """Give zero-initialised trainable parts (BitFit offsets, LoRA B) random values, so that they show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in names):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def write_run(folder: Path, backbone: Path, method: str = "vptsp-g", image_size: int = 32) -> torch.nn.Module:
    """Save a freshly built ``method`` model on ``backbone`` into ``folder`` like a finished run; return the model."""
    torch.manual_seed(1)
    options = {"embedding_dim": EMBEDDING_DIM}
    if method not in ("lora", "full-finetune"):
        options |= {"num_prompts": 3, "class_prompts": 2}
    if method == "lora":
        options["lora_rank"] = 4
    model = build_model(
        ViTModel.from_pretrained(backbone, add_pooling_layer=False), method, 5, **options
    ).eval()
    randomize_(model, ("vpdml_bitfit", "lora_B"))
    dml = vpdml.as_dml_model(model)
    dml.save(folder, with_training_state=False)
    metrics = {"dataset": "toy", "method": dml.describe(), "image_size": image_size, "trained": {"test": {}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    for plot in ("training_curves.png", "retrieval_grid.png"):
        (folder / plot).write_bytes(b"\x89PNG plot")
    if dml.is_adapter:
        hub.write_model_card(
            folder,
            base_model=str(backbone),
            dataset="toy",
            method=dml.describe(),
            peft_config={"num_prompts": 3},
            trainable_parameters=1,
            total_backbone_parameters=2,
            metrics={"test": {"recall@1": 0.5}},
            training_args=None,
            library_version=vpdml.__version__,
        )
    return model


def train_tiny_lora(tmp_path: Path, *, layers: int, **options) -> tuple[torch.nn.Module, TrainResult, int]:
    """Train a LoRA model (``build_model("lora", ..., **options)``) for 2 epochs on generated layouts of 16 classes
    through ``train()``, into ``tmp_path / "run"``, its backbone saved in ``tmp_path / "backbone"``; returns the
    model, the training result and the number of training images."""
    from helpers.toy_images import NORMALISATION, layout_splits

    splits = layout_splits(num_classes=16, per_class=4, seed=2, validation_classes=0)
    backbone = tiny_vit(1, num_hidden_layers=layers)
    backbone.save_pretrained(tmp_path / "backbone")
    torch.manual_seed(1)
    model = build_model(backbone, "lora", splits.num_train_classes, embedding_dim=16, **options)
    model.lora_config.base_model_name_or_path = str(tmp_path / "backbone")
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        method="lora",
        epochs=2,
        classes_per_batch=4,
        learning_rate=1e-2,
        image_size=32,
        show_progress=False,
        report_to="none",
        recall_at=(1,),
    )
    result = train(model, splits, args, image_processor=NORMALISATION)
    return model, result, len(splits.train)
