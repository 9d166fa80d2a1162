"""The ``accelerate.Accelerator`` a run uses, and the checks a caller-provided one must pass."""

from __future__ import annotations

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from torch import nn

from vpdml.models.protocol import as_dml_model
from vpdml.training.args import TrainingArguments, trackers

__all__ = ["create_accelerator"]


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
        find_unused = model is not None and as_dml_model(model).has_unused_parameters
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


def check_accelerator(accelerator: Accelerator, args: TrainingArguments, model: nn.Module) -> None:
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
        for name, on in as_dml_model(model).host_resident_options.items():
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
