"""Retrieval: embedding datasets, exact k-NN, retrieval metrics, gallery indexes and loading trained models."""

from vpdml.retrieval.embed import embed_dataset
from vpdml.retrieval.embedder import ImageEmbedder
from vpdml.retrieval.evaluate import evaluate_splits
from vpdml.retrieval.identity import AdapterIdentity, AdapterMismatchError
from vpdml.retrieval.index import GalleryIndex, embed_queries
from vpdml.retrieval.knn import nearest_neighbors
from vpdml.retrieval.metrics import format_metrics_table, retrieval_metrics

__all__ = [
    "AdapterIdentity",
    "AdapterMismatchError",
    "GalleryIndex",
    "ImageEmbedder",
    "embed_dataset",
    "embed_queries",
    "evaluate_splits",
    "format_metrics_table",
    "nearest_neighbors",
    "retrieval_metrics",
]
