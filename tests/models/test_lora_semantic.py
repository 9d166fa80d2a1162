"""Semantic proxies on top of LoRA: the prompt tuner's proxy pass through a LoRA-adapted backbone."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from helpers.models import tiny_vit
from helpers.runs import train_tiny_lora
from vpdml import LoRADML, VisualPromptDMLConfig, as_dml_model
from vpdml.retrieval.pretrained import load_trained_model
from vpdml.training import build_model

pytestmark = pytest.mark.usefixtures("single_thread")

SEMANTIC = {
    "semantic_proxies": "gru",
    "class_prompts": 2,
    "proxy_pass_layers": 2,
    "semantic_images_per_class": 1,
}


def lora_sp(seed: int = 0, **overrides) -> LoRADML:
    torch.manual_seed(seed)
    options = {"embedding_dim": 16, "lora_rank": 4, **SEMANTIC, **overrides}
    return build_model(tiny_vit(0), "lora", 6, **options)


def test_its_proxy_pass_is_the_prompt_tuners(pixels, labels):
    """With LoRA's B = 0 (its start) the backbone is the frozen one, so the semantic vectors must equal those of
    the prompt tuner with no shared prompts and the same class prompts, proxy head and GRU."""
    model = lora_sp().train()
    config = VisualPromptDMLConfig(num_prompts=0, num_classes=6, embedding_dim=16, bitfit=False, **SEMANTIC)
    tuner = get_peft_model(tiny_vit(0), config).train()
    tuner.base_model.dml_proxies["default"].load_state_dict(model.proxies.state_dict())
    tuner.base_model.vpdml_head["default"].load_state_dict(model.head.state_dict())
    ours, theirs = model.dml_forward(pixels, labels), tuner.dml_forward(pixels, labels)
    torch.testing.assert_close(ours.embeddings, theirs.embeddings)
    torch.testing.assert_close(ours.semantic_embeddings, theirs.semantic_embeddings)
    for mine, reference in zip(ours.semantic_rows, theirs.semantic_rows, strict=True):
        torch.testing.assert_close(mine, reference)
    assert as_dml_model(model).describe() == "LoRA r=4 + semantic proxies (GRU)"
    assert model.proxies.class_prompts.weight.shape == (6, 4, 32)  # 2 prompts in each of the last 2 blocks


def test_its_token_subset_is_the_prompt_tuners(pixels, labels):
    """``proxy_pass_tokens`` on LoRA keeps the same patches as on the prompt tuner (same generator state)."""
    model = lora_sp(proxy_pass_tokens=0.5).train()
    config = VisualPromptDMLConfig(
        num_prompts=0, num_classes=6, embedding_dim=16, bitfit=False, proxy_pass_tokens=0.5, **SEMANTIC
    )
    tuner = get_peft_model(tiny_vit(0), config).train()
    tuner.base_model.dml_proxies["default"].load_state_dict(model.proxies.state_dict())
    tuner.base_model.vpdml_head["default"].load_state_dict(model.head.state_dict())
    torch.manual_seed(3)
    ours = model.dml_forward(pixels, labels).semantic_embeddings
    torch.manual_seed(3)
    theirs = tuner.dml_forward(pixels, labels).semantic_embeddings
    torch.testing.assert_close(ours, theirs)
    torch.manual_seed(4)  # another subset gives other vectors: the subset is in effect
    assert not torch.allclose(model.dml_forward(pixels, labels).semantic_embeddings, ours)
    assert model.settings["proxy_pass_tokens"] == 0.5


def test_gradients_reach_lora_class_prompts_and_the_gru_and_keys_stay_peft_s(pixels, labels):
    model = lora_sp().train()
    keys_before = set(model.state_dict())
    model.dml_loss(pixels, labels).backward()
    assert set(model.state_dict()) == keys_before  # the blocks are wrapped only during the pass
    assert not any(".base_layer.attention" in key for key in model.lora_state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {n for n in trainable if "lora_B" in n or "class_prompts" in n or "accumulator" in n} <= with_grad


def test_it_trains_through_the_loop_saves_and_loads(tmp_path):
    model, _, _ = train_tiny_lora(tmp_path, layers=3, **SEMANTIC)
    assert model.proxies.semantic_seen.any()  # the proxy pass ran and updated the semantic state
    loaded, _ = load_trained_model(str(tmp_path / "run"))
    assert isinstance(loaded, LoRADML) and loaded.semantic_config.proxy_pass_layers == 2
    test_images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.embed(test_images), model.eval().embed(test_images))
    assert torch.equal(loaded.proxies.semantic_state, model.proxies.semantic_state)
    # PEFT itself still reads the LoRA weights of a model trained with semantic proxies
    PeftModel.from_pretrained(tiny_vit(1, num_hidden_layers=3), str(tmp_path / "run"))
    # what embedding needs stays small: the class prompts and GRU are a file of their own, and optional
    head = load_file(tmp_path / "run" / "dml_head.safetensors")
    assert not any("class_prompts" in key or "accumulator" in key for key in head)
    (tmp_path / "run" / "dml_semantic_proxies.safetensors").unlink()
    embed_only, _ = load_trained_model(str(tmp_path / "run"))
    with torch.no_grad():
        assert torch.equal(embed_only.embed(test_images), loaded.embed(test_images))


def test_semantic_options_are_checked():
    with pytest.raises(ValueError, match="proxy_pass_layers must be None or an integer >= 1"):
        lora_sp(proxy_pass_layers=0)
    with pytest.raises(ValueError, match="semantic_proxies must be one of"):
        lora_sp(semantic_proxies="lstm")
