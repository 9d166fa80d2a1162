"""The gallery index: build, search, add/delete, save/load, adapter identity checks, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import ViTModel

from helpers.models import tiny_vit
from helpers.toy_images import write_image_folder
from vpdml import VisualPromptDMLConfig
from vpdml.cli import main
from vpdml.data import transforms_from_processor
from vpdml.retrieval.identity import AdapterIdentity, AdapterMismatchError
from vpdml.retrieval.index import INDEX_FILE, GalleryIndex, QueryEmbeddings, embed_queries

pytestmark = [
    pytest.mark.filterwarnings("ignore:No image processor:UserWarning"),
    pytest.mark.usefixtures("single_thread"),
]
TRANSFORM = transforms_from_processor({}, 32)[1]


def _adapter(backbone: Path, seed: int):
    torch.manual_seed(seed)
    config = VisualPromptDMLConfig(num_prompts=2, embedding_dim=8, semantic_proxies="none", bitfit=True)
    model = get_peft_model(ViTModel.from_pretrained(backbone), config)
    with torch.no_grad():  # fresh BitFit offsets are zero: make the adapter matter
        for name, param in model.named_parameters():
            if "vpdml_bitfit" in name:
                param.normal_(std=0.1)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("index")
    backbone = root / "backbone"
    tiny_vit(0, num_hidden_layers=2).save_pretrained(backbone)
    model = _adapter(backbone, 0)
    model.save_pretrained(root / "adapter")
    images = write_image_folder(root / "images", num_classes=3, per_class=2)
    index = GalleryIndex.build(model, images, TRANSFORM, batch_size=4)
    return {"root": root, "backbone": backbone, "model": model, "images": images, "index": index}


def test_build_and_search_finds_the_image_itself(setup):
    index, images = setup["index"], setup["images"]
    assert len(index) == 6 and index.dim == 8 and index.ids[0] == "class_00/0.png"
    assert index.metadata["class_00/0.png"]["path"] == str((images / "class_00" / "0.png").resolve())
    queries = embed_queries(setup["model"], images, TRANSFORM)
    scores, ids = index.search(queries, k=3)
    assert scores.shape == (6, 3) and [row[0] for row in ids] == index.ids
    torch.testing.assert_close(scores[:, 0], torch.ones(6), atol=1e-5, rtol=0)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    scores, ids = index.search(queries, k=100)  # capped at the index size
    assert scores.shape == (6, 6)


def test_identity_is_the_same_in_memory_and_on_disk(setup):
    in_memory = AdapterIdentity.of_model(setup["model"])
    on_disk = AdapterIdentity.of_adapter_dir(setup["root"] / "adapter")
    assert in_memory.sha256 == on_disk.sha256 == setup["index"].adapter_identity.sha256
    other = AdapterIdentity.of_model(_adapter(setup["backbone"], 1))
    assert other.sha256 != in_memory.sha256


def test_refuses_queries_of_another_adapter(setup):
    index = setup["index"]
    other = _adapter(setup["backbone"], 1)
    queries = embed_queries(other, setup["images"], TRANSFORM)
    with pytest.raises(AdapterMismatchError, match="embedded with another adapter"):
        index.search(queries, k=2)
    with pytest.raises(AdapterMismatchError):
        index.search(queries.embeddings, k=2, adapter_identity=AdapterIdentity.of_model(other))
    with pytest.raises(ValueError, match="Pass the query's adapter identity"):
        index.search(queries.embeddings, k=2)
    with pytest.raises(AdapterMismatchError):
        index.add(queries, ["new"])


def test_add_and_delete_without_rebuilding(setup):
    base = setup["index"]
    index = GalleryIndex.from_embeddings(
        base.embeddings.clone(), base.ids, base.metadata, adapter_identity=base.adapter_identity
    )
    identity = index.adapter_identity
    extra = torch.nn.functional.normalize(
        torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), dim=1
    )
    index.add(QueryEmbeddings(extra, identity), ["x", "y"], [{"path": "x.png"}, {"path": "y.png"}])
    assert len(index) == 8 and index.metadata["y"] == {"path": "y.png"}
    _, ids = index.search(extra, k=1, adapter_identity=identity)
    assert [row[0] for row in ids] == ["x", "y"]
    with pytest.raises(ValueError, match="already in the index"):
        index.add(extra[:1], ["x"], adapter_identity=identity)
    index.delete(["x", "class_00/0.png"])
    assert len(index) == 6 and "x" not in index.ids and "class_00/0.png" not in index.metadata
    _, ids = index.search(extra, k=1, adapter_identity=identity)
    assert ids[1] == ["y"] and ids[0][0] != "x"
    with pytest.raises(KeyError, match="not in the index"):
        index.delete(["x"])
    torch.testing.assert_close(index.embeddings[:5], base.embeddings[1:])


def test_save_load_round_trip(setup, tmp_path):
    index = setup["index"]
    index.save(tmp_path / "idx")
    again = GalleryIndex.load(tmp_path / "idx")
    assert torch.equal(again.embeddings, index.embeddings) and again.ids == index.ids
    assert again.metadata == index.metadata and again.adapter_identity == index.adapter_identity
    assert again.info == index.info
    queries = embed_queries(setup["model"], setup["images"], TRANSFORM)
    (scores, ids), (expected_scores, expected_ids) = again.search(queries, 4), index.search(queries, 4)
    assert torch.equal(scores, expected_scores) and ids == expected_ids
    again.delete(["class_00/1.png"])  # saving again replaces the embeddings file
    again.save(tmp_path / "idx")
    assert len(list((tmp_path / "idx").glob("embeddings-*.safetensors"))) == 1
    assert len(GalleryIndex.load(tmp_path / "idx")) == 5
    assert not list((tmp_path / "idx").glob("*.tmp"))


def test_refuses_tampered_or_truncated_files(setup, tmp_path):
    folder = setup["index"].save(tmp_path / "idx")
    (weights,) = folder.glob("embeddings-*.safetensors")
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(ValueError, match="truncated or was edited"):
        GalleryIndex.load(folder)
    edited = bytearray(original)
    edited[-3] ^= 0xFF
    weights.write_bytes(bytes(edited))
    with pytest.raises(ValueError, match="truncated or was edited"):
        GalleryIndex.load(folder)
    weights.write_bytes(original)
    record = (folder / INDEX_FILE).read_text()
    (folder / INDEX_FILE).write_text(record[: len(record) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        GalleryIndex.load(folder)
    data = json.loads(record)
    data["ids"][0], data["ids"][1] = data["ids"][1], data["ids"][0]  # still valid, but edited
    (folder / INDEX_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="it was edited"):
        GalleryIndex.load(folder)
    (folder / INDEX_FILE).write_text(record)
    assert len(GalleryIndex.load(folder)) == 6


def test_faiss_backend_is_optional(setup):
    index = setup["index"]
    queries = QueryEmbeddings(index.embeddings[:2], index.adapter_identity)
    try:
        import faiss  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install faiss-cpu"):
            index.search(queries, 2, backend="faiss")
    else:
        _, ids = index.search(queries, 2, backend="faiss")
        assert [row[0] for row in ids] == index.ids[:2]


def test_cli_index_build_and_search(setup, tmp_path, capsys):
    adapter, images = setup["root"] / "adapter", setup["images"]
    out = tmp_path / "gallery"
    assert (
        main(["index", "build", "--adapter", str(adapter), "--images", str(images), "--out", str(out)]) == 0
    )
    assert "Indexed 6 images" in capsys.readouterr().out
    index = GalleryIndex.load(out)
    torch.testing.assert_close(index.embeddings, setup["index"].embeddings)
    assert index.adapter_identity.sha256 == setup["index"].adapter_identity.sha256
    query = images / "class_01" / "1.png"
    assert main(["search", "--index", str(out), str(query), "-k", "3"]) == 0
    table = capsys.readouterr().out
    assert "| rank | score | image |" in table
    assert f"| 1 | 1.0000 | {query.resolve()} |" in table and "| 3 |" in table
    other = tmp_path / "other"
    _adapter(setup["backbone"], 1).save_pretrained(other)
    assert main(["search", "--index", str(out), "--adapter", str(other), str(query)]) == 1
    assert "embedded with another adapter" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "missing"), str(query)]) == 1
    assert "not a vpdml index" in capsys.readouterr().err


def test_cli_search_reads_a_transparent_query_like_index_build(setup, tmp_path, capsys):
    """An RGBA query is flattened onto white as gallery images are, not converted with its hidden colours."""
    import numpy as np
    from PIL import Image

    from vpdml.data import to_rgb
    from vpdml.data.folders import open_query_image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    pixels[..., 3] = np.where(np.arange(32)[:, None] < 16, 0, 255)  # top half transparent (random colours)
    path = tmp_path / "rgba.png"
    Image.fromarray(pixels, "RGBA").save(path)
    query = np.asarray(open_query_image(path))
    assert query.shape == (32, 32, 3) and (query[:16] == 255).all()
    np.testing.assert_array_equal(query[16:], pixels[16:, :, :3])
    np.testing.assert_array_equal(query, np.asarray(to_rgb(Image.open(path))))
    out = tmp_path / "rgba.index"
    assert (
        main(
            [
                "index",
                "build",
                "--adapter",
                str(setup["root"] / "adapter"),
                "--images",
                str(tmp_path),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["search", "--index", str(out), str(path), "-k", "1"]) == 0
    assert f"| 1 | 1.0000 | {path.resolve()} |" in capsys.readouterr().out
