"""Helper for tests/tuner/test_tuner.py: run under one transformers version, save or check an adapter.

usage: crossversion.py make-backbone DIR | save-adapter BACKBONE ADAPTER | check-adapter BACKBONE ADAPTER
"""

from __future__ import annotations

import sys

import torch
from peft import PeftModel, get_peft_model
from transformers import ViTConfig, ViTModel

import vpdml


def fixed_pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def main() -> None:
    command, *paths = sys.argv[1:]
    if command == "make-backbone":
        torch.manual_seed(0)
        config = ViTConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=48,
            image_size=32,
            patch_size=8,
        )
        ViTModel(config).save_pretrained(paths[0])
        return
    backbone = ViTModel.from_pretrained(paths[0]).eval()
    if command == "save-adapter":
        torch.manual_seed(1)
        config = vpdml.VisualPromptDMLConfig(num_prompts=4, bitfit=True, num_classes=5, embedding_dim=16)
        model = get_peft_model(backbone, config)
        with torch.no_grad():  # make every adapter tensor non-trivial, BitFit offsets included
            for param in model.base_model.vpdml_bitfit.parameters():
                param.normal_()
        model.eval()
        model.save_pretrained(paths[1])
        torch.save(model.embed(fixed_pixels()), f"{paths[1]}/expected.pt")
    elif command == "check-adapter":
        model = PeftModel.from_pretrained(backbone, paths[1]).eval()
        expected = torch.load(f"{paths[1]}/expected.pt", weights_only=True)
        actual = model.embed(fixed_pixels())
        diff = (actual - expected).abs().max().item()
        print(f"max abs diff {diff:.3g}")
        sys.exit(0 if diff < 1e-5 else 1)


if __name__ == "__main__":
    main()
