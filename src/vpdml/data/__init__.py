"""Data pipeline for deep metric learning: class-disjoint splits, benchmark loaders, class-balanced
batch sampling and image transforms. Nothing here imports the tuner (and the tuner imports nothing
from here), so the pieces work in any training loop.
"""

from vpdml.data.loaders import (
    HUB_BENCHMARKS,
    HubBenchmark,
    from_hf_dataset,
    load_dml_dataset,
    load_imagefolder,
    load_inshop,
    load_sop,
    standardize_columns,
)
from vpdml.data.sampler import ClassBalancedBatchSampler
from vpdml.data.splits import (
    DMLSplits,
    EvalSets,
    choose_validation_classes,
    class_disjoint_halves,
    class_halves,
    count_singleton_classes,
    hold_out_validation,
    label_array,
    remap_labels,
    select_classes,
    split_by_class,
    split_classes,
)
from vpdml.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DMLTransformDataset,
    EvalTransform,
    ImageTransform,
    TrainTransform,
    collate,
    sample_seed,
    to_rgb,
    transforms_from_processor,
    with_transform,
)

__all__ = [
    "HUB_BENCHMARKS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClassBalancedBatchSampler",
    "DMLSplits",
    "DMLTransformDataset",
    "EvalSets",
    "EvalTransform",
    "HubBenchmark",
    "ImageTransform",
    "TrainTransform",
    "choose_validation_classes",
    "class_disjoint_halves",
    "class_halves",
    "collate",
    "count_singleton_classes",
    "from_hf_dataset",
    "hold_out_validation",
    "label_array",
    "load_dml_dataset",
    "load_imagefolder",
    "load_inshop",
    "load_sop",
    "remap_labels",
    "sample_seed",
    "select_classes",
    "split_by_class",
    "split_classes",
    "standardize_columns",
    "to_rgb",
    "transforms_from_processor",
    "with_transform",
]
