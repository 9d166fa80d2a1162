"""Prompts as keys and values only: the same model as prompts as full tokens, for less compute."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model
from transformers.models.vit.modeling_vit import ViTLayer

import vpdml
from helpers.models import BACKBONE_KINDS, assert_gradients_close, tiny_backbone, tiny_vit
from vpdml.tuner.layer import PromptedBlock
from vpdml.tuner.prompt_keys import PromptKeysAttention, find_attention_layout

SMALL = {"num_prompts": 3, "class_prompts": 2, "num_classes": 6, "embedding_dim": 16}


def vptsp_g(backbone, **overrides):
    return get_peft_model(
        backbone, vpdml.VisualPromptDMLConfig.for_method("vptsp-g", **{**SMALL, **overrides})
    )


def blocks_of(model) -> list[PromptedBlock]:
    tuner = model.base_model
    return list(tuner.model.get_submodule(tuner.backbone_info.blocks_path))


def prompted_calls(model) -> int:
    return sum(block._prompt_keys.prompted_calls for block in blocks_of(model))


def step(model, pixels, labels, seed=0):
    """One training step's loss and gradients (the seed fixes GRU dropout and the token subsets)."""
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model.dml_loss(pixels, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(got: dict, expected: dict) -> None:
    assert len(expected) > 10
    assert_gradients_close(got, expected, atol_per_unit=1e-5)


@pytest.mark.parametrize("kind", BACKBONE_KINDS)
def test_prompts_as_keys_give_the_full_token_model(kind, pixels, labels):
    keys, tokens = vptsp_g(tiny_backbone(kind)), vptsp_g(tiny_backbone(kind))
    tokens.base_model.load_state_dict(keys.base_model.state_dict())
    tokens.base_model.prompts_as_keys = False
    with torch.no_grad():  # prompts away from their start, so a dropped prompt would show
        for model in (keys, tokens):
            for param in model.base_model.vpdml_prompts.parameters():
                param.add_(torch.linspace(-1, 1, param.numel()).view_as(param))
    torch.testing.assert_close(keys.eval().embed(pixels), tokens.eval().embed(pixels), rtol=1e-5, atol=1e-5)
    assert prompted_calls(keys) == len(blocks_of(keys)) and prompted_calls(tokens) == 0
    loss_keys, grads_keys = step(keys, pixels, labels)
    loss_tokens, grads_tokens = step(tokens, pixels, labels)
    torch.testing.assert_close(loss_keys, loss_tokens, rtol=1e-5, atol=1e-5)
    assert_same_gradients(grads_keys, grads_tokens)


def test_the_blocks_compute_only_the_image_tokens(pixels):
    model = vptsp_g(tiny_vit(0)).eval()
    image_tokens = 1 + (32 // 8) ** 2
    seen: list[int] = []
    for block in blocks_of(model):
        block.base_layer.mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    model.embed(pixels)
    model.base_model.prompts_as_keys = False
    model.embed(pixels)
    assert seen == [image_tokens] * 3 + [image_tokens + SMALL["num_prompts"]] * 3


def test_a_mixed_adapter_batch_keeps_each_images_prompts(pixels):
    model = vptsp_g(tiny_vit(0))
    model.add_adapter("other", vpdml.VisualPromptDMLConfig.for_method("vptsp-g", **SMALL))
    with torch.no_grad():
        for param in model.base_model.vpdml_bitfit["other"].parameters():
            param.normal_(0, 0.1)
    model.eval()
    names = ["default", "other", "other", "default"]
    mixed = model.embed(pixels, adapter_names=names)
    model.base_model.prompts_as_keys = False
    torch.testing.assert_close(mixed, model.embed(pixels, adapter_names=names), rtol=1e-5, atol=1e-5)
    for row, name in enumerate(names):
        alone = model.embed(pixels[row : row + 1], adapter_name=name)
        torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_replays_the_prompts(pixels, labels):
    plain, checkpointed = (vptsp_g(tiny_vit(0), proxy_pass_tokens=None) for _ in range(2))
    checkpointed.base_model.load_state_dict(plain.base_model.state_dict())
    checkpointed.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    loss, grads = step(plain, pixels, labels)
    before = prompted_calls(checkpointed)
    loss_ckpt, grads_ckpt = step(checkpointed, pixels, labels)
    # two passes of three blocks, each block recomputed once in the backward
    assert prompted_calls(checkpointed) - before == 2 * 2 * 3
    torch.testing.assert_close(loss_ckpt, loss)
    assert_same_gradients(grads_ckpt, grads)


def test_attention_dropout_in_training_takes_the_full_path(pixels, labels):
    model = vptsp_g(tiny_vit(0, attention_probs_dropout_prob=0.1))
    step(model, pixels, labels)
    assert prompted_calls(model) == 0  # dropout draws over attention rows the keys path does not build
    model.eval().embed(pixels)
    assert prompted_calls(model) == 3  # no dropout outside training


def test_a_hook_on_the_attention_sees_the_full_tokens(pixels):
    model = vptsp_g(tiny_vit(0)).eval()
    shapes: list[int] = []
    wrapper = blocks_of(model)[0]._prompt_keys
    wrapper.base_layer.register_forward_hook(lambda module, args, output: shapes.append(output[0].shape[1]))
    model.embed(pixels)
    assert shapes == [1 + 16 + SMALL["num_prompts"]]
    assert prompted_calls(model) == 2  # the other two blocks still take the keys path


class SwallowingLayer(ViTLayer):
    """A block that takes ``**kwargs`` but does not hand them to its attention."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        normed = self.layernorm_before(hidden_states)
        hidden_states = self.attention(normed, attention_mask)[0] + hidden_states
        return self.mlp(self.layernorm_after(hidden_states)) + hidden_states


class OldLayer(ViTLayer):
    """A transformers 4.x style block: no ``**kwargs`` at all."""

    def forward(self, hidden_states, head_mask=None):
        return super().forward(hidden_states)


@pytest.mark.parametrize("layer_class", [SwallowingLayer, OldLayer])
def test_blocks_that_cannot_take_prompt_keys_run_the_full_tokens(layer_class, pixels):
    reference = vptsp_g(tiny_vit(0)).eval()
    backbone = tiny_vit(0)
    for layer in backbone.get_submodule(reference.base_model.backbone_info.blocks_path):
        layer.__class__ = layer_class  # same modules and weights, another forward
    model = vptsp_g(backbone).eval()  # the same start as the reference: same seed, same draws
    if layer_class is OldLayer:
        assert find_attention_layout(blocks_of(model)[0].base_layer) is None
        assert all(block._prompt_keys is None for block in blocks_of(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model.embed(pixels)
        again = model.embed(pixels)
    reference.base_model.prompts_as_keys = False
    torch.testing.assert_close(got, reference.embed(pixels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got)
    messages = [str(w.message) for w in caught if "did not pass vpdml's prompts" in str(w.message)]
    assert len(messages) == (3 if layer_class is SwallowingLayer else 0)  # once per block, then the full path


def test_unload_puts_the_attention_modules_back():
    model = vptsp_g(tiny_vit(0))
    assert all(isinstance(block.base_layer.attention, PromptKeysAttention) for block in blocks_of(model))
    backbone = model.base_model.unload()
    assert not any(isinstance(m, (PromptKeysAttention, PromptedBlock)) for m in backbone.modules())


def test_lora_semantic_proxies_take_the_prompts_as_keys(pixels, labels, monkeypatch):
    calls = []
    forward = PromptKeysAttention.forward

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("vpdml_prompt_tokens") is not None)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(PromptKeysAttention, "forward", counting)
    results = []
    for as_keys in (True, False):
        torch.manual_seed(0)
        lora = vpdml.LoRADML(
            tiny_vit(0), num_classes=6, embedding_dim=16, semantic_proxies="gru", class_prompts=2
        )
        lora._router.prompts_as_keys = as_keys
        results.append(step(lora, pixels, labels))
        assert not any(isinstance(m, (PromptKeysAttention, PromptedBlock)) for m in lora.modules())
    assert sum(calls) == 2  # the last two blocks (the preset's proxy pass), with the keys path only
    torch.testing.assert_close(results[0][0], results[1][0])
    assert_same_gradients(results[0][1], results[1][1])
