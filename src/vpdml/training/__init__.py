"""Training: one plain ``accelerate`` loop with exact resume, head warm-up, checkpoints and release files.

``build_model(backbone, method, num_classes)`` then ``train(model, splits, TrainingArguments(...))``; see
docs/training.md.
"""

from vpdml.modules.loading import load_backbone, load_image_processor
from vpdml.retrieval.embed import embed_dataset
from vpdml.retrieval.evaluate import evaluate_splits
from vpdml.training.accelerator import create_accelerator
from vpdml.training.args import METHODS, RECIPES, Recipe, TrainingArguments
from vpdml.training.factory import build_model, describe_method, load_splits
from vpdml.training.head_warmup import warm_up_head
from vpdml.training.optim import create_optimizer, parameter_groups
from vpdml.training.outputs import push_run_folder
from vpdml.training.trainer import NonFiniteLossError, TrainerState, TrainResult, train

__all__ = [
    "METHODS",
    "RECIPES",
    "NonFiniteLossError",
    "Recipe",
    "TrainResult",
    "TrainerState",
    "TrainingArguments",
    "build_model",
    "create_accelerator",
    "create_optimizer",
    "describe_method",
    "embed_dataset",
    "evaluate_splits",
    "load_backbone",
    "load_image_processor",
    "load_splits",
    "parameter_groups",
    "push_run_folder",
    "train",
    "warm_up_head",
]
