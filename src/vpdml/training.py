"""Train and evaluate vpdml adapters: one plain ``accelerate`` loop, exact resume, any number of processes.

The pieces::

    model = build_model(ViTModel.from_pretrained(name), "vptsp-g", splits.num_train_classes)
    result = train(model, splits, TrainingArguments(output_dir="runs/cub", epochs=15), image_processor=processor)
    result.metrics["trained"]["test"]["recall@1"]

What :func:`train` does, in order: zero-shot evaluation of the frozen backbone on every evaluation split; an
optional head warm-up on cached features (:func:`warm_up_head`); the training loop (class-balanced batches,
separate learning rate for the learnable proxies, warm-up + cosine schedule, gradient accumulation, mixed
precision, a tqdm bar with loss and images/s, periodic evaluation, checkpoints); then it loads the selected
weights, evaluates them and writes the release files (see :class:`TrainResult`).

Model selection. ``select_on="auto"`` (the default) picks the best evaluation on the *validation* split (held-out
training classes, see ``load_dml_dataset(validation_classes=...)``) when there is one, and otherwise keeps the
last weights: test classes never choose a checkpoint unless you ask for ``select_on="test"`` (which makes test
numbers optimistic, as in the official VPTSP code). Whenever the selection metric improves, the weights are
written to ``output_dir/best``; at the end they are loaded back into ``model`` (which therefore holds the
*selected* weights when ``train`` returns) and saved at the top of ``output_dir``.

Outputs in ``output_dir``: the adapter (``adapter_config.json``, ``adapter_model.safetensors``; the whole model
for full fine-tuning), optionally ``vpdml_training_state.safetensors`` (``keep_training_state``), ``metrics.json``
(zero-shot backbone vs trained, per split), ``README.md`` (model card), ``training_curves.png``,
``retrieval_grid.png``, ``best/`` and ``checkpoints/step-N/`` (see :mod:`vpdml.checkpointing`).

Exact resume. A resumed run ends bit-identical to an uninterrupted one (same seed, settings and process count;
tested on CPU): the checkpoint restores weights, training-only state (semantic proxies included), optimizer,
scheduler, grad scaler and the sampler position; augmentations are a function of ``(seed, epoch, image)``; and
torch's global generator (dropout, e.g. ``gru_dropout``) is re-seeded from ``(seed, micro-step, rank)`` before
every forward pass, so it does not depend on what ran before (data-loader start-up and evaluation draw from it).
On GPUs, bit-identity also needs deterministic kernels (``torch.use_deterministic_algorithms``).

Several processes (``accelerate launch``): the loader is prepared with ``split_batches=True`` so the processes
share each global batch ``classes_per_batch x samples_per_class`` (``classes_per_batch`` must be divisible by the
number of processes), the loss is the global-batch Proxy Anchor loss and the semantic-proxy state is synchronised
after every forward pass (:mod:`vpdml.objective`); evaluation shards the images and gathers the embeddings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from peft import PeftModel, get_peft_model
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .architectures import compile_blocks
from .atomic_io import atomic_write_json
from .checkpointing import (
    CHECKPOINTS_DIRNAME,
    TRAINER_STATE_FILE,
    latest_checkpoint,
    load_model_weights,
    load_optimizer_state,
    load_rng_state,
    read_json,
    remove_stale_temporaries,
    replace_directory,
    resolve_checkpoint,
    rotate_checkpoints,
    save_model_weights,
    save_optimizer_state,
    save_rng_state,
)
from .config import METHOD_PRESETS, VisualPromptDMLConfig
from .data import (
    ClassBalancedBatchSampler,
    DMLSplits,
    DMLTransformDataset,
    EvalSets,
    collate,
    label_array,
    transforms_from_processor,
)
from .evaluation import (
    SplitEmbeddings,
    class_names_of,
    embed_dataset,
    embed_eval_sets,
    evaluate_splits,
    split_metrics,
)
from .full_finetune import FullFineTuningDML
from .head_warmup import warm_up_head
from .metrics import nearest_neighbors
from .objective import (
    DMLObjective,
    all_reduce_row_sparse_gradients,
    broadcast_buffers,
    exclude_from_ddp,
    proxy_bank_of,
)
from .row_sparse import RowSparseAdamW, RowSparseSGD, has_row_sparse_parameters, row_sparse_parameters
from .row_sparse import clip_grad_norm_ as clip_sparse_grad_norm_
from .training_args import METHODS, RECIPES, Recipe, TrainingArguments, trackers

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
    "parameter_groups",
    "train",
    "warm_up_head",
]

logger = logging.getLogger(__name__)

_BEST_DIRNAME = "best"
_BEST_STATE_FILE = "best_state.json"
_METRICS_FILE = "metrics.json"
_CURVES_FILE = "training_curves.png"
_GRID_FILE = "retrieval_grid.png"
_TRAINER_STATE_FORMAT = "vpdml-trainer-state/1"
# Parameter names that hold tokens rather than weights: never weight-decayed (decay would pull them to "absent").
_TOKEN_PARAMETER_MARKERS = ("prompts", "cls_token", "position_embeddings", "mask_token", "register_tokens")


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

_FULL_FINETUNE_OPTIONS = {
    "embedding_dim",
    "pooling",
    "proxy_anchor_scale",
    "proxy_anchor_margin",
    "proxy_anchor_positive_average",
    "proxy_negatives",
    "proxy_offload",
}


def build_model(backbone: nn.Module, method: str, num_classes: int, **config_overrides: Any) -> nn.Module:
    """A trainable DML model around ``backbone``.

    Args:
        backbone: a supported transformers vision model (``ViTModel``, ``Dinov2Model``, ...).
        method: ``linear``, ``vpt``, ``vpt-bitfit``, ``vptsp-m``, ``vptsp-g`` (PEFT adapters) or
            ``full-finetune`` (:class:`vpdml.FullFineTuningDML`).
        num_classes: number of training classes (labels ``0..C-1``).
        **config_overrides: :class:`vpdml.VisualPromptDMLConfig` fields (``num_prompts=``, ``embedding_dim=``...);
            full fine-tuning takes ``embedding_dim``, ``pooling`` and the ``proxy_anchor_*`` options.
    """
    if method == "full-finetune":
        unknown = sorted(set(config_overrides) - _FULL_FINETUNE_OPTIONS)
        if unknown:
            raise ValueError(
                f"full-finetune does not take {unknown}; it accepts {sorted(_FULL_FINETUNE_OPTIONS)} (prompts and "
                "semantic proxies are adapter options)."
            )
        return FullFineTuningDML(backbone, num_classes=num_classes, **config_overrides)
    if method not in METHOD_PRESETS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    unknown = sorted(set(config_overrides) - VisualPromptDMLConfig.field_names())
    if unknown:
        raise ValueError(f"Unknown VisualPromptDMLConfig option(s) {unknown}.")
    config = VisualPromptDMLConfig.for_method(method, num_classes=num_classes, **config_overrides)
    return get_peft_model(backbone, config)


def describe_method(model: nn.Module) -> str:
    """Human-readable name of what ``model`` trains: ``VPTSP-G``, ``VPT + BitFit``, ``Full fine-tuning``..."""
    if isinstance(model, FullFineTuningDML):
        return "Full fine-tuning (Proxy Anchor)"
    config = model.peft_config[model.base_model._resolve_adapter(None)]
    if config.semantic_proxies == "gru":
        name = "VPTSP-G"
    elif config.semantic_proxies == "ema":
        name = "VPTSP-M"
    else:
        name = "VPT" if config.num_prompts else "Linear probe"
        return f"{name} + BitFit" if config.bitfit else name
    return name if config.bitfit else f"{name} (no BitFit)"


def load_backbone(name_or_path: str, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a vision backbone by Hub id or folder: ``AutoModel`` (``CLIPVisionModel`` for CLIP checkpoints).

    ``"offline"`` loads vpdml's built-in offline DINOv2 ViT-S/14 with its recommended first 11 blocks
    (:func:`vpdml.offline.load_offline_backbone`). ViT and DeiT load without their pooler: vpdml's head reads the
    final norm's tokens, so the pooler would only add unused (and, for DINOv2 conversions, random) weights.
    """
    if name_or_path == "offline":
        from .offline import RECOMMENDED_NUM_LAYERS, load_offline_backbone

        return load_offline_backbone(num_layers=RECOMMENDED_NUM_LAYERS)
    from transformers import AutoConfig, AutoModel, CLIPVisionModel

    config = AutoConfig.from_pretrained(name_or_path, **from_pretrained_kwargs)
    if config.model_type in ("clip", "clip_vision_model"):
        return CLIPVisionModel.from_pretrained(name_or_path, **from_pretrained_kwargs)
    if config.model_type in ("vit", "deit"):
        from_pretrained_kwargs.setdefault("add_pooling_layer", False)
    return AutoModel.from_pretrained(name_or_path, **from_pretrained_kwargs)


def load_image_processor(name_or_path: str) -> dict[str, Any]:
    """The backbone's image-processor settings (mean, std, size), or ``{}`` (ImageNet statistics) if it has none."""
    if name_or_path == "offline":
        return {}  # the offline DINOv2 uses ImageNet statistics, vpdml's default
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name_or_path).to_dict()
    except (OSError, ValueError) as error:
        warnings.warn(
            f"No image processor for {name_or_path} ({error.__class__.__name__}); using ImageNet mean/std.",
            stacklevel=2,
        )
        return {}


def _unwrap_peft_or_full(model: nn.Module) -> nn.Module:
    if not isinstance(model, PeftModel | FullFineTuningDML):
        raise TypeError(
            f"train() needs a PeftModel with a vpdml adapter or a FullFineTuningDML, got {type(model).__name__}. "
            "Build one with vpdml.training.build_model(backbone, method, num_classes)."
        )
    if isinstance(model, PeftModel) and not hasattr(model.base_model, "dml_proxies"):
        raise TypeError("This PeftModel has no vpdml adapter; create it with vpdml.VisualPromptDMLConfig.")
    return model


def _model_num_classes(model: nn.Module) -> int:
    bank = proxy_bank_of(model)
    if bank is None:
        raise ValueError(
            "The model's adapter has no proxies (it was loaded for inference or built without num_classes): "
            "build it with build_model(backbone, method, num_classes=<training classes>) to train it."
        )
    return bank.num_classes


def _enable_activation_checkpointing(backbone: nn.Module) -> None:
    # transformers >= 5.x renamed gradient_checkpointing_enable (now a deprecated alias); 4.x only has the old name
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _backbone_of(model: nn.Module) -> nn.Module:
    return model.base_model.model if isinstance(model, PeftModel) else model.backbone


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------


def _is_learnable_proxy(name: str) -> bool:
    return name.endswith("learnable") and ("dml_proxies." in name or name.startswith("proxies."))


def parameter_groups(model: nn.Module, args: TrainingArguments) -> list[dict[str, Any]]:
    """Optimizer groups: weight matrices (``learning_rate``, ``weight_decay``), other trainable tensors
    (``learning_rate``, no decay: biases, norms, BitFit offsets, prompts and tokens) and the learnable proxies
    (``proxy_learning_rate``, no decay). Empty groups are left out; the order is deterministic."""
    decay, no_decay, proxies = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _is_learnable_proxy(name):
            proxies.append(param)
        elif param.ndim >= 2 and not any(marker in name for marker in _TOKEN_PARAMETER_MARKERS):
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"params": decay, "lr": args.learning_rate, "weight_decay": args.weight_decay},
        {"params": no_decay, "lr": args.learning_rate, "weight_decay": 0.0},
        {"params": proxies, "lr": args.proxy_learning_rate, "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError(
            "The model has no trainable parameters: is the adapter active and not in inference mode?"
        )
    return groups


def create_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """AdamW or SGD over :func:`parameter_groups`.

    A model with row-sparse parameters (class prompts stored ``"sparse"`` or ``"low_rank"``, see
    :mod:`vpdml.class_prompt_tables`, or learnable proxies with ``proxy_negatives``) gets
    :class:`vpdml.row_sparse.RowSparseAdamW` / ``RowSparseSGD``, which update only the rows in the gradient (the
    batch's classes, the sampled proxies) and apply PyTorch's own update to every dense parameter.
    """
    groups = parameter_groups(model, args)
    if has_row_sparse_parameters(model):
        if args.optimizer == "sgd":
            return RowSparseSGD(groups, lr=args.learning_rate, momentum=args.momentum)
        return RowSparseAdamW(groups, lr=args.learning_rate)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate, momentum=args.momentum)
    return torch.optim.AdamW(groups, lr=args.learning_rate)


def _create_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = "constant_with_warmup" if args.lr_scheduler == "constant" else args.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=total_steps)


# --------------------------------------------------------------------------------------------------
# Accelerator
# --------------------------------------------------------------------------------------------------


def create_accelerator(args: TrainingArguments, model: nn.Module | None = None) -> Accelerator:
    """The ``Accelerator`` :func:`train` uses: ``split_batches=True`` (processes share each class-balanced global
    batch), DDP without buffer broadcast (the semantic-proxy state is synchronised by :class:`DMLObjective`), and
    ``find_unused_parameters`` for full fine-tuning (the backbone's pooler is unused)."""
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "mixed_precision='fp16' needs a CUDA GPU (autocast fp16 does nothing on the CPU); use bf16."
        )
    find_unused = args.ddp_find_unused_parameters
    if find_unused is None:
        find_unused = isinstance(model, FullFineTuningDML)
    # accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with another precision
    # (e.g. a bf16 run after an fp32 one in a notebook). Like transformers' Trainer, start it afresh; the
    # process-group state (PartialState) is kept.
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers(args.report_to),
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[
            DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=bool(find_unused))
        ],
    )


def _check_accelerator(accelerator: Accelerator, args: TrainingArguments, model: nn.Module) -> None:
    if accelerator.distributed_type in (
        DistributedType.DEEPSPEED,
        DistributedType.FSDP,
        DistributedType.MEGATRON_LM,
    ):
        raise ValueError(
            f"vpdml.training supports single-device and DDP runs, not {accelerator.distributed_type}: adapters are "
            "small enough to replicate. Launch with plain `accelerate launch --multi_gpu`."
        )
    if accelerator.num_processes > 1 and not accelerator.dataloader_config.split_batches:
        raise ValueError(
            "Pass an Accelerator created with dataloader_config=DataLoaderConfiguration(split_batches=True) (see "
            "vpdml.training.create_accelerator): each global batch must be split between the processes."
        )
    if accelerator.num_processes > 1:
        if isinstance(model, PeftModel):
            config = model.peft_config[model.base_model._resolve_adapter(None)]
            offloaded = {
                name: getattr(config, name, False) for name in ("class_prompt_offload", "proxy_offload")
            }
        else:
            offloaded = {"proxy_offload": bool(getattr(model, "settings", {}).get("proxy_offload"))}
        for name, on in offloaded.items():
            if on:
                raise ValueError(
                    f"{name}=True keeps a table in host memory, which DDP cannot wrap: train it on one process, or "
                    f"set {name}=False."
                )
    if args.classes_per_batch % accelerator.num_processes:
        raise ValueError(
            f"classes_per_batch={args.classes_per_batch} must be divisible by the number of processes "
            f"({accelerator.num_processes}) so that every process gets whole classes."
        )


# --------------------------------------------------------------------------------------------------
# State and results
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainerState:
    """Where training stands; saved in every checkpoint and passed to ``step_callback``."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next batch comes from
    batch_in_epoch: int = 0  # batches of that epoch already used
    micro_step: int = 0  # batches used in total (forward passes)
    total_steps: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    last_eval_step: int | None = None
    zero_shot_metrics: dict[str, dict[str, float]] | None = None
    # training loss summed over the batches since the last log row (saved so a resumed run logs the same rows)
    loss_since_log: float = 0.0
    batches_since_log: int = 0
    head_warmup_losses: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> TrainerState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in payload.items() if key in names})


@dataclass
class TrainResult:
    """What :func:`train` produced.

    ``metrics`` is ``{"zero_shot": {split: metrics}, "trained": {split: metrics}}``; ``history`` the logged rows
    (training rows: ``step``, ``epoch``, ``loss``, ``lr``; evaluation rows: ``step``, ``epoch``,
    ``<split>/<metric>``); ``files`` the paths written to ``output_dir`` by name.
    """

    output_dir: Path
    metrics: dict[str, dict[str, dict[str, float]]]
    global_step: int
    selected_on: str | None
    best_step: int | None
    best_metric: float | None
    best_checkpoint: Path | None
    history: list[dict[str, Any]]
    files: dict[str, Path]
    hub_url: str | None = None


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _available_eval_sets(splits: DMLSplits) -> dict[str, EvalSets]:
    sets = {}
    if splits.validation is not None:
        sets["validation"] = splits.eval_sets("validation")
    if splits.test is not None or splits.query is not None:
        sets["test"] = splits.eval_sets("test")
    return sets


def _selection_split(args: TrainingArguments, eval_sets: Mapping[str, EvalSets]) -> str | None:
    if args.select_on == "none":
        return None
    if args.select_on == "auto":
        return "validation" if "validation" in eval_sets else None
    if args.select_on not in eval_sets:
        raise ValueError(
            f"select_on={args.select_on!r} but the data has no {args.select_on} split. Load it with "
            "load_dml_dataset(..., validation_classes=...) for a validation split, or use select_on='none'."
        )
    if args.select_on == "test":
        warnings.warn(
            "Selecting the checkpoint on the test split: the test numbers will be optimistic. Prefer a "
            "validation split of held-out training classes.",
            stacklevel=3,
        )
    return args.select_on


def _monitor_split(selection: str | None, eval_sets: Mapping[str, EvalSets]) -> str | None:
    """Split evaluated during training: the selection split, else validation (curves only, never test)."""
    if selection is not None:
        return selection
    return "validation" if "validation" in eval_sets else None


def _step_seed(seed: int, micro_step: int, rank: int) -> int:
    """A 63-bit seed that depends only on (seed, micro-step, rank)."""
    state = np.random.SeedSequence([seed, micro_step, rank]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _metric_row(step: int, epoch: float, split: str, metrics: Mapping[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {"step": step, "epoch": round(epoch, 4)}
    row.update({f"{split}/{name}": value for name, value in metrics.items() if name != "num_queries"})
    return row


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; :func:`train` stops before saving anything computed from it."""


class _Trainer:
    """One training run: holds what the small steps of :func:`train` share. Not public: use :func:`train`."""

    def __init__(
        self,
        model: nn.Module,
        splits: DMLSplits,
        args: TrainingArguments,
        image_processor: Any,
        accelerator: Accelerator | None,
        step_callback: Callable[[TrainerState], None] | None,
    ) -> None:
        self.model = _unwrap_peft_or_full(model)
        self.splits = splits
        self.args = args
        self.step_callback = step_callback
        self.output_dir = Path(args.output_dir)
        self.checkpoint_root = self.output_dir / CHECKPOINTS_DIRNAME
        self.accelerator = accelerator or create_accelerator(args, self.model)
        _check_accelerator(self.accelerator, args, self.model)
        num_classes = splits.num_train_classes
        if _model_num_classes(self.model) != num_classes:
            raise ValueError(
                f"The model has proxies for {_model_num_classes(self.model)} classes but the training split has "
                f"{num_classes}: build the model with num_classes=splits.num_train_classes."
            )
        self.train_transform, self.eval_transform = transforms_from_processor(
            image_processor if image_processor is not None else {},
            args.image_size,
            scale=args.train_crop_scale,
        )
        self.eval_sets = _available_eval_sets(splits)
        self.selection = _selection_split(args, self.eval_sets)
        self.monitor = _monitor_split(self.selection, self.eval_sets)
        self.state = TrainerState()
        self.show_progress = args.show_progress and self.accelerator.is_local_main_process

    # ------------------------------------------------------------------------------------------ set-up
    def _build_loader(self) -> None:
        args = self.args
        labels = label_array(self.splits.train)
        self.sampler = ClassBalancedBatchSampler(
            labels, args.classes_per_batch, args.samples_per_class, seed=args.seed
        )
        images = DMLTransformDataset(self.splits.train, self.train_transform, seed=args.seed)
        self.loader = DataLoader(
            images,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=args.num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
            persistent_workers=False,  # workers must see each epoch's set_epoch (seeded augmentations)
        )
        self.steps_per_epoch = math.ceil(len(self.sampler) / args.gradient_accumulation_steps)
        self.state.total_steps = args.max_steps or args.epochs * self.steps_per_epoch

    def _evaluate(self, names: Sequence[str], *, zero_shot: bool = False) -> dict[str, SplitEmbeddings]:
        return embed_eval_sets(
            self.model,
            {name: self.eval_sets[name] for name in names},
            self.eval_transform,
            batch_size=self.args.eval_batch_size,
            accelerator=self.accelerator,
            zero_shot=zero_shot,
            num_workers=self.args.num_workers,
            show_progress=self.show_progress,
        )

    def _metrics(self, embeddings: Mapping[str, SplitEmbeddings]) -> dict[str, dict[str, float]]:
        return {
            name: split_metrics(split, self.args.recall_at, device=self.accelerator.device)
            for name, split in embeddings.items()
        }

    def _log_plan(self) -> None:
        args, accelerator = self.args, self.accelerator
        if not accelerator.is_main_process:
            return
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        logger.info(
            "Training %s on %d images of %d classes: %d steps (%d per epoch), global batch %d classes x %d images "
            "x %d accumulation on %d process(es); %s of %s parameters trainable; selection: %s.",
            describe_method(self.model),
            len(self.splits.train),
            self.splits.num_train_classes,
            self.state.total_steps,
            self.steps_per_epoch,
            args.classes_per_batch,
            args.samples_per_class,
            args.gradient_accumulation_steps,
            accelerator.num_processes,
            f"{trainable:,}",
            f"{total:,}",
            f"{self.selection} {args.select_metric}" if self.selection else "none (last weights)",
        )

    # ------------------------------------------------------------------------------------------ resume
    def _resume_directory(self) -> Path | None:
        if self.accelerator.is_main_process:
            remove_stale_temporaries(self.checkpoint_root)
        self.accelerator.wait_for_everyone()
        return resolve_checkpoint(self.args.resume_from_checkpoint, self.output_dir)

    def _load_trainer_state(self, directory: Path) -> None:
        payload = read_json(directory / TRAINER_STATE_FILE)
        if payload.get("format") != _TRAINER_STATE_FORMAT:
            raise ValueError(
                f"{directory / TRAINER_STATE_FILE} has an unknown format {payload.get('format')!r}."
            )
        saved_sampler = payload["sampler"]
        current = self.sampler.state_dict()
        mismatched = [
            key
            for key in saved_sampler
            if key in current
            and key not in ("epoch", "batches_yielded")
            and saved_sampler[key] != current[key]
        ]
        if mismatched:
            raise ValueError(
                f"Cannot resume from {directory}: the batch stream differs ({', '.join(mismatched)} changed). "
                "Resume with the same data, seed, classes_per_batch and samples_per_class."
            )
        state = TrainerState.from_json(payload["state"])
        total = self.state.total_steps
        if state.total_steps != total:
            raise ValueError(
                f"Cannot resume from {directory}: it was made for {state.total_steps} steps, these settings give "
                f"{total} (epochs/max_steps/gradient_accumulation_steps changed); the learning-rate schedule would "
                "differ."
            )
        if state.batch_in_epoch >= len(self.sampler):  # saved at the end of an epoch
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        self.state = state

    # ------------------------------------------------------------------------------------------ saving
    def _save_checkpoint(self, optimizer: Any, scheduler: Any) -> Path:
        accelerator = self.accelerator
        final = self.checkpoint_root / f"step-{self.state.global_step}"
        tmp = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_model_weights(self.model, tmp, with_training_state=True)
            save_optimizer_state(optimizer, scheduler, tmp, scaler=accelerator.scaler)
        save_rng_state(tmp, accelerator.process_index)
        accelerator.wait_for_everyone()
        self.state.loss_since_log = float(self._loss_sum)
        if accelerator.is_main_process:
            payload = {
                "format": _TRAINER_STATE_FORMAT,
                "state": self.state.to_json(),
                "sampler": self.sampler.state_dict(),
                "num_processes": accelerator.num_processes,
                "args": self.args.to_dict(),
            }
            atomic_write_json(tmp / TRAINER_STATE_FILE, payload)  # last file: marks the checkpoint complete
            replace_directory(tmp, final)
            rotate_checkpoints(self.checkpoint_root, self.args.keep_checkpoints)
        accelerator.wait_for_everyone()
        return final

    def _save_best(self) -> None:
        accelerator = self.accelerator
        target = self.output_dir / _BEST_DIRNAME
        if accelerator.is_main_process:
            tmp = target.with_name(target.name + ".tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            save_model_weights(self.model, tmp, with_training_state=self.args.keep_training_state)
            atomic_write_json(
                tmp / _BEST_STATE_FILE,
                {
                    "step": self.state.best_step,
                    "split": self.selection,
                    "metric": self.args.select_metric,
                    "value": self.state.best_metric,
                },
            )
            replace_directory(tmp, target)
        accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------------ loop
    def _evaluate_during_training(self) -> None:
        assert self.monitor is not None
        metrics = self._metrics(self._evaluate([self.monitor]))[self.monitor]
        state = self.state
        state.last_eval_step = state.global_step
        epoch = state.epoch + state.batch_in_epoch / len(self.sampler)
        row = _metric_row(state.global_step, epoch, self.monitor, metrics)
        state.history.append(row)
        self.accelerator.log(
            {k: v for k, v in row.items() if k not in ("step", "epoch")}, step=state.global_step
        )
        if self.selection is None:
            return
        if self.args.select_metric not in metrics:
            raise ValueError(f"select_metric={self.args.select_metric!r} is not one of {sorted(metrics)}.")
        value = float(metrics[self.args.select_metric])
        if state.best_metric is None or value > state.best_metric:
            state.best_metric, state.best_step = value, state.global_step
            self._save_best()

    def _eval_due(self, end_of_epoch: bool) -> bool:
        if self.monitor is None:
            return False
        args, state = self.args, self.state
        if args.eval_steps and state.global_step % args.eval_steps == 0:
            return True
        return bool(
            end_of_epoch and args.eval_every_epochs and (state.epoch + 1) % args.eval_every_epochs == 0
        )

    def run(self) -> TrainResult:
        args, accelerator = self.args, self.accelerator
        set_seed(args.seed)
        self._build_loader()
        self._log_plan()
        resume_dir = self._resume_directory()
        self.model.to(accelerator.device)
        if resume_dir is not None:
            self._load_trainer_state(resume_dir)
            load_model_weights(self.model, resume_dir, with_training_state=True)
            logger.info("Resuming from %s (step %d).", resume_dir, self.state.global_step)
        if self.state.zero_shot_metrics is None:
            self.state.zero_shot_metrics = self._metrics(self._evaluate(list(self.eval_sets), zero_shot=True))
        if args.gradient_checkpointing:
            _enable_activation_checkpointing(_backbone_of(self.model))
        if args.head_warmup_epochs and resume_dir is None:
            self.state.head_warmup_losses = warm_up_head(
                self.model, self.splits.train, self.eval_transform, args, accelerator=accelerator
            )

        if args.torch_compile:
            compile_blocks(_backbone_of(self.model))
        optimizer = create_optimizer(self.model, args)
        scheduler = _create_scheduler(optimizer, args, self.state.total_steps)
        objective = DMLObjective(self.model)
        self.sparse_parameters = [p for p in row_sparse_parameters(self.model) if p.requires_grad]
        exclude_from_ddp(objective, self.sparse_parameters)  # DDP cannot reduce sparse gradients
        broadcast_buffers(objective)
        with warnings.catch_warnings():
            # torch deprecates DDP's broadcast_buffers in favour of an option accelerate does not expose yet; turning
            # the per-forward buffer broadcast off is what we want (DMLObjective keeps the buffers in sync).
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            objective, optimizer, loader, scheduler = accelerator.prepare(
                objective, optimizer, self.loader, scheduler
            )
        if resume_dir is not None:
            load_optimizer_state(optimizer, scheduler, resume_dir, scaler=accelerator.scaler)
            load_rng_state(resume_dir, accelerator.process_index)
            self.sampler.set_resume_point(self.state.epoch, self.state.batch_in_epoch)
        if trackers(args.report_to):
            accelerator.inittrackers("vpdml", config=_tracker_config(args))
        self._loop(objective, optimizer, loader, scheduler)
        result = self._finish()
        accelerator.end_training()
        return result

    def _loop(self, objective: nn.Module, optimizer: Any, loader: DataLoader, scheduler: Any) -> None:
        args, accelerator, state = self.args, self.accelerator, self.state
        trainable = [p for p in objective.parameters() if p.requires_grad]
        images_per_step = args.classes_per_batch * args.samples_per_class * args.gradient_accumulation_steps
        num_epochs = math.ceil(state.total_steps / self.steps_per_epoch)
        bar = tqdm(
            total=state.total_steps,
            initial=state.global_step,
            desc="training",
            unit="step",
            disable=not self.show_progress,
            dynamic_ncols=True,
        )
        # Loss is summed on the device (no sync per step) in float64, and read at log and checkpoint time only.
        self._loss_sum = torch.tensor(state.loss_since_log, dtype=torch.float64, device=accelerator.device)
        # Set on the device when a loss is NaN/Inf (no sync per step); read before anything is logged or saved.
        self._non_finite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
        self._checked_step = state.global_step
        steps_since_log, window_start = 0, time.perf_counter()
        objective.train()
        for epoch in range(state.epoch, num_epochs):
            if state.global_step >= state.total_steps:
                break
            # The sampler and the loader (which forwards the epoch to the augmentations) must agree on the epoch;
            # after a resume both calls keep the sampler's loaded position within it.
            self.sampler.set_epoch(epoch)
            loader.set_epoch(epoch)
            for batch in loader:
                with accelerator.accumulate(objective):
                    torch.manual_seed(_step_seed(args.seed, state.micro_step, accelerator.process_index))
                    loss = objective(batch["pixel_values"], batch["labels"])
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        all_reduce_row_sparse_gradients(self.sparse_parameters)
                        if args.max_grad_norm:
                            self._clip_gradients(trainable)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                state.micro_step += 1
                state.batch_in_epoch += 1
                self._loss_sum += loss.detach().double()
                self._non_finite |= ~torch.isfinite(loss.detach())
                state.batches_since_log += 1
                if not accelerator.sync_gradients:
                    continue
                state.global_step += 1
                steps_since_log += 1
                bar.update(1)
                end_of_epoch = state.batch_in_epoch == len(self.sampler)
                if state.global_step % args.log_every == 0 or state.global_step == state.total_steps:
                    self._check_finite_loss()
                    elapsed = time.perf_counter() - window_start
                    self._log_training(
                        scheduler.get_last_lr(), images_per_step * steps_since_log / max(elapsed, 1e-9), bar
                    )
                    steps_since_log, window_start = 0, time.perf_counter()
                if self._eval_due(end_of_epoch):
                    self._check_finite_loss()
                    self._evaluate_during_training()
                    objective.train()
                if args.checkpoint_every_steps and state.global_step % args.checkpoint_every_steps == 0:
                    self._check_finite_loss()
                    self._save_checkpoint(optimizer, scheduler)
                if self.step_callback is not None:
                    self.step_callback(state)
                if state.global_step >= state.total_steps:
                    break
            else:
                state.epoch, state.batch_in_epoch = epoch + 1, 0
        bar.close()
        self._check_finite_loss()

    def _check_finite_loss(self) -> None:
        """Stop when a loss since the last check was NaN/Inf, before the broken weights are logged or saved.

        Every process computes the same global-batch loss, so all of them stop together.
        """
        step = self.state.global_step
        if not bool(self._non_finite):
            self._checked_step = step
            return
        latest = latest_checkpoint(self.checkpoint_root)
        kept = (
            f"The last good checkpoint is kept ({latest}): resume_from_checkpoint='latest' continues from it."
            if latest is not None
            else "No checkpoint was written before it (set checkpoint_every_steps to keep one)."
        )
        raise NonFiniteLossError(
            f"Training stopped: the loss became NaN or Inf between optimizer steps {self._checked_step + 1} and "
            f"{step}, so the weights are no longer usable and nothing was saved from them. {kept} Usual causes: a "
            "learning rate (or proxy_learning_rate) that is too high, no gradient clipping (max_grad_norm), or fp16 "
            "overflow (try mixed_precision='bf16' or 'no')."
        )

    def _clip_gradients(self, parameters: list[nn.Parameter]) -> None:
        if self.sparse_parameters:  # torch's clip_grad_norm_ refuses sparse gradients
            self.accelerator.unscale_gradients()
            clip_sparse_grad_norm_(parameters, self.args.max_grad_norm)
        else:
            self.accelerator.clip_grad_norm_(parameters, self.args.max_grad_norm)

    def _log_training(self, lrs: Sequence[float], images_per_second: float, bar: tqdm) -> None:
        state = self.state
        loss = float(self._loss_sum) / max(state.batches_since_log, 1)
        self._loss_sum.zero_()
        state.batches_since_log = 0
        epoch = state.epoch + state.batch_in_epoch / len(self.sampler)
        state.history.append(
            {"step": state.global_step, "epoch": round(epoch, 4), "loss": loss, "lr": lrs[0]}
        )
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lrs[0]:.2e}", img_s=f"{images_per_second:.1f}")
        self.accelerator.log(
            {
                "train/loss": loss,
                "train/lr": lrs[0],
                "train/proxy_lr": lrs[-1],
                "train/images_per_second": images_per_second,
            },
            step=state.global_step,
        )

    # ------------------------------------------------------------------------------------------ finish
    def _finish(self) -> TrainResult:
        args, accelerator, state = self.args, self.accelerator, self.state
        if self.selection is not None and state.last_eval_step != state.global_step and state.global_step > 0:
            self._evaluate_during_training()  # the last weights are a candidate too
        best_dir = self.output_dir / _BEST_DIRNAME
        selected = self.selection is not None and state.best_step is not None
        if selected:
            load_model_weights(self.model, best_dir, with_training_state=args.keep_training_state)
        self.model.eval()
        final = self._evaluate(list(self.eval_sets))
        trained = self._metrics(final)
        metrics = {"zero_shot": state.zero_shot_metrics or {}, "trained": trained}
        files: dict[str, Path] = {}
        hub_url = None
        if accelerator.is_main_process:
            files = self._write_outputs(metrics, final)
            if args.push_to_hub:
                hub_url = self._push(files)
        accelerator.wait_for_everyone()
        return TrainResult(
            output_dir=self.output_dir,
            metrics=metrics,
            global_step=state.global_step,
            selected_on=self.selection if selected else None,
            best_step=state.best_step if selected else None,
            best_metric=state.best_metric if selected else None,
            best_checkpoint=best_dir if selected else None,
            history=list(state.history),
            files=files,
            hub_url=hub_url,
        )

    def _write_outputs(
        self, metrics: dict[str, dict[str, dict[str, float]]], final: Mapping[str, SplitEmbeddings]
    ) -> dict[str, Path]:
        args, state, out = self.args, self.state, self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        save_model_weights(self.model, out, with_training_state=args.keep_training_state)
        files = {"adapter": out}
        summary = {
            "dataset": self.splits.name,
            "method": describe_method(self.model),
            "selected_on": self.selection if state.best_step is not None else None,
            "select_metric": args.select_metric,
            "best_step": state.best_step,
            "global_step": state.global_step,
            # the evaluation crop size: `vpdml evaluate` / `vpdml embed` reuse it by default
            "image_size": int(getattr(self.eval_transform, "size", 0)) or None,
            "head_warmup_losses": state.head_warmup_losses,
            **metrics,
        }
        atomic_write_json(out / _METRICS_FILE, summary)
        files["metrics"] = out / _METRICS_FILE
        from .plots import plot_retrieval_grid, plot_training_curves

        if state.history:
            files["training_curves"] = plot_training_curves(state.history, out / _CURVES_FILE)
        shown = "test" if "test" in final else next(iter(final), None)
        if shown is not None:
            grid = _draw_retrieval_grid(
                final[shown], self.eval_sets[shown], out / _GRID_FILE, plot_retrieval_grid
            )
            if grid is not None:
                files["retrieval_grid"] = grid
        if isinstance(self.model, PeftModel):
            files["model_card"] = self._write_card(metrics["trained"])
        return files

    def _write_card(self, trained: Mapping[str, Mapping[str, float]]) -> Path:
        from . import __version__
        from .hub import write_model_card

        config = self.model.peft_config[self.model.base_model._resolve_adapter(None)]
        counts = self.model.base_model.parameter_counts()
        return write_model_card(
            self.output_dir,
            base_model=config.base_model_name_or_path or "a custom backbone",
            dataset=self.splits.name,
            method=describe_method(self.model),
            peft_config=_json_ready(config.to_dict()),
            trainable_parameters=counts["trainable_total"],
            total_backbone_parameters=counts["backbone"],
            metrics={split: dict(values) for split, values in trained.items()},
            training_args=self.args.to_dict(),
            library_version=__version__,
            repo_id=self.args.push_to_hub,
        )

    def _push(self, files: Mapping[str, Path]) -> str:
        from .hub import push_adapter_to_hub

        if "model_card" not in files:
            raise ValueError(
                "push_to_hub uploads PEFT adapters; full fine-tuning runs save the whole model locally."
            )
        return push_adapter_to_hub(
            self.output_dir, self.args.push_to_hub, token=self.args.hub_token, private=self.args.hub_private
        )


def _json_ready(values: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


def _tracker_config(args: TrainingArguments) -> dict[str, Any]:
    """Tracker hyper-parameters: scalars only (tensorboard's hparams refuse lists and None)."""
    return {
        key: value if isinstance(value, int | float | str | bool) else str(value)
        for key, value in args.to_dict().items()
    }


def _draw_retrieval_grid(
    embeddings: SplitEmbeddings,
    sets: EvalSets,
    path: Path,
    plot: Callable[..., Path],
    *,
    queries: int = 6,
    neighbours: int = 5,
) -> Path | None:
    """Queries spread over the split and their nearest gallery images (the query itself left out)."""
    available = embeddings.gallery.shape[0] - int(embeddings.same_set)
    k = min(neighbours, available)
    if k < 1:
        return None
    rows = np.unique(
        np.linspace(0, embeddings.query.shape[0] - 1, num=min(queries, embeddings.query.shape[0])).astype(int)
    )
    scores, indices = nearest_neighbors(
        embeddings.query[rows], embeddings.gallery, k + int(embeddings.same_set)
    )
    if embeddings.same_set:  # drop each query's own index, keep k
        kept_scores, kept_indices = [], []
        for row, (row_scores, row_indices) in zip(rows, zip(scores, indices, strict=True), strict=True):
            mask = row_indices != int(row)
            kept_scores.append(row_scores[mask][:k])
            kept_indices.append(row_indices[mask][:k])
        scores, indices = torch.stack(kept_scores), torch.stack(kept_indices)
    query_set, gallery_set = sets.query, sets.gallery
    return plot(
        lambda i: query_set[int(rows[i])]["image"],
        embeddings.query_labels[rows].numpy(),
        lambda i: gallery_set[int(i)]["image"],
        embeddings.gallery_labels.numpy(),
        indices.numpy(),
        scores.numpy(),
        path,
        max_queries=len(rows),
        class_names=class_names_of(gallery_set),
    )


def train(
    model: nn.Module,
    splits: DMLSplits,
    args: TrainingArguments,
    *,
    image_processor: Any = None,
    accelerator: Accelerator | None = None,
    step_callback: Callable[[TrainerState], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``splits.train``, select, evaluate and save it (see the module docstring).

    Args:
        model: from :func:`build_model` (a PEFT model with a vpdml adapter, or ``FullFineTuningDML``) with
            ``num_classes == splits.num_train_classes``. On return it holds the selected weights.
        splits: :class:`vpdml.data.DMLSplits` (``load_dml_dataset``); its validation split, if any, selects.
        args: :class:`TrainingArguments`.
        image_processor: the backbone's image processor, or a dict with ``image_mean``, ``image_std``,
            ``size``/``crop_size``; None: ImageNet statistics and ``args.image_size`` (default 224).
        accelerator: an ``Accelerator`` to use instead of :func:`create_accelerator`'s (it must split batches).
        step_callback: called with the :class:`TrainerState` after every optimizer step (after any checkpoint);
            an exception raised there stops training.

    Returns:
        :class:`TrainResult` (the same on every process; files are written by the main process).
    """
    return _Trainer(model, splits, args, image_processor, accelerator, step_callback).run()
