"""Train and evaluate vpdml models: one plain ``accelerate`` loop, exact resume, any number of processes.

``train(build_model(backbone, "vptsp-g", splits.num_train_classes), splits, TrainingArguments(...))`` runs the
zero-shot evaluation, the optional head warm-up, the loop, selection, the final evaluation and writes the release
files; docs/training.md describes each step, the outputs, exact resume and several processes.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vpdml.atomic_io import atomic_write_json
from vpdml.data import (
    ClassBalancedBatchSampler,
    DMLSplits,
    DMLTransformDataset,
    collate,
    label_array,
    transforms_from_processor,
)
from vpdml.models.protocol import as_dml_model
from vpdml.modules.backbones import compile_blocks
from vpdml.modules.row_sparse import clip_grad_norm_ as clip_sparse_grad_norm_
from vpdml.modules.row_sparse import (
    row_sparse_parameters,
)
from vpdml.retrieval.evaluate import (
    SplitEmbeddings,
    embed_eval_sets,
    split_metrics,
)
from vpdml.training.accelerator import check_accelerator, create_accelerator
from vpdml.training.args import TrainingArguments, trackers
from vpdml.training.checkpoints import (
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
from vpdml.training.distributed import all_reduce_row_sparse_gradients, broadcast_buffers, exclude_from_ddp
from vpdml.training.head_warmup import warm_up_head
from vpdml.training.objective import DMLObjective
from vpdml.training.optim import create_optimizer, create_scheduler
from vpdml.training.outputs import push_run, write_run_outputs
from vpdml.training.prompt_init import init_prompts_from_data
from vpdml.training.selection import available_eval_sets, metric_row, monitor_split, selection_split
from vpdml.training.state import TrainerState, TrainResult

__all__ = ["NonFiniteLossError", "train"]

logger = logging.getLogger(__name__)

_BEST_DIRNAME = "best"
_BEST_STATE_FILE = "best_state.json"
_TRAINER_STATE_FORMAT = "vpdml-trainer-state/1"


def _enable_activation_checkpointing(backbone: nn.Module) -> None:
    # transformers >= 5.x renamed gradient_checkpointing_enable (now a deprecated alias); 4.x only has the old name
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _step_seed(seed: int, micro_step: int, rank: int) -> int:
    """A 63-bit seed that depends only on (seed, micro-step, rank)."""
    state = np.random.SeedSequence([seed, micro_step, rank]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


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
        self.model = model
        self.dml = as_dml_model(model)
        self.splits = splits
        self.args = args
        self.step_callback = step_callback
        self.output_dir = Path(args.output_dir)
        self.checkpoint_root = self.output_dir / CHECKPOINTS_DIRNAME
        self.accelerator = accelerator or create_accelerator(args, self.model)
        check_accelerator(self.accelerator, args, self.model)
        num_classes = splits.num_train_classes
        if self.dml.num_classes != num_classes:
            raise ValueError(
                f"The model has proxies for {self.dml.num_classes} classes but the training split has "
                f"{num_classes}: build the model with num_classes=splits.num_train_classes."
            )
        self.train_transform, self.eval_transform = transforms_from_processor(
            image_processor if image_processor is not None else {},
            args.image_size,
            scale=args.train_crop_scale,
        )
        self.eval_sets = available_eval_sets(splits)
        self.selection = selection_split(args, self.eval_sets)
        self.monitor = monitor_split(self.selection, self.eval_sets)
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
            self.dml.describe(),
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
        row = metric_row(state.global_step, epoch, self.monitor, metrics)
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
            _enable_activation_checkpointing(self.dml.backbone)
        if resume_dir is None:  # before the warm-up, which caches the features the prompts produce
            init_prompts_from_data(
                self.model, self.splits.train, self.eval_transform, args, accelerator=accelerator
            )
        bank = self.dml.proxy_bank
        if (args.head_warmup_epochs or bank.needs_data_init) and resume_dir is None:
            self.state.head_warmup_losses = warm_up_head(
                self.model, self.splits.train, self.eval_transform, args, accelerator=accelerator
            )

        if args.torch_compile:
            compile_blocks(self.dml.backbone)
        optimizer = create_optimizer(self.model, args)
        scheduler = create_scheduler(optimizer, args, self.state.total_steps, self.steps_per_epoch)
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
            files = write_run_outputs(
                self.model,
                self.output_dir,
                args,
                dataset=self.splits.name,
                selected_on=self.selection if state.best_step is not None else None,
                best_step=state.best_step,
                global_step=state.global_step,
                image_size=int(getattr(self.eval_transform, "size", 0)) or None,
                head_warmup_losses=state.head_warmup_losses,
                history=state.history,
                metrics=metrics,
                final=final,
                eval_sets=self.eval_sets,
                eval_transform=self.eval_transform,
            )
            if args.push_to_hub:
                hub_url = push_run(self.output_dir, args, files)
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


def _tracker_config(args: TrainingArguments) -> dict[str, Any]:
    """Tracker hyper-parameters: scalars only (tensorboard's hparams refuse lists and None)."""
    return {
        key: value if isinstance(value, int | float | str | bool) else str(value)
        for key, value in args.to_dict().items()
    }


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
