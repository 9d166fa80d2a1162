"""`vpdml export`: one ONNX graph per run, checked against PyTorch, and the docs' onnxruntime snippet."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

import vpdml.retrieval.export
from helpers.runs import EMBEDDING_DIM, MEAN, STD, write_backbone, write_run
from vpdml.cli import main
from vpdml.retrieval.export import export_onnx, export_run
from vpdml.retrieval.pretrained import eval_transform_for, load_trained_model

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*requires torchvision:UserWarning"),
    pytest.mark.usefixtures("single_thread"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny backbone folder and two finished runs on it: a VPTSP-G adapter (prompts, BitFit) and LoRA."""
    root = tmp_path_factory.mktemp("export")
    backbone = write_backbone(root / "backbone")
    write_run(root / "vptsp", backbone, "vptsp-g")
    write_run(root / "lora", backbone, "lora")
    return {"backbone": backbone, "vptsp": root / "vptsp", "lora": root / "lora"}


def onnx_embed(path: Path, pixel_values: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embeddings"], {"pixel_values": pixel_values.numpy()})[0]


def torch_embed(model: torch.nn.Module, pixel_values: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return vpdml.as_dml_model(model).embed(pixel_values).numpy()


def graph_dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]


def test_an_adapter_with_prompts_and_bitfit_exports_to_one_graph_that_matches_pytorch(runs, tmp_path):
    result = export_run(runs["vptsp"], tmp_path / "model.onnx")

    assert (result.image_size, result.embedding_dim) == (32, EMBEDDING_DIM)
    assert result.max_abs_diff <= 1e-4
    graph = onnx.load(str(result.onnx_path)).graph
    assert [value.name for value in graph.input] == ["pixel_values"]
    assert [value.name for value in graph.output] == ["embeddings"]
    assert graph_dims(graph.input[0]) == ["batch", 3, 32, 32]
    assert graph_dims(graph.output[0]) == ["batch", EMBEDDING_DIM]

    model, _ = load_trained_model(str(runs["vptsp"]))
    pixel_values = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    exported, reference = onnx_embed(result.onnx_path, pixel_values), torch_embed(model, pixel_values)
    assert exported.shape == (5, EMBEDDING_DIM)
    assert np.abs(exported - reference).max() <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(exported, axis=1), 1.0, atol=1e-5)

    # the graph holds the adapter's own prompts and BitFit offsets: without either, the embeddings move away
    tuner = model.base_model
    with torch.no_grad():
        for offset in tuner.vpdml_bitfit["default"].parameters():
            offset.zero_()
    assert np.abs(exported - torch_embed(model, pixel_values)).max() > 1e-2
    model, _ = load_trained_model(str(runs["vptsp"]))
    with torch.no_grad():
        for prompts in model.base_model.vpdml_prompts["default"].parameters():
            prompts.add_(torch.randn(prompts.shape, generator=torch.Generator().manual_seed(9)))
    # (a constant shift would not show: each block's LayerNorm removes it) measured 1.5e-3, the graph matches to 1e-7
    assert np.abs(exported - torch_embed(model, pixel_values)).max() > 1e-3


def test_the_preprocessing_file_is_the_eval_transform(runs, tmp_path):
    result = export_run(runs["vptsp"], tmp_path / "out" / "model.onnx", image_size=48)
    settings = json.loads(result.preprocessing_path.read_text())

    assert result.preprocessing_path == tmp_path / "out" / "model.json"
    assert settings["format"] == "vpdml-onnx-preprocessing/1"
    assert settings["onnx"] == "model.onnx" and settings["input"] == "pixel_values"
    assert settings["image_size"] == 48 and settings["resize_shorter_side"] == round(48 / 0.875)
    assert settings["mean"] == pytest.approx(MEAN) and settings["std"] == pytest.approx(STD)
    assert settings["embedding_dim"] == EMBEDDING_DIM and settings["l2_normalized"] is True
    assert settings["method"] == "VPTSP-G" and settings["backbone"] == str(runs["backbone"])
    assert settings["max_abs_diff"] == result.max_abs_diff <= 1e-4
    graph = onnx.load(str(result.onnx_path)).graph
    assert graph_dims(graph.input[0]) == ["batch", 3, 48, 48]


def test_a_lora_run_exports_too(runs, tmp_path):
    result = export_run(runs["lora"], tmp_path / "lora.onnx")
    assert result.max_abs_diff <= 1e-4
    model, _ = load_trained_model(str(runs["lora"]))
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    assert np.abs(onnx_embed(result.onnx_path, pixel_values) - torch_embed(model, pixel_values)).max() <= 1e-4


def test_a_graph_that_differs_from_pytorch_is_not_written(runs, tmp_path, monkeypatch):
    model, backbone = load_trained_model(str(runs["vptsp"]))
    transform = eval_transform_for(model, backbone, 32)
    monkeypatch.setattr(vpdml.retrieval.export, "onnx_max_abs_diff", lambda *args: (0.5, EMBEDDING_DIM))
    with pytest.raises(ValueError, match=r"differs from PyTorch by up to 0\.5 \(tolerance 0\.0001\)"):
        export_onnx(model, tmp_path / "model.onnx", transform)
    assert list(tmp_path.iterdir()) == []  # neither the graph, its temporary file nor the JSON
    with pytest.raises(ValueError, match=r"must end in \.onnx"):
        export_onnx(model, tmp_path / "model.bin", transform)


def test_cli_exports_and_reports_errors(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.onnx"
    assert main(["export", str(runs["vptsp"]), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(
        r"B x 3 x 32 x 32 -> embeddings B x 16; max \|ONNX - PyTorch\| = \d\.\d\de-\d\d", printed
    )
    assert out.is_file() and (tmp_path / "m.json").is_file()

    assert main(["export", str(runs["vptsp"]), "--onnx", str(tmp_path / "m.pt")]) == 1
    assert "vpdml export: error: The ONNX file name must end in .onnx" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "no-such-run"), "--onnx", str(out)]) == 1
    assert "is neither a local folder nor a Hub repo id" in capsys.readouterr().err

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a)
    )
    assert main(["export", str(runs["vptsp"]), "--onnx", str(out)]) == 1
    assert 'needs onnx and onnxruntime: pip install "vpdml[onnx]"' in capsys.readouterr().err


def docs_snippet() -> str:
    text = (REPO / "docs" / "retrieval.md").read_text()
    section = text.split("## 4. Serving without PEFT", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_docs_onnxruntime_snippet_embeds_like_vpdml(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(runs["vptsp"]), "--onnx", "emoji.onnx"]) == 0
    rng = np.random.default_rng(0)
    query = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    query[:10, :, 3] = 0  # a transparent band
    Image.fromarray(query, "RGBA").save("query.png")
    Image.fromarray(rng.integers(0, 256, (37, 64, 3), dtype=np.uint8)).save("gallery_1.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), "L").save("gallery_2.jpg")
    capsys.readouterr()

    namespace: dict = {}
    exec(compile(docs_snippet(), "docs/retrieval.md", "exec"), namespace)

    model, backbone = load_trained_model(str(runs["vptsp"]))
    transform = eval_transform_for(model, backbone, 32)
    paths = ["query.png", "gallery_1.jpg", "gallery_2.jpg"]
    reference = torch_embed(model, torch.stack([transform(Image.open(path)) for path in paths]))
    assert namespace["embeddings"].shape == (3, EMBEDDING_DIM)
    assert np.abs(namespace["embeddings"] - reference).max() <= 1e-4
    np.testing.assert_allclose(namespace["scores"], reference[0] @ reference[1:].T, atol=1e-4)
    assert capsys.readouterr().out.startswith("[")
