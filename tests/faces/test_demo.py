"""`vpdml demo` on a small slice of the offline default: the trained adapter must beat the frozen backbone."""

from __future__ import annotations

import json

import pytest

from vpdml import demo
from vpdml.offline import (
    EmojiDatasetError,
    OfflineBackboneError,
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
