"""Two tiny adapters on one tiny random ViT and their gallery indexes, for the demo-app tests."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model
from transformers import ViTModel

from helpers.models import tiny_vit
from helpers.toy_images import write_image_folder
from vpdml import VisualPromptDMLConfig
from vpdml.cli import main


def write_adapters_and_indexes(root: Path) -> dict[str, Path]:
    """``root/backbone``, adapters ``root/adapter_a`` and ``root/adapter_b`` (different seeds), 8 images under
    ``root/images`` (4 classes) and one index per adapter, ``root/a.index`` and ``root/b.index``, built with
    `vpdml index build` (so they record adapter, backbone and crop size as on the command line).

    The ViT's larger initialisation keeps its features apart (a default random ViT maps every image to almost the
    same vector): an image's nearest gallery neighbour other than itself scores below 0.9.
    """
    tiny_vit(0, num_hidden_layers=2, initializer_range=0.2).save_pretrained(root / "backbone")
    images = write_image_folder(root / "images", num_classes=4, per_class=2)
    paths = {"root": root, "backbone": root / "backbone", "images": images}
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        config = VisualPromptDMLConfig(num_prompts=2, embedding_dim=16, semantic_proxies="none", bitfit=True)
        model = get_peft_model(ViTModel.from_pretrained(root / "backbone", add_pooling_layer=False), config)
        model.save_pretrained(root / f"adapter_{name}")
        out = root / f"{name}.index"
        args = ["index", "build", "--adapter", str(root / f"adapter_{name}"), "--images", str(images)]
        assert main([*args, "--out", str(out), "--batch-size", "4"]) == 0
        paths[f"adapter_{name}"], paths[name] = root / f"adapter_{name}", out
    return paths
