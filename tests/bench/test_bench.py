"""The benchmark scripts run end to end on tiny settings and print their tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, check=False, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_speed_prints_its_table_on_a_tiny_vit():
    out = _run(
        "speed.py",
        *("--hidden-size", "32", "--layers", "2", "--heads", "2", "--image-size", "32"),
        *("--classes-per-batch", "2", "--num-classes", "4", "--steps", "1", "--warmup", "0"),
        *("--methods", "vptsp-g-embed", "vpt-bitfit-fulltokens", "vpt-bitfit-outputadd"),
    )
    assert "| method | step (ms) | x frozen forward | x VPT |" in out
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert rows == [
        "| frozen-forward",
        "| vptsp-g-embed",
        "| vpt-bitfit-fulltokens",
        "| vpt-bitfit-outputadd",
    ]


@pytest.mark.slow
def test_accuracy_smoke_prints_its_table(tmp_path):
    report = tmp_path / "runs.json"
    out = _run(
        "accuracy.py",
        *("--smoke", "--methods", "linear", "vptsp-g", "full-finetune", "--json", str(report)),
        *("--set", "learning_rate=3e-4", "proxy_mix_alpha=0.25"),
    )
    header = "| method | seeds | R@1 | R@4 | MAP@R | trainable params | % of backbone | inference adapter |"
    assert header in out
    for name in ("zero-shot backbone", "linear probe", "VPTSP-G", "full fine-tuning"):
        assert f"| {name} |" in out
    runs = json.loads(report.read_text())
    assert [r["method"] for r in runs] == ["linear", "vptsp-g", "full-finetune"]
    assert all(r["budget"]["learning_rate"] == 3e-4 and r["budget"]["proxy_mix_alpha"] == 0.25 for r in runs)


def test_accuracy_set_rejects_unknown_fields():
    result = subprocess.run(
        [sys.executable, str(BENCH / "accuracy.py"), "--smoke", "--set", "learning_rat=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "--set expects FIELD=VALUE with FIELD one of" in result.stderr


@pytest.mark.slow
def test_profile_step_attributes_time_to_phases():
    out = _run(
        "profile_step.py",
        *("--hidden-size", "32", "--layers", "2", "--heads", "2", "--image-size", "32", "--num-prompts", "2"),
        *(
            "--classes-per-batch",
            "2",
            "--steps",
            "1",
            "--rounds",
            "1",
            "--methods",
            "vpt",
            "vptsp-g-1img",
            "vptsp-g-1img-eq-fused",
        ),
    )
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in out.splitlines() if "|" in line
    }

    def ms(row: str) -> list[float]:
        return [float(cell.strip(" |")) for cell in rows[row][:3]]

    assert (
        ms("forward: proxy pass (class prompts)")[0] == 0 and ms("forward: proxy pass (class prompts)")[1] > 0
    )
    assert (
        ms("forward: fused sample + proxy pass")[2] > 0
        and ms("forward: sample pass (shared prompts)")[2] == 0
    )
    assert all(value > 0 for value in ms("backward (all of it)"))
    assert "Top operators, vpt" in out


def test_speed_linear_row_has_no_prompts():
    """`linear` must not inherit --num-prompts (it would silently time VPT)."""
    sys.path.insert(0, str(BENCH))
    try:
        import speed
    finally:
        sys.path.remove(str(BENCH))
    setting = speed.Setting(
        image_size=32,
        classes_per_batch=2,
        samples_per_class=2,
        steps=1,
        warmup=0,
        device="cpu",
        dtype="fp32",
        hidden_size=32,
        layers=2,
        heads=2,
        num_prompts=4,
        num_classes=4,
    )

    def trainable(method: str) -> int:
        return sum(p.numel() for p in speed._build(method, setting).parameters() if p.requires_grad)

    assert trainable("vpt") - trainable("linear") == 4 * 2 * 32  # 4 prompts x 2 layers x hidden 32


def test_scale_prints_its_table_with_sampled_negatives():
    result = _run(
        "scale.py",
        "--branch",
        "semantic",
        "--storages",
        "sparse",
        "--classes",
        "50",
        "3000",
        "--batch-classes",
        "8",
        "--hidden",
        "16",
        "--embedding-dim",
        "8",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--proxy-negatives",
        "20",
        "--proxy-offload",
    )
    rows = [line for line in result.splitlines() if line.startswith("| 50 |") or line.startswith("| 3,000 |")]
    assert len(rows) == 2 and all("sparse + 20 negatives (proxies offloaded)" in row for row in rows), result
    assert "sparse + 20 negatives (proxies offloaded): 3,000 vs 50 classes: time x" in result


def test_recipe_memory_runs_real_steps_of_a_recipe():
    result = _run(
        "recipe_memory.py",
        *("--recipe", "inshop", "--num-classes", "40", "--hidden", "16", "--layers", "2", "--heads", "2"),
        *("--steps", "2", "--storages", "dense", "sparse"),
    )
    rows = {
        line.split("|")[1].strip(): line
        for line in result.splitlines()
        if line.startswith("| dense") or line.startswith("| sparse")
    }
    assert rows.keys() == {"dense", "sparse"}, result
    # In-Shop's prompts: 80 class prompts in each of the 2 layers of width 16, for 40 classes = 0.1M values.
    assert all("| 0.10M |" in row for row in rows.values()), result
    assert "recipe=inshop: 40 classes, batch 32 x 1" in result
