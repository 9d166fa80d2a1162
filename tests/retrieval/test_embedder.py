"""ImageEmbedder and the self-sufficient adapter folder: preprocessing saved with the adapter, a portable base model,
a model card whose code runs, several adapters on one backbone, clear errors for bad input.

The trained run uses a tiny ViT served from a fake Hub cache (``tiny-org/tiny-vit``, offline), so its folder names
its backbone the way a real run on a Hub model does, and trains at 24 px (not the backbone's 32) with mean/std 0.5.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from peft import PeftModel, get_peft_model
from PIL import Image

from helpers.hub_snapshot import make_fake_hub_snapshot
from helpers.models import tiny_vit
from helpers.toy_images import NORMALISATION, layout_splits
from vpdml import ImageEmbedder, VisualPromptDMLConfig, hub
from vpdml.data import EvalTransform
from vpdml.data.processor_config import PREPROCESSOR_CONFIG_FILE
from vpdml.modules.loading import load_backbone
from vpdml.retrieval.metrics import retrieval_metrics
from vpdml.training.args import TrainingArguments
from vpdml.training.factory import build_model
from vpdml.training.trainer import train

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:No image processor:UserWarning"),
]

BACKBONE_ID = "tiny-org/tiny-vit"
IMAGE_SIZE = 24
REPO_ID = "me/tiny-vpt"


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory: pytest.TempPathFactory):
    """``tiny-org/tiny-vit`` in an offline Hub cache of its own."""
    root = tmp_path_factory.mktemp("hub")
    tiny_vit(0, num_hidden_layers=2, initializer_range=0.2).save_pretrained(root / "backbone")
    files = {path.name: path for path in (root / "backbone").iterdir()}
    make_fake_hub_snapshot(root / "cache", BACKBONE_ID, files)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root / "cache"))
        yield root / "cache"


@pytest.fixture(scope="module")
def run(fake_hub: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A VPT + BitFit adapter trained for a few steps at 24 px; its folder, splits and metrics."""
    splits = layout_splits(num_classes=12, per_class=4, validation_classes=0)
    torch.manual_seed(0)
    model = build_model(
        load_backbone(BACKBONE_ID), "vpt-bitfit", splits.num_train_classes, num_prompts=2, embedding_dim=16
    )
    out = tmp_path_factory.mktemp("run") / "adapter"
    args = TrainingArguments(
        output_dir=str(out),
        method="vpt-bitfit",
        max_steps=3,
        classes_per_batch=4,
        image_size=IMAGE_SIZE,
        recall_at=(1, 2),
        select_on="none",
        show_progress=False,
        hub_license="apache-2.0",
    )
    result = train(model, splits, args, image_processor=NORMALISATION)
    return {"folder": out, "splits": splits, "metrics": result.metrics["trained"]["test"]}


def test_folder_records_the_trained_preprocessing_and_a_portable_base_model(run):
    folder = run["folder"]
    processor = json.loads((folder / PREPROCESSOR_CONFIG_FILE).read_text())
    assert processor["crop_size"] == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert processor["size"] == {"shortest_edge": 27}  # round(24 / 0.875)
    assert processor["image_mean"] == [0.5] * 3 and processor["image_std"] == [0.5] * 3
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BACKBONE_ID and config["inference_mode"] is True


def test_auto_image_processor_reproduces_the_eval_transform(run):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(run["folder"])
    transform = ImageEmbedder.from_pretrained(run["folder"], device="cpu").transform()
    assert transform == EvalTransform(size=IMAGE_SIZE, resize_size=27, mean=(0.5,) * 3, std=(0.5,) * 3)
    images = [row["image"] for row in run["splits"].test.select(range(4))]
    images += [Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 70, 4), dtype=np.uint8))]
    expected = torch.stack([transform(image) for image in images])
    actual = torch.from_numpy(np.stack(processor(images, return_tensors="np").pixel_values))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_encode_matches_loading_by_hand_at_the_trained_size(run):
    folder = run["folder"]
    embedder = ImageEmbedder.from_pretrained(folder, device="cpu")
    images = [row["image"] for row in run["splits"].test.select(range(5))]
    by_hand = PeftModel.from_pretrained(load_backbone(BACKBONE_ID), str(folder)).eval()
    transform = EvalTransform(size=IMAGE_SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
    with torch.no_grad():
        expected = by_hand.embed(torch.stack([transform(image) for image in images])).numpy()

    embeddings = embedder.encode(images, batch_size=2)
    assert (
        isinstance(embeddings, np.ndarray) and embeddings.shape == (5, 16) and embeddings.dtype == np.float32
    )
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    single = embedder.encode(images[0], convert_to="torch")
    assert isinstance(single, torch.Tensor) and single.shape == (16,)
    np.testing.assert_allclose(single.numpy(), expected[0], atol=1e-5)
    # numpy arrays and a datasets image column give the same vectors
    np.testing.assert_allclose(embedder.encode([np.asarray(image) for image in images]), expected, atol=1e-5)
    np.testing.assert_allclose(
        embedder.encode(np.stack([np.asarray(i) for i in images])), expected, atol=1e-5
    )
    column = run["splits"].test.select(range(5))["image"]
    np.testing.assert_allclose(embedder.encode(column), expected, atol=1e-5)
    scores = embedder.similarity(embeddings, embeddings)
    assert scores.shape == (5, 5)
    np.testing.assert_allclose(scores, expected @ expected.T, atol=1e-5)
    np.testing.assert_allclose(np.diag(scores), 1.0, atol=1e-5)


def test_a_fresh_process_embeds_file_paths_like_loading_by_hand(run, fake_hub, tmp_path):
    paths = []
    for i, row in enumerate(run["splits"].test.select(range(2))):
        paths.append(tmp_path / f"{'ab'[i]}.png")
        row["image"].save(paths[-1])
    script = (
        "import sys, numpy as np\n"
        "from vpdml import ImageEmbedder\n"
        f"e = ImageEmbedder.from_pretrained({str(run['folder'])!r}, device='cpu').encode({[str(p) for p in paths]!r})\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, e)\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(fake_hub),
        "PYTHONPATH": ":".join(sys.path),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    by_hand = PeftModel.from_pretrained(load_backbone(BACKBONE_ID), str(run["folder"])).eval()
    transform = EvalTransform(size=IMAGE_SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
    with torch.no_grad():
        expected = by_hand.embed(torch.stack([transform(Image.open(path)) for path in paths])).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)


def _card_snippet(card_text: str) -> str:
    usage = card_text.split("## Usage", 1)[1]
    return re.search(r"```python\n(.*?)```", usage, re.S).group(1)


def test_the_card_snippet_runs_and_reproduces_its_recall(run, tmp_path, monkeypatch):
    card_text = (run["folder"] / "README.md").read_text()
    card = ModelCard(card_text)
    snippet = _card_snippet(card_text)
    assert (
        'ImageEmbedder.from_pretrained("<user>/<adapter-repo>")' in snippet
    )  # no repo id given: placeholder
    monkeypatch.chdir(tmp_path)
    for name in ("cat.jpg", "dog.jpg"):
        run["splits"].test[0]["image"].save(name)
    namespace: dict = {}
    exec(snippet.replace("<user>/<adapter-repo>", str(run["folder"])), namespace)
    assert namespace["embeddings"].shape == (2, 16)

    test = run["splits"].test
    embeddings = namespace["embedder"].encode(test["image"], batch_size=16)
    recall = retrieval_metrics(embeddings, np.asarray(test["label"]), recall_at=(1,))["recall@1"]
    card_recall = {
        (result["dataset"]["split"], metric["type"]): metric["value"]
        for result in card.data.to_dict()["model-index"][0]["results"]
        for metric in result["metrics"]
    }[("test", "recall@1")]
    assert recall == pytest.approx(card_recall, abs=1e-4)
    assert recall == pytest.approx(run["metrics"]["recall@1"], abs=1e-4)
    assert f"| test | {recall:.4f} |" in card.text


def test_card_metadata_and_config_table(run):
    card = ModelCard((run["folder"] / "README.md").read_text())
    data = card.data.to_dict()
    assert data["base_model"] == BACKBONE_ID and data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "image-feature-extraction" and data["library_name"] == "peft"
    assert "| `inference_mode` | True |" in card.text
    assert "AutoImageProcessor.from_pretrained(" in card.text


def test_nothing_uploaded_names_a_local_path(run, monkeypatch):
    calls = []

    class RecordingApi:
        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    folder = run["folder"]
    hub.push_adapter_to_hub(folder, REPO_ID)
    files = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
    uploaded = set(
        filter_repo_objects(
            files, allow_patterns=calls[0]["allow_patterns"], ignore_patterns=calls[0]["ignore_patterns"]
        )
    )
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        PREPROCESSOR_CONFIG_FILE,
        "README.md",
    } <= uploaded
    tmp_root = str(folder.parents[1])  # the session's tmp folder
    for name in sorted(uploaded):
        content = (folder / name).read_bytes()
        assert tmp_root.encode() not in content, name
        assert str(Path.home()).encode() + b"/" not in content, name


def test_several_adapters_share_one_backbone(run, tmp_path):
    folder = run["folder"]
    torch.manual_seed(5)
    other = build_model(load_backbone(BACKBONE_ID), "vpt", 3, num_prompts=3, embedding_dim=16)
    other.save_pretrained(tmp_path / "other")
    embedder = ImageEmbedder.from_pretrained(folder, device="cpu")
    with pytest.warns(UserWarning, match="no vpdml preprocessor_config.json"):
        embedder.add_adapter("other", tmp_path / "other")
    assert embedder.adapters == ["default", "other"]
    images = [row["image"] for row in run["splits"].test.select(range(3))]
    with pytest.warns(UserWarning, match="no vpdml preprocessor_config.json"):
        alone = ImageEmbedder.from_pretrained(tmp_path / "other", device="cpu")
    np.testing.assert_allclose(embedder.encode(images, adapter="other"), alone.encode(images), atol=1e-5)
    np.testing.assert_allclose(
        embedder.encode(images), ImageEmbedder.from_pretrained(folder, device="cpu").encode(images), atol=1e-5
    )
    assert embedder.transform("other").size == 32  # the backbone's size: nothing recorded
    assert embedder.identity("other").sha256 != embedder.identity().sha256
    with pytest.raises(ValueError, match=r"Unknown adapter 'nope' \(adapters: \['default', 'other'\]\)"):
        embedder.encode(images, adapter="nope")
    with pytest.raises(ValueError, match="loaded already"):
        embedder.add_adapter("other", tmp_path / "other")


def test_an_adapter_of_another_backbone_is_refused(run, tmp_path):
    model = get_peft_model(
        tiny_vit(3, num_hidden_layers=2),
        VisualPromptDMLConfig(num_prompts=1, embedding_dim=16, semantic_proxies="none"),
    )
    model.peft_config["default"].base_model_name_or_path = "someone/else"
    model.save_pretrained(tmp_path / "foreign")
    embedder = ImageEmbedder.from_pretrained(run["folder"], device="cpu")
    with pytest.raises(
        ValueError, match=r"trained on someone/else, this embedder's backbone is tiny-org/tiny-vit"
    ):
        embedder.add_adapter("foreign", tmp_path / "foreign")


def test_bad_inputs_fail_clearly(run, tmp_path):
    embedder = ImageEmbedder.from_pretrained(run["folder"], device="cpu")
    with pytest.raises(FileNotFoundError, match=r"No such image file: .*missing\.png"):
        embedder.encode(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"Cannot read image .*broken\.png"):
        embedder.encode([str(tmp_path / "broken.png")])
    with pytest.raises(ValueError, match=r"channels-last .*got shape \(3, 32, 32\) \(channels first"):
        embedder.encode([np.zeros((3, 32, 32), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"\(N, H, W, C\); got \(2, 2, 3, 32, 32\)"):
        embedder.encode(np.zeros((2, 2, 3, 32, 32)))
    with pytest.raises(
        TypeError, match="Image 1: expected a PIL image, a file path or a numpy array, got int"
    ):
        embedder.encode([Image.new("RGB", (8, 8)), 3])
    with pytest.raises(ValueError, match="No images to encode"):
        embedder.encode([])
    with pytest.raises(ValueError, match="convert_to"):
        embedder.encode(Image.new("RGB", (8, 8)), convert_to="list")
    with pytest.raises(ValueError, match="Embedding sizes differ: 16 \\(a\\) vs 8 \\(b\\)"):
        embedder.similarity(np.ones((2, 16)), np.ones((1, 8)))
    with pytest.raises(ValueError, match="Unknown dtype"):
        ImageEmbedder.from_pretrained(run["folder"], device="cpu", dtype="float99")


def test_dtype_and_fallback_without_preprocessor_config(run, tmp_path):
    images = [row["image"] for row in run["splits"].test.select(range(3))]
    reference = ImageEmbedder.from_pretrained(run["folder"], device="cpu").encode(images)
    half = ImageEmbedder.from_pretrained(run["folder"], device="cpu", dtype="bfloat16")
    assert half.encode(images).dtype == np.float32
    np.testing.assert_allclose(half.encode(images), reference, atol=0.05)
    # an older folder: no preprocessor_config.json, the crop size from metrics.json, the backbone's mean/std
    old = tmp_path / "old"
    old.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json"):
        (old / name).write_bytes((run["folder"] / name).read_bytes())
    with pytest.warns(
        UserWarning, match=r"no vpdml preprocessor_config.json: preprocessing with the crop size 24"
    ):
        fallback = ImageEmbedder.from_pretrained(old, device="cpu")
    assert fallback.transform().size == IMAGE_SIZE and fallback.transform().mean == (0.485, 0.456, 0.406)
