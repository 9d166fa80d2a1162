"""``proxy_pass_layers=N``: the proxy pass continues the sample pass's hidden states through the last N blocks."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import vpdml
from helpers.models import BACKBONE_KINDS, tiny_backbone, tiny_vit

# every token in the proxy pass (the presets keep a random quarter): these tests compare passes token by token
SMALL = {
    "num_prompts": 2,
    "class_prompts": 2,
    "num_classes": 6,
    "embedding_dim": 16,
    "proxy_pass_tokens": None,
}


def vptsp_g(seed: int = 0, backbone=None, **overrides):
    config = vpdml.VisualPromptDMLConfig.for_method("vptsp-g", **{**SMALL, **overrides})
    return get_peft_model(backbone if backbone is not None else tiny_vit(seed), config)


def test_class_prompts_live_in_the_proxy_pass_blocks_only():
    config = vpdml.VisualPromptDMLConfig(
        num_classes=3, class_prompts=3, class_prompt_step=1, proxy_pass_layers=2
    )
    assert config.class_prompt_counts(5) == [0, 0, 0, 3, 2]
    assert vpdml.VisualPromptDMLConfig(num_classes=3, class_prompts=3).class_prompt_counts(3) == [3, 3, 3]
    depth_one = vpdml.VisualPromptDMLConfig(
        num_classes=3, class_prompts=3, class_prompt_depth=1, proxy_pass_layers=2
    )
    assert depth_one.class_prompt_counts(4) == [0, 0, 3, 0]
    # N >= the depth is the whole pass (so the presets' N = 2 fits a 1-block backbone too)
    whole = vpdml.VisualPromptDMLConfig(num_classes=3, class_prompts=3, proxy_pass_layers=7)
    assert whole.class_prompt_counts(3) == [3, 3, 3] and whole.shared_trunk_layers(3) == 0
    with pytest.raises(ValueError, match="proxy_pass_layers must be None or an integer >= 1"):
        vpdml.VisualPromptDMLConfig(num_classes=3, proxy_pass_layers=0)
    table = vptsp_g(proxy_pass_layers=1).base_model.dml_proxies["default"].class_prompts.weight
    assert table.shape == (6, 2, 32)  # one block of class prompts instead of three


def test_it_equals_a_whole_proxy_pass_whose_trunk_prompts_are_the_shared_ones(pixels, labels):
    """A whole proxy pass whose class prompts in blocks 0-1 are copies of the shared prompts computes the same
    function; the gradient the trunk gets is what that pass gives the copies plus the shared prompts."""
    trunk = vptsp_g(proxy_pass_layers=1).train()
    whole = vptsp_g(fuse_proxy_pass=False, proxy_pass_layers=None).train()
    bank_t, bank_w = (m.base_model.dml_proxies["default"] for m in (trunk, whole))
    whole.base_model.load_state_dict(
        {k: v for k, v in trunk.base_model.state_dict().items() if "class_prompts" not in k}, strict=False
    )
    shared = trunk.base_model.vpdml_prompts["default"]
    with torch.no_grad():
        for layer in (0, 1):
            bank_w.class_prompts.weight[:, 2 * layer : 2 * layer + 2] = shared.for_layer(layer)
        bank_w.class_prompts.weight[:, 4:6] = bank_t.class_prompts.weight

    out_t, out_w = trunk.dml_forward(pixels, labels), whole.dml_forward(pixels, labels)
    torch.testing.assert_close(out_t.embeddings, out_w.embeddings)
    torch.testing.assert_close(out_t.semantic_embeddings, out_w.semantic_embeddings)

    for out in (out_t, out_w):
        (out.embeddings.sum() + out.semantic_embeddings.square().sum()).backward()
    copies = bank_w.class_prompts.weight.grad
    for layer in (0, 1):
        expected = whole.base_model.vpdml_prompts["default"].for_layer(layer).grad
        expected = expected + copies[:, 2 * layer : 2 * layer + 2].sum(0)
        torch.testing.assert_close(shared.for_layer(layer).grad, expected)
    torch.testing.assert_close(bank_t.class_prompts.weight.grad, copies[:, 4:6])


def test_the_proxy_pass_runs_only_its_blocks(pixels, labels):
    model = vptsp_g(proxy_pass_layers=1, semantic_images_per_class=1).train()
    seen: list[tuple[int, int]] = []
    blocks = model.base_model.model.get_submodule(model.base_model.backbone_info.blocks_path)
    for index, block in enumerate(blocks):
        block.base_layer.register_forward_pre_hook(
            lambda module, args, index=index: seen.append((index, args[0].shape[0]))
        )
    model.dml_loss(pixels, labels).backward()
    # the sample pass: every block on the 4 images; the proxy pass: the last block on one image per class
    assert seen == [(0, 4), (1, 4), (2, 4), (2, 2)]


@pytest.mark.parametrize("kind", BACKBONE_KINDS)
def test_every_family_trains_with_a_shared_trunk(kind, pixels, labels):
    model = vptsp_g(backbone=tiny_backbone(kind), proxy_pass_layers=2, pooling="mean").train()
    loss = model.dml_loss(pixels, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.base_model.dml_proxies["default"].class_prompts.weight.grad.abs().sum() > 0
    embed_only = vptsp_g(backbone=tiny_backbone(kind), proxy_pass_layers=2, pooling="mean").eval()
    embed_only.base_model.load_state_dict(model.base_model.state_dict())
    torch.testing.assert_close(embed_only.embed(pixels), model.eval().embed(pixels))  # no trunk left behind


def test_a_trunk_adapter_round_trips(tmp_path, pixels, labels):
    model = vptsp_g(proxy_pass_layers=1).train()
    model.dml_loss(pixels, labels).backward()
    model.save_pretrained(tmp_path / "adapter")
    vpdml.save_training_state(model, tmp_path / "state")
    again = vptsp_g(proxy_pass_layers=1)
    vpdml.load_training_state(again, tmp_path / "state")
    assert again.peft_config["default"].proxy_pass_layers == 1
    bank, bank_again = (m.base_model.dml_proxies["default"] for m in (model, again))
    assert torch.equal(bank.class_prompts.weight, bank_again.class_prompts.weight)
    loaded = vpdml.VisualPromptDMLConfig.from_pretrained(tmp_path / "adapter")
    assert loaded.proxy_pass_layers == 1
