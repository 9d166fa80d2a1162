"""``prompt_init="token_mean"``: prompts centred on the mean patch token each block receives from the frozen backbone."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import vpdml
from helpers.models import BACKBONE_KINDS, tiny_backbone, tiny_vit
from helpers.runs import randomize_
from helpers.toy_images import NORMALISATION, layout_splits
from vpdml.data import transforms_from_processor
from vpdml.training import TrainingArguments, build_model, train
from vpdml.training.prompt_init import init_prompts_from_data


def frozen_block_inputs(backbone: torch.nn.Module, pixels: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, L, D) mean patch token entering each block, from transformers' own hidden states."""
    hidden = backbone(pixel_values=pixels, output_hidden_states=True).hidden_states[:-1]
    return torch.stack([h[:, prefix:].mean(dim=1) for h in hidden], dim=1)


@pytest.mark.parametrize("kind", BACKBONE_KINDS)
def test_mean_block_tokens_are_the_frozen_backbones_whatever_the_adapter_holds(kind):
    backbone = tiny_backbone(kind)
    pixels = torch.randn(3, 3, 32, 32)
    config = vpdml.VisualPromptDMLConfig(num_prompts=2, bitfit=True, embedding_dim=8, semantic_proxies="none")
    model = get_peft_model(backbone, config)
    randomize_(model, ("vpdml_prompts", "vpdml_bitfit"))  # trained prompts and offsets must not leak in
    tuner = model.base_model
    with torch.no_grad(), model.disable_adapter():
        expected = frozen_block_inputs(tuner.model, pixels, tuner.backbone_info.num_prefix_tokens)
    got = tuner.mean_block_tokens(pixels)
    assert got.shape == (3, tuner.backbone_info.num_layers, 32)
    torch.testing.assert_close(got, expected)
    assert tuner.backbone_info.num_prefix_tokens == (
        3 if kind == "dinov2_with_registers" else 2 if kind == "deit" else 1
    )


def test_center_prompts_follows_its_formula_and_checks_the_shape():
    model = get_peft_model(
        tiny_vit(),
        vpdml.VisualPromptDMLConfig(num_prompts=3, prompt_step=1, embedding_dim=8, semantic_proxies="none"),
    )
    tuner = model.base_model
    before = {i: tuner.vpdml_prompts["default"].for_layer(i).detach().clone() for i in range(3)}
    means = torch.randn(3, 32)
    tuner.center_prompts(means)
    for i, count in enumerate([3, 2, 1]):
        after = tuner.vpdml_prompts["default"].for_layer(i)
        assert after.shape == (count, 32)
        torch.testing.assert_close(after, means[i] + before[i] - before[i].mean(dim=0))
        torch.testing.assert_close(after.mean(dim=0), means[i])
    torch.testing.assert_close(
        tuner.vpdml_prompts["default"].for_layer(2)[0], means[2]
    )  # one prompt: the mean
    with pytest.raises(ValueError, match=r"token_means must be \(num_layers, hidden_size\) = \(3, 32\)"):
        tuner.center_prompts(torch.zeros(2, 32))


def test_prompt_init_is_validated():
    with pytest.raises(ValueError, match="prompt_init"):
        vpdml.VisualPromptDMLConfig(prompt_init="zeros", semantic_proxies="none")


def _args(tmp_path, **overrides) -> TrainingArguments:
    values = {
        "output_dir": str(tmp_path),
        "classes_per_batch": 4,
        "image_size": 32,
        "eval_every_epochs": 0,
        "select_on": "none",
        "show_progress": False,
        "report_to": "none",
        "seed": 0,
    }
    return TrainingArguments(**{**values, **overrides})


def test_the_trainer_starts_the_prompts_from_the_training_images_token_means(tmp_path):
    splits = layout_splits(
        num_classes=12, per_class=4, seed=2, validation_classes=0
    )  # 32 images: all are used
    model = build_model(
        tiny_vit(), "vpt-bitfit", splits.num_train_classes, num_prompts=2, prompt_init="token_mean"
    )
    prompts = model.base_model.vpdml_prompts["default"]
    draws = {i: prompts.for_layer(i).detach().clone() for i in range(3)}
    _, transform = transforms_from_processor(NORMALISATION, 32)
    pixels = torch.stack([transform(image) for image in splits.train["image"]])
    with torch.no_grad(), model.disable_adapter():
        means = frozen_block_inputs(model.base_model.model, pixels, prefix=1).mean(dim=0)

    assert init_prompts_from_data(model, splits.train, transform, _args(tmp_path / "direct"))
    for i in range(3):
        torch.testing.assert_close(prompts.for_layer(i), means[i] + draws[i] - draws[i].mean(dim=0))

    # Through train(): set before the head warm-up, then one step at a tiny learning rate barely moves them.
    again = build_model(
        tiny_vit(), "vpt-bitfit", splits.num_train_classes, num_prompts=2, prompt_init="token_mean"
    )
    again.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "vpdml_prompts" not in k}, strict=False
    )
    for i in range(3):
        with torch.no_grad():
            again.base_model.vpdml_prompts["default"].for_layer(i).copy_(draws[i])
    args = _args(tmp_path / "run", max_steps=1, learning_rate=1e-7, head_warmup_epochs=1)
    train(again, splits, args, image_processor=NORMALISATION)
    for i in range(3):
        torch.testing.assert_close(
            again.base_model.vpdml_prompts["default"].for_layer(i),
            means[i] + draws[i] - draws[i].mean(dim=0),
            atol=1e-5,
            rtol=0,
        )


def test_xavier_prompts_and_adapters_without_shared_prompts_are_left_alone(tmp_path):
    splits = layout_splits(num_classes=12, per_class=4, seed=2, validation_classes=0)
    _, transform = transforms_from_processor(NORMALISATION, 32)
    xavier = build_model(tiny_vit(), "vpt", splits.num_train_classes, num_prompts=2, prompt_init="xavier")
    before = xavier.base_model.vpdml_prompts["default"].for_layer(0).detach().clone()
    assert not init_prompts_from_data(xavier, splits.train, transform, _args(tmp_path))
    assert torch.equal(xavier.base_model.vpdml_prompts["default"].for_layer(0), before)
    linear = build_model(tiny_vit(), "linear", splits.num_train_classes, prompt_init="token_mean")
    assert not init_prompts_from_data(linear, splits.train, transform, _args(tmp_path))
    lora = build_model(tiny_vit(), "lora", splits.num_train_classes)
    assert not init_prompts_from_data(lora, splits.train, transform, _args(tmp_path))


def test_every_prompt_preset_starts_from_the_token_means():
    for method in ("vpt", "vpt-bitfit", "vptsp-m", "vptsp-g"):
        assert vpdml.VisualPromptDMLConfig.for_method(method, num_classes=3).prompt_init == "token_mean"
    assert vpdml.VisualPromptDMLConfig(num_classes=3).prompt_init == "xavier"  # the plain config: the paper's


# --- class prompts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_class_prompt_tables_center_every_class_on_the_token_means(storage):
    from vpdml.proxies.class_prompts import build_class_prompt_table

    counts = [0, 3, 1]  # a shared-trunk layout: no class prompts in the first block
    table = build_class_prompt_table(storage, num_classes=5, counts=counts, hidden_size=8)
    before = table.weight.detach().clone()
    means = torch.randn(3, 8)
    table.center_on(means)
    after = table.weight.detach()
    block = before[:, 0:3]
    torch.testing.assert_close(after[:, 0:3], means[1] + block - block.mean(dim=1, keepdim=True))
    torch.testing.assert_close(after[:, 0:3].mean(dim=1), means[1].expand(5, 8))
    torch.testing.assert_close(after[:, 3], means[2].expand(5, 8))  # one prompt per class: the mean itself
    with pytest.raises(ValueError, match=r"token_means must be \(num_layers, hidden_size\) = \(3, 8\)"):
        table.center_on(torch.zeros(2, 8))


def test_a_low_rank_class_prompt_table_refuses_token_means():
    from vpdml.proxies.class_prompts import build_class_prompt_table

    table = build_class_prompt_table("low_rank", num_classes=5, counts=[1, 1], hidden_size=8, rank=2)
    with pytest.raises(ValueError, match="low-rank"):
        table.center_on(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="class_prompt_init='token_mean' needs a dense or sparse"):
        vpdml.VisualPromptDMLConfig(
            num_classes=5, class_prompt_init="token_mean", class_prompt_storage="low_rank"
        )
    with pytest.raises(ValueError, match="class_prompt_init"):
        vpdml.VisualPromptDMLConfig(num_classes=5, class_prompt_init="zeros")


def test_the_trainer_starts_the_class_prompts_from_the_token_means_and_leaves_xavier_shared_prompts(tmp_path):
    splits = layout_splits(num_classes=12, per_class=4, seed=2, validation_classes=0)
    model = build_model(
        tiny_vit(),
        "vptsp-g",
        splits.num_train_classes,
        num_prompts=2,
        class_prompts=2,
        proxy_pass_layers=2,
        prompt_init="xavier",
        class_prompt_init="token_mean",
    )
    tuner = model.base_model
    table = tuner.dml_proxies["default"].class_prompts
    assert table.counts == [0, 2, 2]  # the proxy pass runs the last 2 of 3 blocks
    shared_before = tuner.vpdml_prompts["default"].for_layer(0).detach().clone()
    draw = table.weight.detach().clone()
    _, transform = transforms_from_processor(NORMALISATION, 32)
    pixels = torch.stack([transform(image) for image in splits.train["image"]])
    with torch.no_grad(), model.disable_adapter():
        means = frozen_block_inputs(tuner.model, pixels, prefix=1).mean(dim=0)

    assert init_prompts_from_data(model, splits.train, transform, _args(tmp_path))
    assert torch.equal(tuner.vpdml_prompts["default"].for_layer(0), shared_before)
    for layer, start in ((1, 0), (2, 2)):
        block = draw[:, start : start + 2]
        torch.testing.assert_close(
            table.weight[:, start : start + 2], means[layer] + block - block.mean(dim=1, keepdim=True)
        )


def test_class_prompt_init_is_off_unless_asked():
    assert vpdml.VisualPromptDMLConfig(num_classes=3).class_prompt_init == "xavier"
