"""Tests of vpdml.retrieval.metrics: hand-computed cases, equality with pytorch-metric-learning, ties, errors."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

import vpdml.retrieval.knn as knn_module
from vpdml.retrieval.knn import nearest_neighbors
from vpdml.retrieval.metrics import (
    EVALUATE_METRIC_PATH,
    format_metrics_table,
    load_evaluate_metric,
    retrieval_metrics,
)

PML_METRICS = ("precision_at_1", "mean_average_precision_at_r", "r_precision")
RECALL_AT = (1, 2, 4, 8)
CHUNK_SIZES = (1, 7, 64, 100_000)


def unit_circle(angles_in_degrees: list[float]) -> torch.Tensor:
    """2-D embeddings whose cosine ranking is the ranking by angular distance."""
    radians = torch.tensor(angles_in_degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()


# --------------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------------


def test_single_set_hand_computed() -> None:
    # Angles/labels: 0 A, 30 A, 100 A, 40 B, 175 B, 240 C (C is a singleton: left out).
    # Rankings by angular distance (query itself excluded), hits marked *:
    #   q0: 1* 3 2* 5 4   R=2  R@1 1  R@2 1  RP 1/2  AP 1/2
    #   q1: 3 0* 2* 4 5   R=2  R@1 0  R@2 1  RP 1/2  AP (1/2)/2
    #   q2: 3 1* 4 0* 5   R=2  R@1 0  R@2 1  RP 1/2  AP (1/2)/2
    #   q3: 1 0 2 4* 5    R=1  R@4 1 only
    #   q4: 5 2 3* 1 0    R=1  R@4 1 only
    embeddings = unit_circle([0, 30, 100, 40, 175, 240])
    labels = torch.tensor([0, 0, 0, 1, 1, 2])

    result = retrieval_metrics(embeddings, labels, recall_at=(1, 2, 4))

    assert result["num_queries"] == 5
    assert result["recall@1"] == pytest.approx(0.2)
    assert result["recall@2"] == pytest.approx(0.6)
    assert result["recall@4"] == pytest.approx(1.0)
    assert result["r_precision"] == pytest.approx(0.3)
    assert result["map@r"] == pytest.approx(0.2)
    assert set(result) == {"recall@1", "recall@2", "recall@4", "map@r", "r_precision", "num_queries"}


def test_query_gallery_hand_computed() -> None:
    # Gallery: 0 A, 30 A, 100 B, 200 C. Queries: 10 A, 120 B, 300 D (not in gallery: left out), 90 A.
    #   q(10 A):  g0* g1* g2 g3  R=2  R@1 1  RP 1    AP 1
    #   q(120 B): g2* g3 g1 g0   R=1  R@1 1  RP 1    AP 1
    #   q(90 A):  g2 g1* g0* g3  R=2  R@1 0  R@2 1  RP 1/2  AP (1/2)/2
    gallery = unit_circle([0, 30, 100, 200])
    gallery_labels = torch.tensor([0, 0, 1, 2])
    queries = unit_circle([10, 120, 300, 90])
    query_labels = torch.tensor([0, 1, 3, 0])

    result = retrieval_metrics(
        gallery, gallery_labels, query_embeddings=queries, query_labels=query_labels, recall_at=(1, 2)
    )

    assert result["num_queries"] == 3
    assert result["recall@1"] == pytest.approx(2 / 3)
    assert result["recall@2"] == pytest.approx(1.0)
    assert result["r_precision"] == pytest.approx(2.5 / 3)
    assert result["map@r"] == pytest.approx(0.75)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_ties_go_to_lower_gallery_index_and_duplicates_of_the_query_count(chunk_size: int) -> None:
    # Items 0, 1, 2 are the same vector (labels 0, 1, 0); item 3 is orthogonal (label 1).
    #   q0: 1 2* 3   (tie 1 vs 2 -> index 1 first)   R=1  R@1 0  R@2 1
    #   q1: 0 2 3*                                    R=1  R@2 0
    #   q2: 0* 1 3   (0 is an exact duplicate of q2 and counts)  R=1  R@1 1  RP 1  AP 1
    #   q3: 0 1* 2   (three-way tie at 0)             R=1  R@1 0  R@2 1
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 1])

    with pytest.warns(UserWarning, match="whole gallery"):
        result = retrieval_metrics(embeddings, labels, recall_at=(1, 2, 3), chunk_size=chunk_size)
    assert result == pytest.approx(
        {
            "recall@1": 0.25,
            "recall@2": 0.75,
            "recall@3": 1.0,
            "map@r": 0.25,
            "r_precision": 0.25,
            "num_queries": 4,
        }
    )

    scores, indices = nearest_neighbors(embeddings, embeddings, 3, exclude_self=True, chunk_size=chunk_size)
    assert indices.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert scores.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    # Ties at the top-k boundary are cut by lower index too.
    _, top_two = nearest_neighbors(embeddings, embeddings, 2, exclude_self=True, chunk_size=chunk_size)
    assert top_two.tolist() == [[1, 2], [0, 2], [0, 1], [0, 1]]


def test_embeddings_are_l2_normalised_inside() -> None:
    embeddings = unit_circle([0, 30, 100, 40, 175, 240])
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    scales = torch.tensor([[1.0], [7.0], [0.01], [3.0], [100.0], [0.5]])

    assert retrieval_metrics(embeddings * scales, labels, recall_at=(1, 2)) == retrieval_metrics(
        embeddings, labels, recall_at=(1, 2)
    )


# --------------------------------------------------------------------------------------------------
# Equality with pytorch-metric-learning
# --------------------------------------------------------------------------------------------------


def clustered_embeddings(seed: int, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters of very different sizes (1 to 30, several singletons) plus exact duplicates.

    The duplicates copy items within their own class, so equal scores only ever tie items of the same
    label: the metrics then do not depend on how ties are ordered and must match pml exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    class_sizes = [1, 1, 1, 2, 2, 3, 5, 8, 13, 21, 30, 4, 6, 9, 1]
    centers = torch.randn(len(class_sizes), dim, generator=generator)
    labels = torch.repeat_interleave(torch.arange(len(class_sizes)), torch.tensor(class_sizes))
    embeddings = centers[labels] + 0.9 * torch.randn(len(labels), dim, generator=generator)
    duplicated = torch.randperm(len(labels), generator=generator)[:12]
    embeddings = torch.cat([embeddings, embeddings[duplicated]])
    labels = torch.cat([labels, labels[duplicated]])
    shuffle = torch.randperm(len(labels), generator=generator)
    return embeddings[shuffle], labels[shuffle]


def pml_reference(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    single_set: bool,
) -> dict[str, float]:
    """pml's AccuracyCalculator with its defaults (avg_of_avgs=False, k=None) and exact cosine k-NN."""
    knn = CustomKNN(CosineSimilarity())
    calculator = AccuracyCalculator(include=PML_METRICS, knn_func=knn, device=torch.device("cpu"))
    accuracies = calculator.get_accuracy(
        queries, query_labels, gallery, gallery_labels, ref_includes_query=single_set
    )
    # pml has no recall@K: derive it from its own k-NN, over the queries it does not leave out.
    _, neighbor_indices = knn(queries, max(RECALL_AT), gallery, ref_includes_query=single_set)
    hits = gallery_labels[neighbor_indices] == query_labels.unsqueeze(1)
    positives = (gallery_labels.unsqueeze(0) == query_labels.unsqueeze(1)).sum(dim=1) - int(single_set)
    counted = positives > 0
    reference = {f"recall@{k}": hits[counted, :k].any(dim=1).double().mean().item() for k in RECALL_AT}
    reference["map@r"] = accuracies["mean_average_precision_at_r"]
    reference["r_precision"] = accuracies["r_precision"]
    reference["num_queries"] = int(counted.sum())
    assert reference["recall@1"] == pytest.approx(accuracies["precision_at_1"], abs=1e-12)
    return reference


@pytest.fixture(scope="module")
def single_set_case() -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    embeddings, labels = clustered_embeddings(seed=0)
    return embeddings, labels, pml_reference(embeddings, labels, embeddings, labels, single_set=True)


@pytest.fixture(scope="module")
def query_gallery_case() -> tuple[torch.Tensor, ...]:
    embeddings, labels = clustered_embeddings(seed=1)
    is_query = torch.arange(len(labels)) % 3 == 0
    queries, query_labels = embeddings[is_query], labels[is_query]
    gallery, gallery_labels = embeddings[~is_query], labels[~is_query]
    # A query class absent from the gallery must be left out, as pml does.
    queries = torch.cat([queries, torch.randn(2, queries.shape[1])])
    query_labels = torch.cat([query_labels, torch.tensor([999, 999])])
    reference = pml_reference(queries, query_labels, gallery, gallery_labels, single_set=False)
    return gallery, gallery_labels, queries, query_labels, reference


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_single_set_matches_pytorch_metric_learning(single_set_case, chunk_size: int) -> None:
    embeddings, labels, reference = single_set_case
    assert len(labels) - reference["num_queries"] >= 3  # singletons really were left out

    result = retrieval_metrics(embeddings, labels, recall_at=RECALL_AT, chunk_size=chunk_size)

    assert result == pytest.approx(reference, abs=1e-6)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_query_gallery_matches_pytorch_metric_learning(query_gallery_case, chunk_size: int) -> None:
    gallery, gallery_labels, queries, query_labels, reference = query_gallery_case
    assert reference["num_queries"] < len(query_labels)

    result = retrieval_metrics(
        gallery,
        gallery_labels,
        query_embeddings=queries,
        query_labels=query_labels,
        recall_at=RECALL_AT,
        chunk_size=chunk_size,
    )

    assert result == pytest.approx(reference, abs=1e-6)


def test_numpy_and_half_precision_inputs(single_set_case) -> None:
    embeddings, labels, reference = single_set_case
    from_numpy = retrieval_metrics(embeddings.numpy(), labels.numpy().astype(np.int32))
    assert from_numpy == pytest.approx(reference, abs=1e-6)
    from_lists = retrieval_metrics(embeddings.tolist(), labels.tolist(), device="cpu")
    assert from_lists == pytest.approx(reference, abs=1e-6)
    reversed_views = retrieval_metrics(embeddings.numpy()[::-1], labels.numpy()[::-1])  # negative strides
    assert reversed_views["num_queries"] == reference["num_queries"]

    for dtype in (torch.float16, torch.bfloat16):
        low_precision = embeddings.to(dtype)
        # Widening to float32 is exact, so the low-precision input is scored as that float32 matrix.
        expected = retrieval_metrics(low_precision.float(), labels)
        assert retrieval_metrics(low_precision, labels) == expected
        assert retrieval_metrics(low_precision, labels)["recall@1"] == pytest.approx(
            reference["recall@1"], abs=0.1
        )


# --------------------------------------------------------------------------------------------------
# Ties across labels and chunking
# --------------------------------------------------------------------------------------------------


def brute_force_metrics(
    embeddings: np.ndarray, labels: np.ndarray, recall_at: tuple[int, ...]
) -> dict[str, float]:
    """Full-matrix reference of the documented semantics: rank by score, equal scores by lower index."""
    unit = embeddings.astype(np.float64) / np.linalg.norm(
        embeddings.astype(np.float64), axis=1, keepdims=True
    )
    scores = (unit @ unit.T).astype(np.float32)
    sums = dict.fromkeys([f"recall@{k}" for k in recall_at] + ["map@r", "r_precision"], 0.0)
    counted = 0
    for query in range(len(labels)):
        others = [j for j in range(len(labels)) if j != query]
        ranking = sorted(others, key=lambda j: (-scores[query, j], j))
        hits = labels[ranking] == labels[query]
        r = int(hits.sum())
        if r == 0:
            continue
        counted += 1
        for k in recall_at:
            sums[f"recall@{k}"] += float(hits[:k].any())
        sums["r_precision"] += hits[:r].sum() / r
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        sums["map@r"] += (precision[:r] * hits[:r]).sum() / r
    return {**{name: total / counted for name, total in sums.items()}, "num_queries": counted}


def test_cross_label_ties_follow_the_documented_order_at_every_chunk_size() -> None:
    generator = np.random.default_rng(3)
    base = generator.normal(size=(40, 3)).astype(np.float32)
    base_labels = generator.integers(0, 6, size=40)
    # Exact duplicates with *other* labels: their order among equal scores changes every metric.
    duplicated = generator.integers(0, 40, size=30)
    embeddings = np.concatenate([base, base[duplicated], base[:5]])
    labels = np.concatenate([base_labels, (base_labels[duplicated] + 1) % 6, base_labels[:5]])

    expected = brute_force_metrics(embeddings, labels, RECALL_AT)
    for chunk_size in (1, 2, 3, 16, 1000):
        result = retrieval_metrics(embeddings, labels, recall_at=RECALL_AT, chunk_size=chunk_size)
        assert result == pytest.approx(expected, abs=1e-12), f"chunk_size={chunk_size}"


def test_never_scores_more_than_a_chunk_of_queries_at_once(monkeypatch) -> None:
    embeddings, labels = clustered_embeddings(seed=2)
    block_shapes = []
    original_score_block = knn_module._score_block

    def recording_score_block(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        block_shapes.append((queries.shape[0], gallery.shape[0]))
        return original_score_block(queries, gallery)

    monkeypatch.setattr(knn_module, "_score_block", recording_score_block)
    result = retrieval_metrics(embeddings, labels, chunk_size=25)

    assert all(rows <= 25 and columns == len(labels) for rows, columns in block_shapes)
    assert sum(rows for rows, _ in block_shapes) == result["num_queries"]  # left-out queries cost nothing


def test_nearest_neighbors_matches_a_full_matrix_top_k() -> None:
    generator = torch.Generator().manual_seed(4)
    gallery = torch.randn(120, 8, generator=generator)
    queries = torch.randn(33, 8, generator=generator)
    full = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(gallery, dim=1).T
    expected_scores, expected_indices = full.topk(10, dim=1)

    scores, indices = nearest_neighbors(queries, gallery, 10, chunk_size=8)

    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores, atol=1e-6, rtol=0)

    _, self_excluded = nearest_neighbors(gallery, gallery, 119, exclude_self=True, chunk_size=50)
    assert not (self_excluded == torch.arange(120).unsqueeze(1)).any()
    assert all(
        sorted(row) == [j for j in range(120) if j != i] for i, row in enumerate(self_excluded.tolist())
    )


def test_scores_do_not_depend_on_how_queries_are_chunked() -> None:
    # float32 BLAS kernels round differently for different numbers of query rows (about 80% of the
    # scores below would differ in the last bit); accumulating in float64 and rounding to float32 makes
    # the scores agree except where a value sits on a float32 rounding boundary.
    generator = torch.Generator().manual_seed(5)
    embeddings = torch.randn(100, 512, generator=generator)
    reference_scores, _ = nearest_neighbors(embeddings, embeddings, 99, exclude_self=True, chunk_size=1000)
    for chunk_size in (1, 3, 7):
        scores, _ = nearest_neighbors(embeddings, embeddings, 99, exclude_self=True, chunk_size=chunk_size)
        assert (scores != reference_scores).double().mean() < 1e-3, f"chunk_size={chunk_size}"


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

GOOD_EMBEDDINGS = unit_circle([0, 10, 90, 100])
GOOD_LABELS = torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embeddings": torch.ones(4)}, r"`embeddings` must be a 2-D"),
        (
            {"embeddings": torch.ones(0, 2), "labels": torch.ones(0, dtype=torch.long)},
            r"`embeddings` is empty",
        ),
        ({"embeddings": torch.ones(4, 2, dtype=torch.long)}, r"`embeddings` must hold floating-point"),
        (
            {"embeddings": GOOD_EMBEDDINGS.index_fill(0, torch.tensor([2]), math.nan)},
            r"NaN .* \(first: \[2\]\)",
        ),
        ({"labels": torch.tensor([0, 0, 1])}, r"`labels` has 3 labels but `embeddings` has 4 rows"),
        ({"labels": GOOD_LABELS.float()}, r"`labels` must hold integer class ids"),
        ({"labels": GOOD_LABELS.reshape(2, 2)}, r"`labels` must be a 1-D"),
        ({"labels": ["cat", "cat", "dog", "dog"]}, r"could not turn `labels` \(list\) into a numeric tensor"),
        ({"embeddings": [[1.0, 0.0], [1.0]]}, r"could not turn `embeddings` \(list\) into a numeric tensor"),
        ({"labels": torch.tensor([0, 1, 2, 3])}, r"No query has another item with its label"),
        ({"query_embeddings": GOOD_EMBEDDINGS}, r"Pass `query_embeddings` and `query_labels` together"),
        (
            {"query_embeddings": torch.ones(2, 3), "query_labels": torch.tensor([0, 1])},
            r"`query_embeddings` has dimension 3 but `embeddings` has 2",
        ),
        (
            {"query_embeddings": torch.ones(2, 2), "query_labels": torch.tensor([0])},
            r"`query_labels` has 1 labels but `query_embeddings` has 2 rows",
        ),
        ({"recall_at": ()}, r"`recall_at` is empty"),
        ({"recall_at": (1, 0)}, r"`recall_at` values must be positive integers"),
        ({"chunk_size": 0}, r"`chunk_size` must be a positive integer"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs: dict, message: str) -> None:
    arguments = {"embeddings": GOOD_EMBEDDINGS, "labels": GOOD_LABELS, "recall_at": (1,), **kwargs}
    embeddings, labels = arguments.pop("embeddings"), arguments.pop("labels")
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(embeddings, labels, **arguments)


def test_nearest_neighbors_bad_input() -> None:
    with pytest.raises(ValueError, match=r"`k` must be an integer between 1 and 3"):
        nearest_neighbors(GOOD_EMBEDDINGS, GOOD_EMBEDDINGS, 4, exclude_self=True)
    with pytest.raises(ValueError, match=r"exclude_self=True means query i is gallery item i"):
        nearest_neighbors(GOOD_EMBEDDINGS[:2], GOOD_EMBEDDINGS, 1, exclude_self=True)
    with pytest.raises(ValueError, match=r"`query_embeddings` has dimension 3"):
        nearest_neighbors(torch.ones(2, 3), GOOD_EMBEDDINGS, 1)


def test_recall_k_beyond_the_gallery_warns_and_counts_every_query() -> None:
    with pytest.warns(UserWarning, match=r"K in \[8\] ranks the whole gallery \(3 candidates"):
        result = retrieval_metrics(GOOD_EMBEDDINGS, GOOD_LABELS, recall_at=(1, 8))
    assert result["recall@8"] == 1.0


# --------------------------------------------------------------------------------------------------
# Presentation and the evaluate module
# --------------------------------------------------------------------------------------------------


def test_format_metrics_table_single_and_nested() -> None:
    single = {"map@r": 0.25, "recall@10": 0.5, "recall@2": 0.75, "num_queries": 12, "r_precision": 1 / 3}
    assert format_metrics_table(single) == (
        "| R@2 | R@10 | MAP@R | R-Precision | Queries |\n"
        "|---|---|---|---|---|\n"
        "| 0.7500 | 0.5000 | 0.2500 | 0.3333 | 12 |"
    )
    nested = {"frozen": {"recall@1": 0.2, "map@r": 0.1}, "vptsp-g": {"recall@1": 0.34567}}
    assert format_metrics_table(nested, digits=2) == (
        "|  | R@1 | MAP@R |\n|---|---|---|\n| frozen | 0.20 | 0.10 |\n| vptsp-g | 0.35 | - |"
    )
    with pytest.raises(ValueError, match="non-empty"):
        format_metrics_table({})
    with pytest.raises(ValueError, match="mixes plain values and nested dicts"):
        format_metrics_table({"a": {"recall@1": 1.0}, "recall@1": 1.0})


def test_evaluate_module_loads_offline_and_matches(single_set_case, monkeypatch, tmp_path) -> None:
    def no_network(*args, **kwargs):
        raise OSError("network access attempted while loading the local metric")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    embeddings, labels, reference = single_set_case

    metric = load_evaluate_metric(cache_dir=str(tmp_path), keep_in_memory=True)
    result = metric.compute(
        embeddings=embeddings.tolist(), labels=labels.tolist(), recall_at=RECALL_AT, chunk_size=32
    )

    assert result == pytest.approx(reference, abs=1e-6)
    assert EVALUATE_METRIC_PATH.is_file()
    assert metric.name == "vpdml_retrieval"
