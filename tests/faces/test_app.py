"""The demo app without a browser: search_image, model caching and backbone sharing, the `vpdml app` command.

tests/faces/test_app_browser.py clicks through the same app in a headless Chromium.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.app_fixtures import write_adapters_and_indexes
from vpdml.app import AdapterCache, Hit, example_items, image_folders, load_indexes, search_image
from vpdml.cli import main, parse_index_specs
from vpdml.retrieval.identity import AdapterMismatchError
from vpdml.retrieval.index import GalleryIndex
from vpdml.retrieval.pretrained import load_index_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:No image processor:UserWarning"),
    pytest.mark.usefixtures("single_thread"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    paths = write_adapters_and_indexes(tmp_path_factory.mktemp("app"))
    return {**paths, "indexes": load_indexes({"a": paths["a"], "b": paths["b"]})}


def test_search_image_finds_the_query_itself(setup):
    index = setup["indexes"]["a"]
    query_model = AdapterCache().get("a", index)
    query = setup["images"] / "class_02" / "1.png"
    hits = search_image(index, query_model, query, k=3)
    assert [hit.rank for hit in hits] == [1, 2, 3]
    assert hits[0].id == "class_02/1.png" and hits[0].path == str(query.resolve())
    assert hits[0].score == pytest.approx(1.0, abs=1e-5) and hits[1].score < 0.95
    assert hits[0].caption == f"#1 · {hits[0].score:.4f} · class_02/1.png"
    assert hits[0].score >= hits[1].score >= hits[2].score
    # a PIL image or an array gives the same result as the file
    pil = Image.open(query)
    for image in (pil, np.asarray(pil.convert("RGB"))):
        same = search_image(index, query_model, image, k=3)
        assert [hit.id for hit in same] == [hit.id for hit in hits]
        assert same[0].score == pytest.approx(hits[0].score, abs=1e-5)
    assert len(search_image(index, query_model, query, k=100)) == len(index)  # capped at the gallery size


def test_search_image_errors(setup):
    index = setup["indexes"]["a"]
    cache = AdapterCache()
    query = setup["images"] / "class_00" / "0.png"
    with pytest.raises(ValueError, match="No query image"):
        search_image(index, cache.get("a", index), None)
    with pytest.raises(ValueError, match="k must be at least 1"):
        search_image(index, cache.get("a", index), query, k=0)
    with pytest.raises(FileNotFoundError, match="No such query image"):
        search_image(index, cache.get("a", index), setup["root"] / "missing.png")
    # the adapter of index b cannot query index a
    with pytest.raises(AdapterMismatchError, match="another adapter"):
        search_image(index, cache.get("b", setup["indexes"]["b"]), query)


def test_adapters_on_one_backbone_share_it_and_load_once(setup):
    indexes = setup["indexes"]
    cache = AdapterCache()
    model_a, model_b = cache.get("a", indexes["a"]), cache.get("b", indexes["b"])
    assert cache.get("a", indexes["a"]) is model_a  # loaded once
    assert model_a.model is model_b.model and len(cache.backbones) == 1  # one backbone, two adapters
    assert {model_a.adapter_name, model_b.adapter_name} == {"a", "b"}
    assert set(model_a.model.peft_config) == {"a", "b"}
    assert model_a.identity.sha256 == indexes["a"].adapter_identity.sha256
    assert model_b.identity.sha256 == indexes["b"].adapter_identity.sha256
    # embedding with b on the shared model equals embedding with b loaded on its own
    image = Image.open(setup["images"] / "class_03" / "0.png")
    alone, transform, identity, _ = load_index_model(indexes["b"])
    expected = alone.embed(transform(image)[None])
    torch.testing.assert_close(model_b.embed([image]).embeddings, expected, atol=1e-5, rtol=1e-5)
    assert identity.sha256 == model_b.identity.sha256
    # another index of the same adapter reuses it
    copy = GalleryIndex.from_embeddings(
        indexes["a"].embeddings[:4],
        indexes["a"].ids[:4],
        adapter_identity=indexes["a"].adapter_identity,
        info=indexes["a"].info,
    )
    assert cache.get("a (first 4)", copy) is model_a


def test_examples_and_served_folders(setup):
    index = setup["indexes"]["a"]
    items = example_items(index, 3)
    assert len(items) == 3 and [item for _, item in items] == [
        "class_00/0.png",
        "class_01/0.png",
        "class_02/1.png",
    ]
    assert all(path == index.metadata[item]["path"] for path, item in items)
    assert example_items(index, 100) == [(index.metadata[i]["path"], i) for i in index.ids]
    assert example_items(index, 0) == []
    assert image_folders(setup["indexes"]) == [str(setup["images"].resolve())]
    assert Hit(2, 0.5, "x.png", None).caption == "#2 · 0.5000 · x.png"


def test_app_command_line(setup, monkeypatch, capsys):
    assert parse_index_specs(["emoji=runs/emoji.index", "runs/products.index/"]) == {
        "emoji": "runs/emoji.index",
        "products": "runs/products.index/",
    }
    with pytest.raises(ValueError, match="distinct names"):
        parse_index_specs(["x=a.index", "x=b.index"])
    with pytest.raises(SystemExit):
        main(["app", "--help"])
    assert "NAME=PATH" in capsys.readouterr().out
    calls = []
    monkeypatch.setattr("vpdml.app.launch_app", lambda indexes, **options: calls.append((indexes, options)))
    if importlib.util.find_spec("gradio") is None:
        assert main(["app", "--index", f"a={setup['a']}"]) == 1
        assert "pip install 'vpdml[app]'" in capsys.readouterr().err
        return
    assert (
        main(["app", "--index", f"a={setup['a']}", "--index", str(setup["b"]), "--port", "7861", "-k", "3"])
        == 0
    )
    indexes, options = calls[0]
    assert indexes == {"a": str(setup["a"]), "b": str(setup["b"])}
    assert options == {
        "host": "127.0.0.1",
        "port": 7861,
        "share": False,
        "default_k": 3,
        "max_k": 50,
        "num_examples": 8,
    }


def test_build_app_refuses_bad_input(setup):
    pytest.importorskip("gradio")
    from vpdml.app import build_app

    with pytest.raises(ValueError, match="at least one index"):
        build_app({})
    with pytest.raises(FileNotFoundError, match="not a vpdml index"):
        build_app({"x": setup["root"] / "missing.index"})
    demo = build_app(setup["indexes"])
    assert type(demo).__name__ == "Blocks"
