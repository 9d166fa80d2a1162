"""``proxy_pass_tokens=f``: the proxy pass keeps a random share of each image's patch tokens."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import vpdml
from helpers.models import BACKBONE_KINDS, tiny_backbone, tiny_vit
from vpdml.tuner.layer import PromptedBlock, PromptRouter, TokenSubset

SMALL = {"num_prompts": 2, "class_prompts": 2, "num_classes": 6, "embedding_dim": 16}


def vptsp_g(backbone=None, **overrides):
    config = vpdml.VisualPromptDMLConfig.for_method("vptsp-g", **{**SMALL, **overrides})
    return get_peft_model(backbone if backbone is not None else tiny_vit(0), config)


def test_a_subset_keeps_the_prefix_and_a_distinct_share_of_each_images_patches():
    torch.manual_seed(0)
    hidden = torch.randn(3, 1 + 16, 4)  # CLS + 16 patches
    kept = TokenSubset(0.25, num_prefix_tokens=1, first_layer=0).keep(hidden)
    assert kept.shape == (3, 1 + 4, 4)
    torch.testing.assert_close(kept[:, 0], hidden[:, 0])
    subsets = []
    for image in range(3):
        rows = [int((hidden[image, 1:] == token).all(-1).nonzero()) for token in kept[image, 1:]]
        assert len(set(rows)) == 4  # distinct patches of this very image
        subsets.append(sorted(rows))
    assert len({tuple(rows) for rows in subsets}) > 1  # every image draws its own subset
    assert TokenSubset(1.0, 1, 0).keep(hidden) is hidden
    assert TokenSubset(0.01, 1, 0).keep(hidden).shape[1] == 2  # at least one patch
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            TokenSubset(fraction, 1, 0)


def test_the_config_checks_the_share():
    assert vpdml.VisualPromptDMLConfig(num_classes=3, proxy_pass_tokens=1).proxy_pass_tokens == 1
    for bad in (0, -0.5, 1.2, True):
        with pytest.raises(ValueError, match="proxy_pass_tokens"):
            vpdml.VisualPromptDMLConfig(num_classes=3, proxy_pass_tokens=bad)


@pytest.mark.parametrize(("layers", "first"), [(None, 0), (1, 2)])
def test_only_the_proxy_pass_blocks_see_fewer_tokens(pixels, labels, layers, first):
    model = vptsp_g(proxy_pass_layers=layers, proxy_pass_tokens=0.5).train()
    seen: list[tuple[int, int, int]] = []
    blocks = model.base_model.model.get_submodule(model.base_model.backbone_info.blocks_path)
    for index, block in enumerate(blocks):
        block.base_layer.register_forward_pre_hook(
            lambda module, args, index=index: seen.append((index, *args[0].shape[:2]))
        )
    model.dml_loss(pixels, labels).backward()
    patches = (32 // 8) ** 2  # the tiny ViT's 32 px images in 8 px patches
    sample, proxy = seen[:3], seen[3:]
    # a block runs on the image tokens (the prompts enter its attention as keys): the sample pass keeps every one
    assert sample == [(i, 4, 1 + patches) for i in range(3)]
    # one image per class (the preset), CLS + half the patches, in the blocks the pass runs
    assert proxy == [(i, 2, 1 + round(0.5 * patches)) for i in range(first, 3)]
    assert model.base_model.dml_proxies["default"].class_prompts.weight.grad.abs().sum() > 0


def test_keeping_every_token_is_the_plain_proxy_pass(pixels, labels):
    every = vptsp_g(proxy_pass_tokens=1.0).train()
    plain = vptsp_g(fuse_proxy_pass=False, proxy_pass_tokens=None).train()
    plain.base_model.load_state_dict(every.base_model.state_dict())
    out_every, out_plain = every.dml_forward(pixels, labels), plain.dml_forward(pixels, labels)
    torch.testing.assert_close(out_every.semantic_embeddings, out_plain.semantic_embeddings)


@pytest.mark.parametrize("kind", BACKBONE_KINDS)
def test_every_family_trains_with_a_token_subset(kind, pixels, labels):
    model = vptsp_g(backbone=tiny_backbone(kind), proxy_pass_tokens=0.5, pooling="mean").train()
    loss = model.dml_loss(pixels, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.base_model.dml_proxies["default"].class_prompts.weight.grad.abs().sum() > 0


def test_a_block_with_a_token_attention_mask_refuses_to_drop_tokens():
    router = PromptRouter()
    block = PromptedBlock(torch.nn.Identity(), 0, router)
    with router.subsetting(TokenSubset(0.5, 1, 0)), pytest.raises(ValueError, match="attention mask"):
        block(torch.randn(2, 5, 4), torch.zeros(2, 1, 5, 5))
