"""VisualPromptDMLConfig: validation messages, presets, registration with PEFT."""

from __future__ import annotations

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

import vpdml
from vpdml import VisualPromptDMLConfig
from vpdml.tuner.peft_type import _add_peft_type_member

INVALID = [
    ({"num_prompts": -1}, r"num_prompts must be an integer >= 0, got -1"),
    ({"num_prompts": 2.5}, r"num_prompts must be an integer >= 0"),
    ({"prompt_depth": 0}, r"prompt_depth must be None or an integer >= 1"),
    ({"prompt_step": -2}, r"prompt_step must be an integer >= 0"),
    ({"pooling": "max"}, r"pooling must be one of 'cls', 'mean', got 'max'"),
    ({"embedding_dim": 0}, r"embedding_dim must be None or an integer >= 1"),
    ({"num_classes": 0}, r"num_classes must be None or an integer >= 1"),
    ({"semantic_proxies": "lstm"}, r"semantic_proxies must be one of 'none', 'ema', 'gru'"),
    ({"class_prompts": 0}, r"class_prompts must be an integer >= 1"),
    ({"class_prompt_depth": 0}, r"class_prompt_depth must be None or an integer >= 1"),
    ({"class_prompt_step": -1}, r"class_prompt_step must be an integer >= 0"),
    ({"semantic_images_per_class": 0}, r"semantic_images_per_class must be None or an integer >= 1"),
    ({"proxy_keep_ratio": 1.0}, r"proxy_keep_ratio must be a number in \[0, 1\)"),
    ({"gru_dropout": -0.1}, r"gru_dropout must be a number in \[0, 1\)"),
    ({"proxy_mix_alpha": 1.5}, r"proxy_mix_alpha must be a number in \[0, 1\]"),
    ({"proxy_anchor_scale": 0}, r"proxy_anchor_scale must be a number in \(0, inf\]"),
    ({"proxy_anchor_margin": float("nan")}, r"proxy_anchor_margin must be a number in \[0, 1\)"),
    ({"proxy_anchor_positive_average": "mean"}, r"proxy_anchor_positive_average must be one of"),
    ({"bitfit": "yes"}, r"bitfit must be True or False"),
]


@pytest.mark.parametrize(("overrides", "message"), INVALID)
def test_invalid_values_name_the_field_and_range(overrides, message):
    with pytest.raises(ValueError, match=message):
        VisualPromptDMLConfig(**{"num_classes": 10, **overrides})


def test_semantic_proxies_need_num_classes():
    with pytest.raises(ValueError, match="num_classes is required when semantic_proxies='gru'"):
        VisualPromptDMLConfig()
    assert VisualPromptDMLConfig(semantic_proxies="none").num_classes is None


def test_method_presets():
    assert VisualPromptDMLConfig.for_method("linear", num_classes=3).num_prompts == 0
    vptsp = VisualPromptDMLConfig.for_method("VPTSP-G", num_classes=3, num_prompts=7)
    assert (vptsp.semantic_proxies, vptsp.bitfit, vptsp.num_prompts) == ("gru", True, 7)
    assert VisualPromptDMLConfig.for_method("vptsp-m", num_classes=3).semantic_proxies == "ema"
    assert VisualPromptDMLConfig.for_method("vpt", num_classes=3).bitfit is False
    with pytest.raises(ValueError, match="FullFineTuningDML"):
        VisualPromptDMLConfig.for_method("full-finetune")


def test_registered_with_peft_and_json_round_trip(tmp_path):
    config = VisualPromptDMLConfig(num_classes=5, num_prompts=3)
    assert config.peft_type == PeftType.VPDML == "VPDML"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType("VPDML")] is VisualPromptDMLConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.VPDML] is vpdml.VisualPromptDMLModel
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, PeftConfig) and loaded.peft_type == "VPDML"
    again = VisualPromptDMLConfig.from_pretrained(tmp_path)
    assert (again.num_classes, again.num_prompts) == (5, 3)
    vpdml.register_with_peft()  # idempotent
    assert _add_peft_type_member("VPDML") is PeftType.VPDML
    assert list(PeftType).count(PeftType.VPDML) == 1
