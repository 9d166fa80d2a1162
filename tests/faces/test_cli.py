"""The `vpdml` command: help texts, and train -> evaluate -> embed on a generated image folder."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers.models import tiny_vit
from helpers.toy_images import write_image_folder
from vpdml.cli import add_train_arguments, main, training_settings
from vpdml.data import transforms_from_processor
from vpdml.data.folders import image_folder_dataset
from vpdml.retrieval.embed import embed_dataset
from vpdml.retrieval.pretrained import load_trained_model

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.filterwarnings("ignore:No image processor:UserWarning"),
    pytest.mark.usefixtures("single_thread"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny backbone folder, an image folder of 6 classes, and an adapter trained on it through `vpdml train`."""
    root = tmp_path_factory.mktemp("cli")
    backbone = root / "backbone"
    tiny_vit(0, num_hidden_layers=2).save_pretrained(backbone)
    images = write_image_folder(root / "images", num_classes=6, per_class=3)
    output = root / "run"
    code = main(
        [
            "train",
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(images),
            "--backbone",
            str(backbone),
            "--method",
            "vpt-bitfit",
            "--output-dir",
            str(output),
            "--max-steps",
            "3",
            "--classes-per-batch",
            "2",
            "--num-prompts",
            "2",
            "--embedding-dim",
            "16",
            "--recall-at",
            "1",
            "2",
            "--eval-batch-size",
            "8",
            "--no-show-progress",
        ]
    )
    assert code == 0
    return {"backbone": backbone, "images": images, "adapter": output}


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], ["train", "evaluate", "embed", "demo"]),
        (
            ["train"],
            ["--dataset", "--recipe", "--learning-rate", "--num-prompts", "--resume-from-checkpoint"],
        ),
        (["evaluate"], ["--adapter", "--dataset", "--split", "--recall-at"]),
        (["embed"], ["--adapter", "--images", "--out"]),
        (["demo"], ["--epochs", "--output-dir"]),  # handed to vpdml.demo.main
    ],
)
def test_every_command_explains_itself(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in expected:
        assert flag in text, flag


def test_console_script_and_example_share_the_train_flags(capsys, monkeypatch):
    done = subprocess.run(
        [str(Path(sys.executable).parent / "vpdml"), "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "--head-warmup-epochs" in done.stdout
    monkeypatch.setattr(sys, "argv", ["train_dml.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "examples" / "train_dml.py"), run_name="__main__")
    assert exit_info.value.code == 0
    example_help = capsys.readouterr().out
    for line in done.stdout.splitlines():
        flag = line.strip().split(" ")[0]
        if flag.startswith("--"):
            assert flag in example_help, flag


def test_command_line_beats_recipe_beats_defaults():
    import argparse

    parser = add_train_arguments(argparse.ArgumentParser())
    line = ["--dataset", "cub200", "--output-dir", "out", "--recipe", "cub200", "--learning-rate", "0.02"]
    args, adapter = training_settings(parser.parse_args([*line, "--num-prompts", "4", "--no-bitfit"]))
    assert args.learning_rate == 0.02 and args.optimizer == "sgd" and args.proxy_learning_rate == 0.1
    assert args.epochs == 15 and args.weight_decay == 1e-4  # recipe, then the library default
    assert args.lr_cosine_epochs == 50 and args.lr_min == 1e-8  # the official 50-epoch cosine
    assert adapter == {
        "num_prompts": 4,
        "class_prompts": 3,
        "proxy_mix_alpha": 0.5,
        "gru_init": "xavier",
        "bitfit": False,
    }
    args, _ = training_settings(parser.parse_args([*line, "--lr-scheduler", "linear"]))
    assert args.lr_scheduler == "linear" and args.lr_cosine_epochs is None and args.lr_min == 0
    # an optional number takes "none": the paper's proxy pass over every image and token with the vptsp-g preset
    paper = [
        "--proxy-pass-tokens",
        "none",
        "--semantic-images-per-class",
        "None",
        "--proxy-pass-layers",
        "none",
    ]
    _, adapter = training_settings(parser.parse_args([*line, *paper]))
    assert adapter["proxy_pass_tokens"] is None and adapter["semantic_images_per_class"] is None
    assert adapter["proxy_pass_layers"] is None
    with pytest.raises(SystemExit):
        parser.parse_args([*line, "--proxy-pass-tokens", "half"])
    args, adapter = training_settings(parser.parse_args(["--dataset", "sop", "--output-dir", "out"]))
    assert args.recall_at == (1, 10, 100, 1000) and args.method == "vptsp-g" and adapter == {}
    line = ["--dataset", "cub200", "--output-dir", "o", "--recipe", "cub200", "--method", "full-finetune"]
    args, adapter = training_settings(parser.parse_args(line))
    assert args.method == "full-finetune" and adapter == {}  # prompt settings of the recipe do not apply
    line = ["--dataset", "cub200", "--output-dir", "o", "--method", "lora", "--lora-semantic-proxies", "gru"]
    args, adapter = training_settings(parser.parse_args([*line, "--proxy-pass-layers", "3"]))
    assert adapter == {"semantic_proxies": "gru", "proxy_pass_layers": 3}
    with pytest.raises(SystemExit):
        parser.parse_args(["--dataset", "cub200", "--output-dir", "o", "--method", "prefix-tuning"])


def test_train_writes_a_loadable_adapter(trained):
    out = trained["adapter"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(trained["backbone"])
    assert config["num_prompts"] == 2 and config["embedding_dim"] == 16 and config["bitfit"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and set(metrics["trained"]) == {"test"}
    assert set(metrics["trained"]["test"]) == {"recall@1", "recall@2", "map@r", "r_precision", "num_queries"}


def test_evaluate_prints_the_table_and_matches_training(trained, tmp_path, capsys):
    report = tmp_path / "metrics.json"
    args = ["evaluate", "--adapter", str(trained["adapter"]), "--dataset", "imagefolder"]
    code = main([*args, "--data-dir", str(trained["images"]), "--recall-at", "1", "2", "--json", str(report)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| R@1 | R@2 | MAP@R | R-Precision | Queries |" in table and "(adapter)" in table
    expected = json.loads((trained["adapter"] / "metrics.json").read_text())["trained"]
    assert json.loads(report.read_text()) == expected
    zero_shot = [*args, "--data-dir", str(trained["images"]), "--recall-at", "1", "2", "--zero-shot"]
    assert main(zero_shot) == 0
    assert "zero-shot backbone" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_embed_writes_embeddings_labels_and_paths(trained, tmp_path, suffix):
    out = tmp_path / f"embeddings{suffix}"
    assert (
        main(
            [
                "embed",
                "--adapter",
                str(trained["adapter"]),
                "--images",
                str(trained["images"]),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    if suffix == ".safetensors":
        tensors = load_file(str(out))
        with safe_open(str(out), "pt") as handle:
            paths = json.loads(handle.metadata()["paths"])
        embeddings, labels = tensors["embeddings"], tensors["labels"]
    else:
        with np.load(out, allow_pickle=False) as archive:
            embeddings, labels = torch.from_numpy(archive["embeddings"]), torch.from_numpy(archive["labels"])
            paths = archive["paths"].tolist()
    assert embeddings.shape == (18, 16) and labels.tolist() == [c for c in range(6) for _ in range(3)]
    assert paths[:2] == ["class_00/0.png", "class_00/1.png"]
    model, _ = load_trained_model(str(trained["adapter"]))
    dataset, _ = image_folder_dataset(trained["images"])
    _, transform = transforms_from_processor({}, 32)
    expected, _ = embed_dataset(model, dataset, transform, show_progress=False)
    torch.testing.assert_close(embeddings, expected)


def test_user_errors_get_a_message_not_a_traceback(trained, tmp_path, capsys):
    adapter = str(trained["adapter"])
    assert (
        main(
            [
                "embed",
                "--adapter",
                adapter,
                "--images",
                str(trained["images"]),
                "--out",
                str(tmp_path / "x.pt"),
            ]
        )
        == 1
    )
    assert "--out must end in .safetensors or .npz" in capsys.readouterr().err
    assert main(["evaluate", "--adapter", str(tmp_path / "missing"), "--dataset", "imagefolder"]) == 1
    assert "neither a local folder nor a Hub repo id" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(["embed", "--adapter", adapter, "--images", str(empty), "--out", str(tmp_path / "e.npz")]) == 1
    )
    assert "No images" in capsys.readouterr().err


def test_every_adapter_option_is_a_flag():
    """New VisualPromptDMLConfig fields must reach the command line (docs/training.md promises every one)."""
    import dataclasses

    from peft import PeftConfig

    from vpdml import VisualPromptDMLConfig
    from vpdml.cli import ADAPTER_OPTIONS

    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    own = {f.name for f in dataclasses.fields(VisualPromptDMLConfig)} - inherited
    # the method decides semantic_proxies, the data num_classes; the backbone signature is filled on injection
    assert own - set(ADAPTER_OPTIONS) == {"semantic_proxies", "num_classes", "backbone_signature"}
