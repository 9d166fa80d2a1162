"""LoRA as a first-class baseline: PEFT's LoRA on the backbone, vpdml's head, proxies, loss and loop."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from helpers.models import tiny_vit
from helpers.runs import train_tiny_lora
from vpdml import LoRADML, as_dml_model
from vpdml.retrieval.pretrained import load_trained_model
from vpdml.training import build_model

pytestmark = pytest.mark.usefixtures("single_thread")


def test_only_the_low_rank_factors_head_and_proxies_train(pixels, labels):
    model = build_model(tiny_vit(0), "lora", 5, embedding_dim=16, lora_rank=4)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {
        name
        for name, _ in model.named_parameters()
        if "lora_" in name or name.startswith(("head.", "proxies."))
    }
    assert any(".q_proj.lora_A." in name or ".query.lora_A." in name for name in trainable)
    # r x (D_in + D_out) per projection: 2 projections (query, value) in each of 3 layers, D = 32
    assert sum(model.state_dict()[n].numel() for n in trainable if "lora_" in n) == 3 * 2 * 4 * (32 + 32)
    assert as_dml_model(model).describe() == "LoRA r=4 (Proxy Anchor)"
    before = model.embed(pixels).detach()
    frozen = tiny_vit(0)
    torch.testing.assert_close(
        model.backbone(pixel_values=pixels).last_hidden_state, frozen(pixel_values=pixels).last_hidden_state
    )  # B = 0 at start
    loss = model.dml_loss(pixels, labels)
    loss.backward()
    assert all(param.grad is not None for name, param in model.named_parameters() if "lora_B" in name)
    assert before.shape == (4, 16)


def test_saved_the_peft_way_and_reloaded_exactly(tmp_path, pixels, labels):
    torch.manual_seed(0)
    model = build_model(tiny_vit(0), "lora", 5, embedding_dim=16, lora_rank=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model.dml_loss(pixels, labels).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model.embed(pixels)
        features = model.backbone(pixel_values=pixels).last_hidden_state
    model.save_pretrained(tmp_path)
    assert {path.name for path in tmp_path.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "dml_head.safetensors",
        "dml_head_config.json",
    }
    again = LoRADML.from_pretrained(tmp_path, tiny_vit(0)).eval()
    with torch.no_grad():
        assert torch.equal(again.embed(pixels), expected)
        # PEFT itself reads the adapter: same backbone features
        peft_backbone = PeftModel.from_pretrained(tiny_vit(0), str(tmp_path)).eval()
        torch.testing.assert_close(
            peft_backbone(pixel_values=pixels).last_hidden_state, features, rtol=0, atol=1e-6
        )


def test_sampled_negatives_state_round_trips(tmp_path, pixels, labels):
    model = build_model(tiny_vit(0), "lora", 5, embedding_dim=16, lora_rank=4, proxy_negatives=2)
    model.dml_loss(pixels, labels)  # advances the sampling counter
    model.save_pretrained(tmp_path)
    again = LoRADML.from_pretrained(tmp_path, tiny_vit(0))
    assert torch.equal(again.proxies.negative_sampling, model.proxies.negative_sampling)
    assert not (tmp_path / "dml_semantic_proxies.safetensors").exists()


def test_a_lora_file_of_another_rank_is_refused(tmp_path):
    build_model(tiny_vit(0), "lora", 5, lora_rank=4).save_pretrained(tmp_path)
    other = build_model(tiny_vit(0), "lora", 5, lora_rank=2)
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_weights(tmp_path)


def test_unknown_targets_and_options_get_clear_errors():
    with pytest.raises(ValueError, match="LoRA found none of"):
        build_model(tiny_vit(0), "lora", 5, lora_target_modules=["nowhere"])
    with pytest.raises(ValueError, match="lora does not take \\['num_prompts'\\]"):
        build_model(tiny_vit(0), "lora", 5, num_prompts=3)


def test_trains_through_the_loop_and_loads_like_any_trained_model(tmp_path):
    model, result, train_images = train_tiny_lora(tmp_path, layers=2, pooling="mean")
    assert result.global_step == 2 * (train_images // 8)  # 2 epochs of batches of 4 classes x 2 images
    loaded, backbone_name = load_trained_model(str(tmp_path / "run"))
    assert isinstance(loaded, LoRADML) and backbone_name == str(tmp_path / "backbone")
    test_images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.embed(test_images), model.eval().embed(test_images))
