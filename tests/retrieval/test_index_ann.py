"""GalleryIndex search backends: FAISS flat (exact), HNSW and IVF (approximate), recall against exact search."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vpdml.cli import build_parser, main
from vpdml.retrieval.ann import BACKENDS, FaissOptions
from vpdml.retrieval.identity import AdapterIdentity
from vpdml.retrieval.index import GalleryIndex

IDENTITY = AdapterIdentity("0" * 64, name="random")


def _clustered(count: int, dim: int, seed: int, clusters: int = 100, noise: float = 0.6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=torch.Generator().manual_seed(1234))
    labels = torch.randint(0, clusters, (count,), generator=generator)
    points = centers[labels] + noise * torch.randn(count, dim, generator=generator)
    return torch.nn.functional.normalize(points, dim=1)


@pytest.fixture(scope="module")
def faiss():
    return pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def gallery() -> GalleryIndex:
    embeddings = _clustered(5000, 64, seed=0)
    return GalleryIndex.from_embeddings(embeddings, [f"g{i}" for i in range(5000)], adapter_identity=IDENTITY)


@pytest.fixture(scope="module")
def queries() -> torch.Tensor:
    return _clustered(200, 64, seed=1)


def test_faiss_flat_equals_exact_search(faiss, gallery, queries):
    exact_scores, exact_ids = gallery.search(queries, 10, adapter_identity=IDENTITY)
    flat_scores, flat_ids = gallery.search(queries, 10, adapter_identity=IDENTITY, backend="faiss")
    assert flat_ids == exact_ids
    torch.testing.assert_close(flat_scores, exact_scores, atol=1e-5, rtol=0)
    assert gallery.ann_recall(queries, 10, backend="faiss", adapter_identity=IDENTITY) == 1.0
    assert gallery.ann_recall(queries, 10, backend="exact", adapter_identity=IDENTITY) == 1.0


@pytest.mark.parametrize("backend", ["faiss-hnsw", "faiss-ivf"])
def test_approximate_backends_reach_high_recall(faiss, gallery, queries, backend):
    recall = gallery.ann_recall(queries, 10, backend=backend, adapter_identity=IDENTITY)
    assert 0.9 <= recall <= 1.0
    scores, ids = gallery.search(queries, 10, adapter_identity=IDENTITY, backend=backend)
    assert scores.shape == (200, 10) and all(len(row) == 10 for row in ids)
    assert (scores[:, :-1] >= scores[:, 1:] - 1e-6).all()
    # returned scores are the true cosine similarities of the returned ids
    rows = torch.tensor([[int(item[1:]) for item in row] for row in ids])
    expected = torch.einsum("qke,qe->qk", gallery.embeddings[rows], queries)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


def test_search_time_options_trade_recall(faiss, gallery, queries):
    coarse = FaissOptions(ivf_nprobe=1)
    fine = FaissOptions(ivf_nprobe=70)  # every list: exact
    low = gallery.ann_recall(
        queries, 10, backend="faiss-ivf", faiss_options=coarse, adapter_identity=IDENTITY
    )
    high = gallery.ann_recall(queries, 10, backend="faiss-ivf", faiss_options=fine, adapter_identity=IDENTITY)
    assert low < high == 1.0
    assert [key for key in gallery._faiss if key[0] == "faiss-ivf"] == [
        ("faiss-ivf", None, None, 0)
    ]  # one build


def test_recall_counts_ties_as_found(faiss):
    base = _clustered(300, 16, seed=2)
    embeddings = torch.cat([base, base])  # every vector twice: exact top-k boundaries are ties
    index = GalleryIndex.from_embeddings(embeddings, range(600), adapter_identity=IDENTITY)
    assert index.ann_recall(base[:50], 5, backend="faiss", adapter_identity=IDENTITY) == 1.0


def test_add_and_delete_rebuild_the_faiss_index(faiss, queries):
    embeddings = _clustered(2000, 64, seed=3)
    index = GalleryIndex.from_embeddings(
        embeddings, [f"r{i}" for i in range(2000)], adapter_identity=IDENTITY
    )
    for backend in ("faiss", "faiss-hnsw", "faiss-ivf"):
        assert index.build_ann(backend).ntotal == 2000
    assert index.build_ann("faiss-hnsw") is index.build_ann("faiss-hnsw")  # cached
    index.add(queries[:3], ["q0", "q1", "q2"], adapter_identity=IDENTITY)
    assert not index._faiss
    index.delete(["r0", "r1", "r5"])  # rows shift: FAISS row ids must follow
    assert not index._faiss
    probe = torch.cat([queries[:3], index.embeddings[[0, 3, 500]]])
    expected = ["q0", "q1", "q2", "r2", "r6", index.ids[500]]
    for backend in ("faiss", "faiss-hnsw", "faiss-ivf"):
        scores, ids = index.search(probe, 1, adapter_identity=IDENTITY, backend=backend)
        assert [row[0] for row in ids] == expected, backend
        torch.testing.assert_close(scores[:, 0], torch.ones(6), atol=1e-5, rtol=0)
        assert index.build_ann(backend).ntotal == 2000


def test_ivf_on_a_small_gallery_falls_back_to_flat(faiss, queries):
    index = GalleryIndex.from_embeddings(_clustered(200, 64, seed=4), range(200), adapter_identity=IDENTITY)
    with pytest.warns(UserWarning, match="too few to train a faiss-ivf index"):
        _, ids = index.search(queries[:5], 3, adapter_identity=IDENTITY, backend="faiss-ivf")
    assert ids == index.search(queries[:5], 3, adapter_identity=IDENTITY)[1]
    with pytest.raises(ValueError, match="ivf_nlist=10 needs at least 390 vectors"):
        index.build_ann("faiss-ivf", FaissOptions(ivf_nlist=10))


def test_missing_results_are_dropped_not_mapped_to_the_last_id(faiss, gallery, queries):
    options = FaissOptions(ivf_nprobe=1)
    scores, ids = gallery.search(
        queries[:4], 1000, adapter_identity=IDENTITY, backend="faiss-ivf", faiss_options=options
    )
    for row_scores, row_ids in zip(scores, ids, strict=True):
        found = int(torch.isfinite(row_scores).sum())
        assert found == len(row_ids) < 1000 and torch.isinf(row_scores[found:]).all()
        assert len(set(row_ids)) == found  # no -1 turned into gallery.ids[-1]


def test_unknown_backend_and_bad_options():
    index = GalleryIndex.from_embeddings(torch.eye(4), range(4), adapter_identity=IDENTITY)
    with pytest.raises(ValueError, match="backend must be one of"):
        index.search(torch.eye(4), 2, adapter_identity=IDENTITY, backend="annoy")
    with pytest.raises(ValueError, match="build_ann builds a FAISS backend"):
        index.build_ann("exact")
    with pytest.raises(ValueError, match="hnsw_m must be a positive integer"):
        FaissOptions(hnsw_m=0)
    with pytest.raises(ValueError, match="ivf_nlist must be a positive integer or None"):
        FaissOptions(ivf_nlist=-1)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(torch.eye(4), 0, adapter_identity=IDENTITY)


def test_missing_faiss_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    index = GalleryIndex.from_embeddings(torch.eye(4), range(4), adapter_identity=IDENTITY)
    for backend in ("faiss", "faiss-hnsw", "faiss-ivf"):
        with pytest.raises(ImportError, match=r"pip install vpdml\[faiss\]"):
            index.search(torch.eye(4), 2, adapter_identity=IDENTITY, backend=backend)
        with pytest.raises(ImportError, match="pip install faiss-cpu"):
            index.ann_recall(torch.eye(4), 2, adapter_identity=IDENTITY, backend=backend)
    assert index.search(torch.eye(4), 1, adapter_identity=IDENTITY)[1] == [["0"], ["1"], ["2"], ["3"]]
    query = tmp_path / "q.png"
    assert main(["search", "--index", str(tmp_path / "idx"), "--backend", "faiss-hnsw", str(query)]) == 1
    assert "needs FAISS: `pip install vpdml[faiss]`" in capsys.readouterr().err


def test_cli_backend_choices_match_the_index():
    search = build_parser()._subparsers._group_actions[0].choices["search"]
    (action,) = [a for a in search._actions if a.dest == "backend"]
    assert tuple(action.choices) == BACKENDS and action.default == "exact"


def test_search_latency_bench_prints_its_table(faiss, capsys, tmp_path):
    bench = Path(__file__).resolve().parents[2] / "bench"
    sys.path.insert(0, str(bench))
    try:
        import search_latency
    finally:
        sys.path.remove(str(bench))
    args = ["--sizes", "2000", "--dims", "16", "--queries", "5", "--single-queries", "2", "--repeats", "2"]
    rows = search_latency.main([*args, "--json", str(tmp_path / "out.json")])
    assert [row["backend"] for row in rows] == list(BACKENDS)
    assert all(row["recall"] == 1.0 for row in rows[:2]) and all(0 <= row["recall"] <= 1 for row in rows)
    out = capsys.readouterr().out
    assert "| gallery | dim | backend | build (s) |" in out and "| 2,000 | 16 | faiss HNSW |" in out
    assert (tmp_path / "out.json").is_file()
