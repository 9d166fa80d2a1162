"""The PEFT tuner: injection, embedding, loss entry point, adapter control, save/load."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import ViTConfig, ViTModel

import vpdml
from helpers.models import BACKBONE_KINDS, assert_gradients_close, tiny_backbone, tiny_vit
from vpdml import VisualPromptDMLConfig

REPO = Path(__file__).resolve().parents[2]
OLD_TRANSFORMERS = REPO / ".cache" / "transformers-4.57"


def make_model(seed: int = 0, **config):
    defaults = {"num_prompts": 4, "embedding_dim": 16, "num_classes": 6, "bitfit": True}
    return get_peft_model(tiny_vit(seed), VisualPromptDMLConfig(**{**defaults, **config}))


@pytest.mark.parametrize("kind", BACKBONE_KINDS)
def test_every_family_embeds_trains_and_disables(kind, pixels, labels):
    backbone = tiny_backbone(kind)
    reference = tiny_backbone(kind)
    model = get_peft_model(
        backbone, VisualPromptDMLConfig(num_prompts=3, num_classes=5, bitfit=True, pooling="mean")
    )
    model.eval()
    embeddings = model.embed(pixels)
    assert embeddings.shape == (4, 32)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(4))
    model.dml_loss(pixels, labels).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)
    with model.disable_adapter():
        disabled = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(disabled, reference(pixel_values=pixels).last_hidden_state)
    assert not torch.allclose(model(pixel_values=pixels).last_hidden_state, disabled)


def test_unsupported_backbones_are_refused():
    from transformers import BertConfig, BertModel, ViTForImageClassification

    bert = BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32)
    )
    with pytest.raises(vpdml.UnsupportedBackboneError, match="does not support backbones of type 'bert'"):
        get_peft_model(bert, VisualPromptDMLConfig(num_classes=3))
    classifier = ViTForImageClassification(tiny_vit().config)
    with pytest.raises(vpdml.UnsupportedBackboneError, match=r"get_peft_model\(model.vit, config\)"):
        get_peft_model(classifier, VisualPromptDMLConfig(num_classes=3))


def test_gradients_reach_exactly_the_trainable_parameters(pixels, labels):
    model = make_model(semantic_proxies="gru", semantic_images_per_class=None)
    model.train()
    model.dml_loss(pixels, labels).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trainable and all("base_layer" not in n for n in trainable)
    # Every trainable tensor gets a gradient, except class prompts and proxies of classes absent from the batch,
    # which are rows of tensors that do get one.
    assert with_grad == trainable
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_backbone_weights_are_unchanged_by_training(pixels, labels):
    model = make_model(semantic_proxies="ema")
    before = {k: v.clone() for k, v in model.base_model.model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model.dml_loss(pixels, labels).backward()
        optimizer.step()
    after = model.base_model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.base_model.vpdml_bitfit["default"].offsets["blocks/0/attn_q"].abs().sum() > 0


def _hand_count(config: VisualPromptDMLConfig, hidden=32, layers=3, mlp=48, classes=6) -> dict[str, int]:
    dim = config.embedding_dim
    prompts = sum(max(config.num_prompts - config.prompt_step * i, 0) for i in range(layers)) * hidden
    head = 2 * hidden + hidden * dim + dim
    per_block_biases = 3 * hidden + hidden + mlp + hidden + 2 * hidden  # q k v, out, fc1, fc2, 2 norms
    bitfit = (
        (layers * per_block_biases + hidden + hidden) if config.bitfit else 0
    )  # + patch conv + final norm
    training = classes * dim
    if config.semantic_proxies != "none":
        proxy_layers = min(config.proxy_pass_layers or layers, layers)  # class prompts in these blocks only
        training += classes * config.class_prompts * proxy_layers * hidden + head
        training += (dim * 3 * dim + 3 * dim + dim * 3 * dim) if config.semantic_proxies == "gru" else 0
    return {"prompts": prompts, "head": head, "bitfit": bitfit, "training_only": training}


@pytest.mark.parametrize("method", sorted(vpdml.METHOD_PRESETS))
def test_trainable_parameter_counts_match_a_hand_count(method):
    config = VisualPromptDMLConfig.for_method(
        method, num_prompts=4, prompt_step=1, embedding_dim=16, num_classes=6
    )
    model = get_peft_model(tiny_vit(), config)
    counts = model.base_model.parameter_counts()
    expected = _hand_count(config)
    assert {k: counts[k] for k in expected} == expected
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sum(expected.values())


def test_vit_small_inference_adapter_size(tmp_path):
    config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)
    sizes = {}
    for bitfit in (False, True):
        model = get_peft_model(
            ViTModel(config, add_pooling_layer=False),
            VisualPromptDMLConfig(num_prompts=10, embedding_dim=384, num_classes=100, bitfit=bitfit),
        )
        model.save_pretrained(tmp_path / str(bitfit))
        sizes[bitfit] = (tmp_path / str(bitfit) / "adapter_model.safetensors").stat().st_size
        assert (
            model.base_model.parameter_counts()["training_only"] > 1_000_000
        )  # class prompts stay out of it
    assert sizes[False] < 1_000_000
    assert sizes[True] < 1_300_000


def test_save_load_round_trip_in_a_fresh_process(tmp_path, pixels, labels):
    model = make_model(semantic_proxies="gru")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model.dml_loss(pixels, labels).backward()
        optimizer.step()
    model.eval()
    tiny_vit(0).save_pretrained(tmp_path / "backbone")
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"pixels": pixels, "embeddings": model.embed(pixels)}, tmp_path / "expected.pt")
    script = f"""
import torch, vpdml
from peft import PeftModel
from transformers import ViTModel
data = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
model = PeftModel.from_pretrained(ViTModel.from_pretrained({str(tmp_path / "backbone")!r}), {str(tmp_path / "adapter")!r})
assert not any(p.requires_grad for p in model.parameters())
assert torch.equal(model.embed(data["pixels"]), data["embeddings"]), "embeddings differ"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_saved_config_names_the_vpdml_peft_type(tmp_path):
    make_model().save_pretrained(tmp_path / "adapter")
    config = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert '"peft_type": "VPDML"' in config
    assert '"backbone_signature"' in config


def test_training_state_is_separate_and_round_trips(tmp_path, pixels, labels):
    model = make_model(semantic_proxies="gru")
    model.train()
    model.dml_loss(pixels, labels).backward()
    model.save_pretrained(tmp_path)
    path = vpdml.save_training_state(model, tmp_path)
    other = make_model(seed=5, semantic_proxies="gru")
    vpdml.load_training_state(other, tmp_path)
    bank, other_bank = model.base_model.dml_proxies["default"], other.base_model.dml_proxies["default"]
    for key, value in bank.state_dict().items():
        assert torch.equal(value, other_bank.state_dict()[key]), key
    wrong = make_model(semantic_proxies="gru", num_classes=7)
    with pytest.raises(ValueError, match="num_classes or embedding_dim differ"):
        vpdml.load_training_state(wrong, tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or tampered"):
        vpdml.load_training_state(other, tmp_path)


def test_loading_onto_a_backbone_of_another_shape_explains(tmp_path):
    make_model().save_pretrained(tmp_path)
    wider = tiny_vit(hidden_size=64, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"hidden_size: adapter 32 vs model 64.*base_model_name_or_path"):
        PeftModel.from_pretrained(wider, tmp_path)
    deeper = tiny_vit(num_hidden_layers=4)
    with pytest.raises(ValueError, match="num_layers: adapter 3 vs model 4"):
        PeftModel.from_pretrained(deeper, tmp_path)


def test_a_deep_copy_trains_and_embeds_on_its_own(pixels, labels):
    model = get_peft_model(
        tiny_vit(0),
        VisualPromptDMLConfig.for_method("vptsp-g", num_prompts=3, num_classes=6, embedding_dim=16),
    )
    before = model.eval().embed(pixels)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin.eval().embed(pixels), before)
    twin.train().dml_loss(pixels, labels).backward()
    trainable = [p for p in twin.parameters() if p.requires_grad]
    assert all(
        p.grad is not None for p in trainable
    )  # BitFit offsets included: the copy's hooks read the copy
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        for offset in twin.base_model.vpdml_bitfit.parameters():
            offset.add_(0.5)
    assert not torch.allclose(twin.eval().embed(pixels), before)
    torch.testing.assert_close(model.eval().embed(pixels), before)
    twin.base_model.unload()
    torch.testing.assert_close(model.embed(pixels), before)


def test_add_set_delete_adapters_and_unload(pixels):
    model = make_model(seed=0)
    model.add_adapter("other", VisualPromptDMLConfig(num_prompts=2, embedding_dim=8, num_classes=3))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    first = model.embed(pixels)
    model.set_adapter("other")
    assert model.embed(pixels).shape == (4, 8)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    torch.testing.assert_close(model.embed(pixels, adapter_name="default"), first)
    model.delete_adapter("other")
    assert model.active_adapter == "default"
    torch.testing.assert_close(model.embed(pixels), first)
    backbone = model.unload()
    assert isinstance(backbone.layers[0], type(tiny_vit().layers[0]))
    torch.testing.assert_close(
        backbone(pixel_values=pixels).last_hidden_state, tiny_vit(0)(pixel_values=pixels).last_hidden_state
    )


def test_merge_is_refused_with_a_reason():
    model = make_model()
    with pytest.raises(ValueError, match="cannot be merged: prompts are extra tokens"):
        model.merge_and_unload()


def test_bad_inputs_are_explained(pixels):
    model = make_model()
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        model.embed(pixels[:, :2])
    with pytest.raises(ValueError, match="floating point"):
        model.embed(pixels.to(torch.uint8))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\]"):
        model.dml_loss(pixels, torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="one class id per image"):
        model.dml_loss(pixels, torch.tensor([0, 1]))
    embed_only = get_peft_model(tiny_vit(), VisualPromptDMLConfig(semantic_proxies="none"))
    with pytest.raises(ValueError, match="has no proxies"):
        embed_only.dml_loss(pixels, torch.tensor([0, 1, 2, 3]))


def test_prompts_see_other_image_sizes_through_position_interpolation():
    model = make_model()
    assert model.embed(torch.randn(2, 3, 48, 48)).shape == (2, 16)


@pytest.mark.skipif(
    not OLD_TRANSFORMERS.is_dir(), reason="transformers 4.57 not installed under .cache (make test)"
)
@pytest.mark.parametrize("direction", ["old-to-new", "new-to-old"])
def test_adapters_load_across_transformers_layouts(tmp_path, direction):
    script = Path(__file__).parents[1] / "helpers" / "crossversion.py"
    old_env = {**os.environ, "PYTHONPATH": str(OLD_TRANSFORMERS)}
    new_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    saver, checker = (old_env, new_env) if direction == "old-to-new" else (new_env, old_env)

    def run(env, *args):
        result = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    check = "import transformers, sys; sys.exit(0 if transformers.__version__.startswith('4.57') else 1)"
    assert subprocess.run([sys.executable, "-c", check], env=old_env).returncode == 0
    backbone, adapter = str(tmp_path / "backbone"), str(tmp_path / "adapter")
    run(old_env, "make-backbone", backbone)  # old-format weights load in both versions
    with warnings.catch_warnings():
        run(saver, "save-adapter", backbone, adapter)
    assert "max abs diff" in run(checker, "check-adapter", backbone, adapter)


def test_peft_loads_an_adapter_from_a_hub_snapshot_offline(tmp_path, monkeypatch, pixels):
    """The `PeftModel.from_pretrained(vit, "me/repo")` code path, served from a Hub-cache layout offline."""
    import huggingface_hub

    from helpers.hub_snapshot import make_fake_hub_snapshot

    model = make_model(seed=0).eval()
    model.save_pretrained(tmp_path / "adapter")
    expected = model.embed(pixels)
    files = {
        name: tmp_path / "adapter" / name for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    cache = tmp_path / "hub-cache"
    make_fake_hub_snapshot(cache, "me/vit-tiny-vptsp", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    again = PeftModel.from_pretrained(tiny_vit(0), "me/vit-tiny-vptsp", cache_dir=str(cache)).eval()
    torch.testing.assert_close(again.embed(pixels), expected)


@pytest.mark.parametrize("kind", ["vit", "dinov2", "clip"])
@pytest.mark.parametrize(
    ("semantic", "per_class", "storage", "bitfit"),
    [("gru", None, "dense", True), ("gru", 1, "sparse", False), ("ema", 1, "dense", True)],
)
def test_fused_proxy_pass_equals_two_passes(kind, semantic, per_class, storage, bitfit, pixels, labels):
    """Equal prompt counts: one backbone pass over [images; chosen images] = the sample and proxy passes."""
    results = []
    for fuse in (True, False):
        config = VisualPromptDMLConfig(
            num_prompts=3,
            class_prompts=3,
            prompt_step=1,
            class_prompt_step=1,
            num_classes=5,
            embedding_dim=16,
            bitfit=bitfit,
            semantic_proxies=semantic,
            semantic_images_per_class=per_class,
            class_prompt_storage=storage,
            fuse_proxy_pass=fuse,
        )
        model = get_peft_model(tiny_backbone(kind), config).train()
        bank = model.base_model.dml_proxies["default"]
        assert model.base_model._can_fuse_proxy_pass("default", bank, config) == fuse
        output = model.dml_loss(pixels, labels, return_outputs=True)
        output.loss.backward()
        grads = {
            n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
            for n, p in model.named_parameters()
            if p.grad is not None
        }
        state = {k: v.clone() for k, v in model.base_model.dml_proxies["default"].state_dict().items()}
        results.append((output, grads, state))
    (fused, fused_grads, fused_state), (separate, separate_grads, separate_state) = results
    torch.testing.assert_close(fused.loss, separate.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.embeddings, separate.embeddings, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.semantic_embeddings, separate.semantic_embeddings, rtol=1e-5, atol=1e-6)
    assert len(fused_grads) > 3
    assert_gradients_close(fused_grads, separate_grads, atol_per_unit=1e-6)
    for name in fused_state:
        torch.testing.assert_close(fused_state[name], separate_state[name], rtol=1e-5, atol=1e-6, msg=name)


def test_unequal_prompt_counts_keep_two_passes():
    model = make_model(num_prompts=4, class_prompts=2, semantic_proxies="gru")
    bank = model.base_model.dml_proxies["default"]
    assert not model.base_model._can_fuse_proxy_pass("default", bank, model.peft_config["default"])
    same = make_model(num_prompts=2, class_prompts=2, semantic_proxies="gru", fuse_proxy_pass=False)
    assert not same.base_model._can_fuse_proxy_pass(
        "default", same.base_model.dml_proxies["default"], same.peft_config["default"]
    )
