"""What a training run is told: :class:`TrainingArguments` and the paper's per-benchmark :data:`RECIPES`.

Kept apart from :mod:`vpdml.training` so the command line can build its flags from these fields (and a script can
validate settings) without importing the training machinery.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from vpdml.tuner.config import METHOD_PRESETS

__all__ = ["METHODS", "RECIPES", "Recipe", "TrainingArguments", "trackers"]

METHODS: tuple[str, ...] = (*METHOD_PRESETS, "lora", "full-finetune")
"""Every method :func:`vpdml.training.build_model` knows: the PEFT baselines of :data:`vpdml.METHOD_PRESETS` and
full fine-tuning."""

# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingArguments:
    """Everything :func:`train` needs besides the model and the data. Invalid values raise ``ValueError``."""

    output_dir: str = field(
        metadata={"help": "Folder for the adapter, metrics, plots, best/ and checkpoints/."}
    )
    method: Literal["linear", "vpt", "vpt-bitfit", "vptsp-m", "vptsp-g", "lora", "full-finetune"] = field(
        default="vptsp-g",
        metadata={
            "help": f"Method to build ({', '.join(METHODS)}); used by the CLI, recorded in metrics.json."
        },
    )
    # --- length and batches ------------------------------------------------------------------------------
    epochs: int = field(default=15, metadata={"help": "Training epochs (an epoch: about every image once)."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimizer steps (overrides epochs)."}
    )
    classes_per_batch: int = field(
        default=32,
        metadata={"help": "P: distinct classes per global batch (divisible by the process count)."},
    )
    samples_per_class: int = field(default=2, metadata={"help": "m: images per class in a batch."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Batches per optimizer step (each batch still has P classes x m images)."},
    )
    # --- optimisation ------------------------------------------------------------------------------------
    optimizer: Literal["adamw", "sgd"] = field(default="adamw", metadata={"help": "adamw or sgd (momentum)."})
    learning_rate: float = field(
        default=5e-4, metadata={"help": "Learning rate of prompts, head, BitFit, class prompts and GRU."}
    )
    proxy_learning_rate: float = field(
        default=1e-2, metadata={"help": "Learning rate of the learnable proxies O (usually 10-100x higher)."}
    )
    prompt_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the prompt tokens (shared visual prompts and class prompts); None: "
            "learning_rate. Prompts start small and Adam moves each by about lr per step, so short runs may "
            "need it higher than the head's."
        },
    )
    weight_decay: float = field(
        default=1e-4,
        metadata={
            "help": "Weight decay of weight matrices (head, proxy head, GRU; backbone for full fine-tuning). "
            "Never applied to proxies, prompts/tokens, biases, BitFit offsets or norms."
        },
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    lr_scheduler: Literal["cosine", "linear", "constant"] = field(
        default="cosine", metadata={"help": "Learning-rate decay after the warm-up (per optimizer step)."}
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warm-up steps."})
    lr_cosine_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Length of the cosine in epochs (None: the run's length, so the rate ends at lr_min). Longer "
            "than the run, the rate stops part-way down, as in the official recipes (CUB: 50 for 15 epochs)."
        },
    )
    lr_min: float = field(
        default=0.0,
        metadata={
            "help": "Floor of the cosine, the same for every parameter group (official SOP recipe: 5e-5); a group "
            "whose learning rate is below it stays constant."
        },
    )
    max_grad_norm: float | None = field(
        default=None, metadata={"help": "Clip the gradient norm to this value (None: no clipping)."}
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="no", metadata={"help": "Autocast precision: no, bf16 (GPU or CPU) or fp16 (GPU only)."}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute the backbone's activations in the backward pass (less memory)."},
    )
    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "Compile each backbone block with torch.compile (regional; first steps pay the compile time)."
        },
    )
    # --- images ------------------------------------------------------------------------------------------
    image_size: int | None = field(
        default=None, metadata={"help": "Crop size (None: the image processor's, else 224)."}
    )
    train_crop_scale: tuple[float, float] = field(
        default=(0.08, 1.0), metadata={"help": "Area range of the RandomResizedCrop of training images."}
    )
    num_workers: int = field(
        default=0, metadata={"help": "DataLoader worker processes (augmentations do not depend on it)."}
    )
    # --- evaluation and selection ------------------------------------------------------------------------
    eval_every_epochs: int = field(
        default=1, metadata={"help": "Evaluate the selection split every N epochs (0: only at the end)."}
    )
    eval_steps: int | None = field(
        default=None, metadata={"help": "Also evaluate every N optimizer steps (None: off)."}
    )
    eval_batch_size: int = field(default=128, metadata={"help": "Images per forward pass in evaluation."})
    recall_at: tuple[int, ...] = field(
        default=(1, 2, 4, 8),
        metadata={"help": "K of Recall@K (SOP: 1 10 100 1000; In-Shop: 1 10 20 30 40 50)."},
    )
    select_on: Literal["auto", "validation", "test", "none"] = field(
        default="auto",
        metadata={
            "help": "Split that picks the best checkpoint: auto = validation if the data has one, else none "
            "(keep the last weights). 'test' selects on test classes and overstates results."
        },
    )
    select_metric: str = field(
        default="recall@1", metadata={"help": "Metric that picks the best checkpoint."}
    )
    # --- checkpoints -------------------------------------------------------------------------------------
    checkpoint_every_steps: int | None = field(
        default=None, metadata={"help": "Save a resumable checkpoint every N optimizer steps (None: never)."}
    )
    keep_checkpoints: int | None = field(
        default=2, metadata={"help": "Keep only the newest N checkpoints (None or 0: keep all)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder, or 'latest' (the newest in output_dir/checkpoints, if any)."},
    )
    keep_training_state: bool = field(
        default=False,
        metadata={
            "help": "Also write vpdml_training_state.safetensors (proxies, class prompts: can be large) to "
            "output_dir, to continue training the released adapter later."
        },
    )
    # --- head warm-up ------------------------------------------------------------------------------------
    head_warmup_epochs: int = field(
        default=0,
        metadata={
            "help": "Before the main loop, train only the head and learnable proxies on cached backbone features "
            "for N epochs (cheap; helps small data sets, which need many epochs)."
        },
    )
    head_warmup_learning_rate: float = field(
        default=1e-3, metadata={"help": "AdamW learning rate of the head during the warm-up."}
    )
    # --- run ---------------------------------------------------------------------------------------------
    seed: int = field(default=0, metadata={"help": "Seeds batches, augmentations and dropout."})
    log_every: int = field(
        default=10, metadata={"help": "Log loss and learning rate every N optimizer steps."}
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "Experiment trackers via accelerate: none, tensorboard, wandb, all, or a comma list."
        },
    )
    show_progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars (main process)."})
    ddp_find_unused_parameters: bool | None = field(
        default=None,
        metadata={"help": "DDP's find_unused_parameters (None: on for full fine-tuning only)."},
    )
    push_to_hub: str | None = field(
        default=None, metadata={"help": "Upload the adapter, card, metrics and plots to this Hub repo id."}
    )
    hub_token: str | None = field(
        default=None,
        repr=False,  # never in a repr, a log line or a traceback's locals
        metadata={"help": "Hub token (default: the stored login / HF_TOKEN). Never written."},
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    hub_license: str | None = field(
        default=None,
        metadata={
            "help": "License id for the model card's metadata, e.g. apache-2.0 (default: none stated)."
        },
    )

    def __post_init__(self) -> None:
        self.output_dir = os.fspath(self.output_dir)  # a Path is welcome; JSON files get a string
        if self.resume_from_checkpoint is not None:
            self.resume_from_checkpoint = os.fspath(self.resume_from_checkpoint)
        self.recall_at = tuple(int(k) for k in self.recall_at)
        self.train_crop_scale = (float(self.train_crop_scale[0]), float(self.train_crop_scale[1]))
        self._validate()

    def _validate(self) -> None:
        if not str(self.output_dir):
            raise ValueError("TrainingArguments.output_dir must name a folder.")
        if self.method not in METHODS:
            raise ValueError(
                f"TrainingArguments.method must be one of {', '.join(METHODS)}; got {self.method!r}."
            )
        for name in ("epochs", "classes_per_batch", "samples_per_class", "gradient_accumulation_steps"):
            _require_int(self, name, minimum=1)
        for name in ("max_steps", "eval_steps", "checkpoint_every_steps"):
            if getattr(self, name) is not None:
                _require_int(self, name, minimum=1)
        for name in ("warmup_steps", "eval_every_epochs", "num_workers", "head_warmup_epochs", "seed"):
            _require_int(self, name, minimum=0)
        _require_int(self, "eval_batch_size", minimum=1)
        _require_int(self, "log_every", minimum=1)
        if self.keep_checkpoints is not None:
            _require_int(self, "keep_checkpoints", minimum=0)
        if self.image_size is not None:
            _require_int(self, "image_size", minimum=1)
        for name in ("learning_rate", "proxy_learning_rate", "head_warmup_learning_rate"):
            _require_number(self, name, positive=True)
        for name in ("weight_decay", "momentum"):
            _require_number(self, name, positive=False)
        for name in ("max_grad_norm", "prompt_learning_rate"):
            if getattr(self, name) is not None:
                _require_number(self, name, positive=True)
        _require_choice(self, "optimizer", ("adamw", "sgd"))
        _require_choice(self, "lr_scheduler", ("cosine", "linear", "constant"))
        _require_number(self, "lr_min", positive=False)
        if self.lr_cosine_epochs is not None:
            _require_number(self, "lr_cosine_epochs", positive=True)
        if self.lr_scheduler != "cosine" and (self.lr_cosine_epochs is not None or self.lr_min):
            raise ValueError(
                "TrainingArguments.lr_cosine_epochs and lr_min shape the cosine schedule; they do not apply to "
                f"lr_scheduler={self.lr_scheduler!r}. Use lr_scheduler='cosine' or leave them at None and 0."
            )
        _require_choice(self, "mixed_precision", ("no", "bf16", "fp16"))
        _require_choice(self, "select_on", ("auto", "validation", "test", "none"))
        low, high = self.train_crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"TrainingArguments.train_crop_scale must satisfy 0 < min <= max <= 1, got {low, high}."
            )
        if not self.recall_at or min(self.recall_at) < 1:
            raise ValueError(f"TrainingArguments.recall_at must be positive integers, got {self.recall_at}.")
        if not self.select_metric:
            raise ValueError(
                "TrainingArguments.select_metric must name a metric, e.g. 'recall@1' or 'map@r'."
            )
        if (
            self.select_metric.startswith("recall@")
            and int(self.select_metric[7:] or 0) not in self.recall_at
        ):
            raise ValueError(
                f"select_metric={self.select_metric!r} is not computed: add its K to recall_at {self.recall_at}."
            )
        trackers(self.report_to)  # raises on unknown names

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy without the Hub token."""
        values = dataclasses.asdict(self)
        values.pop("hub_token", None)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _require_int(args: TrainingArguments, name: str, *, minimum: int) -> None:
    value = getattr(args, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"TrainingArguments.{name} must be an integer >= {minimum}, got {value!r}.")


def _require_number(args: TrainingArguments, name: str, *, positive: bool) -> None:
    value = getattr(args, name)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(
            f"TrainingArguments.{name} must be a {'positive' if positive else 'non-negative'} number, got {value!r}."
        )


def _require_choice(args: TrainingArguments, name: str, choices: tuple[str, ...]) -> None:
    if getattr(args, name) not in choices:
        raise ValueError(
            f"TrainingArguments.{name} must be one of {', '.join(choices)}; got {getattr(args, name)!r}."
        )


def trackers(report_to: str) -> list[str] | None:
    """The accelerate tracker names of ``report_to`` (None for ``"none"``); raises on unknown names."""
    names = [name.strip() for name in str(report_to).split(",") if name.strip()]
    if not names or names == ["none"]:
        return None
    known = {
        "tensorboard",
        "wandb",
        "all",
        "comet_ml",
        "aim",
        "mlflow",
        "clearml",
        "dvclive",
        "swanlab",
        "trackio",
    }
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"TrainingArguments.report_to: unknown tracker(s) {unknown}; use none, {', '.join(sorted(known))}."
        )
    return names


# --------------------------------------------------------------------------------------------------
# Recipes: the official configs of the paper (ViT-S/16), docs/method.md
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Paper settings for one benchmark: :class:`TrainingArguments` values and adapter config overrides."""

    description: str
    training: Mapping[str, Any]
    adapter: Mapping[str, Any]


RECIPES: dict[str, Recipe] = {
    "cub200": Recipe(
        "CUB-200-2011, VPTSP-G (official ViT-S config): SGD lr 5e-3, proxies 0.1, N=10, m=3, alpha 0.5, 15 epochs "
        "of a 50-epoch cosine.",
        {
            "method": "vptsp-g",
            "optimizer": "sgd",
            "learning_rate": 5e-3,
            "proxy_learning_rate": 0.1,
            "epochs": 15,
            "lr_cosine_epochs": 50,  # the rate ends at 79% of its start
            "lr_min": 1e-8,
            "classes_per_batch": 32,
            "samples_per_class": 2,
            "recall_at": (1, 2, 4, 8),
        },
        {"num_prompts": 10, "class_prompts": 3, "proxy_mix_alpha": 0.5, "gru_init": "xavier"},
    ),
    "cars196": Recipe(
        "Cars-196, VPTSP-G: AdamW lr 5e-4, proxies 0.01, N=80 step 2 on 11 layers, m=50 step 2 on 8 layers, "
        "alpha 0.7, 50 epochs.",
        {
            "method": "vptsp-g",
            "optimizer": "adamw",
            "learning_rate": 5e-4,
            "proxy_learning_rate": 0.01,
            "epochs": 50,
            "lr_min": 1e-6,
            "classes_per_batch": 32,
            "samples_per_class": 2,
            "recall_at": (1, 2, 4, 8),
        },
        {
            "num_prompts": 80,
            "prompt_step": 2,
            "prompt_depth": 11,
            "class_prompts": 50,
            "class_prompt_depth": 8,
            "class_prompt_step": 2,
            "proxy_mix_alpha": 0.7,
            "gru_init": "xavier",
        },
    ),
    "sop": Recipe(
        "Stanford Online Products, VPTSP-G: AdamW lr 1e-4, proxies 0.05, batch 32 x 1, N=90, m=5, alpha 0.2, "
        "GRU dropout 0.1, 120 epochs, cosine floor 5e-5.",
        {
            "method": "vptsp-g",
            "optimizer": "adamw",
            "learning_rate": 1e-4,
            "proxy_learning_rate": 0.05,
            "epochs": 120,
            "lr_min": 5e-5,
            "classes_per_batch": 32,
            "samples_per_class": 1,
            "recall_at": (1, 10, 100, 1000),
        },
        {
            "num_prompts": 90,
            "class_prompts": 5,
            "proxy_mix_alpha": 0.2,
            "gru_dropout": 0.1,
            "gru_init": "xavier",
        },
    ),
    "inshop": Recipe(
        "In-Shop Clothes, VPTSP-G: like SOP with m=80 class prompts, 80 epochs of a 100-epoch cosine, floor 5e-6.",
        {
            "method": "vptsp-g",
            "optimizer": "adamw",
            "learning_rate": 1e-4,
            "proxy_learning_rate": 0.05,
            "epochs": 80,
            "lr_cosine_epochs": 100,
            "lr_min": 5e-6,
            "classes_per_batch": 32,
            "samples_per_class": 1,
            "recall_at": (1, 10, 20, 30, 40, 50),
        },
        {
            "num_prompts": 90,
            "class_prompts": 80,
            "proxy_mix_alpha": 0.2,
            "gru_dropout": 0.1,
            "gru_init": "xavier",
        },
    ),
}
"""Per-benchmark paper recipes (``vpdml train --recipe cub200``); explicit arguments override them."""
