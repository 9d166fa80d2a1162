"""`evaluate` metric: exact Recall@K, MAP@R and R-Precision for deep metric learning (vpdml).

Load it from this file, which needs no Hub access::

    import evaluate
    metric = evaluate.load("/path/to/vpdml/metrics_module/vpdml_retrieval.py")
    # or: from vpdml.retrieval.metrics import load_evaluate_metric; metric = load_evaluate_metric()
    metric.compute(embeddings=embeddings, labels=labels, recall_at=(1, 2, 4, 8))

The computation is `vpdml.retrieval.metrics.retrieval_metrics` in single-set mode (every item queries all the
others, itself excluded); see that function for the definitions.
"""

import datasets
import evaluate
import numpy as np

import vpdml.retrieval.metrics

_DESCRIPTION = """
Retrieval metrics of deep metric learning (Musgrave et al. 2020, "A Metric Learning Reality Check"),
computed with exact cosine k-nearest neighbours in chunks of queries. Every item is a query against all
the other items (itself excluded by index). Queries whose class has no other item are left out, as in
pytorch-metric-learning's AccuracyCalculator.
"""

_KWARGS_DESCRIPTION = """
Args:
    embeddings (`list` of `list` of `float`): one embedding per item, all of the same length.
    labels (`list` of `int`): the class id of each item.
    recall_at (`tuple` of `int`, defaults to (1, 2, 4, 8)): the K values of Recall@K.
    chunk_size (`int`, defaults to 1024): queries scored at once (memory ~ chunk_size x num_items floats).
Returns:
    `recall@K` for each K, `map@r`, `r_precision` (floats in [0, 1]) and `num_queries` (queries that
    counted: those with at least one other item of their class).
Examples:
    >>> metric = evaluate.load("path/to/vpdml_retrieval.py")
    >>> metric.compute(embeddings=[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], labels=[0, 0, 1, 1],
    ...                recall_at=(1,))
    {'recall@1': 1.0, 'map@r': 1.0, 'r_precision': 1.0, 'num_queries': 4}
"""

_CITATION = """
@inproceedings{musgrave2020metric,
  title={A Metric Learning Reality Check},
  author={Musgrave, Kevin and Belongie, Serge and Lim, Ser-Nam},
  booktitle={European Conference on Computer Vision},
  year={2020}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VpdmlRetrieval(evaluate.Metric):
    """Recall@K, MAP@R and R-Precision over a set of labelled embeddings."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "embeddings": datasets.Sequence(datasets.Value("float32")),
                    "labels": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2003.08505"],
        )

    def _compute(
        self,
        embeddings: list,
        labels: list,
        recall_at: tuple[int, ...] = (1, 2, 4, 8),
        chunk_size: int = 1024,
    ) -> dict[str, float]:
        lengths = {len(embedding) for embedding in embeddings}
        if len(lengths) > 1:
            raise ValueError(
                f"`embeddings` rows have different lengths {sorted(lengths)}: every embedding must have "
                "the same dimension."
            )
        return vpdml.retrieval.metrics.retrieval_metrics(
            np.asarray(embeddings, dtype=np.float32),
            np.asarray(labels, dtype=np.int64),
            recall_at=recall_at,
            chunk_size=chunk_size,
        )
