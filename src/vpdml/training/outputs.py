"""The files a finished run writes next to its adapter: metrics.json, model card, plots; and the Hub push."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vpdml import hub
from vpdml.atomic_io import atomic_write_json
from vpdml.data import EvalSets, EvalTransform
from vpdml.data.processor_config import write_processor_config
from vpdml.models.full_finetune import saved_model_kind
from vpdml.models.protocol import DMLModel, as_dml_model
from vpdml.modules.loading import offline_spec, portable_backbone_name
from vpdml.plots import plot_retrieval_grid, plot_training_curves
from vpdml.retrieval.evaluate import (
    SplitEmbeddings,
    class_names_of,
)
from vpdml.retrieval.knn import nearest_neighbors
from vpdml.training.args import TrainingArguments
from vpdml.training.checkpoints import CHECKPOINTS_DIRNAME, save_model_weights
from vpdml.version import __version__

METRICS_FILE = "metrics.json"
CURVES_FILE = "training_curves.png"
GRID_FILE = "retrieval_grid.png"
CARD_FILE = "README.md"


def json_ready(values: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


def draw_retrieval_grid(
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


def write_run_outputs(
    model: nn.Module,
    out: Path,
    args: TrainingArguments,
    *,
    dataset: str,
    selected_on: str | None,
    best_step: int | None,
    global_step: int,
    image_size: int | None,
    head_warmup_losses: list[float],
    history: list[dict[str, Any]],
    metrics: dict[str, dict[str, dict[str, float]]],
    final: Mapping[str, SplitEmbeddings],
    eval_sets: Mapping[str, EvalSets],
    eval_transform: EvalTransform | None = None,
) -> dict[str, Path]:
    """Save the selected weights and write metrics.json, preprocessor_config.json (the eval transform), the plots
    and (adapters) the model card into ``out``."""
    dml = as_dml_model(model)
    out.mkdir(parents=True, exist_ok=True)
    make_base_model_portable(model)
    save_model_weights(model, out, with_training_state=args.keep_training_state)
    files = {"adapter": out}
    if eval_transform is not None:
        files["preprocessor_config"] = write_processor_config(eval_transform, out)
    summary = {
        "dataset": dataset,
        "method": dml.describe(),
        "selected_on": selected_on,
        "select_metric": args.select_metric,
        "best_step": best_step,
        "global_step": global_step,
        # the evaluation crop size: `vpdml evaluate` / `vpdml embed` reuse it by default
        "image_size": image_size,
        "head_warmup_losses": head_warmup_losses,
        **metrics,
    }
    atomic_write_json(out / METRICS_FILE, summary)
    files["metrics"] = out / METRICS_FILE
    if history:
        files["training_curves"] = plot_training_curves(history, out / CURVES_FILE)
    shown = "test" if "test" in final else next(iter(final), None)
    if shown is not None:
        grid = draw_retrieval_grid(final[shown], eval_sets[shown], out / GRID_FILE, plot_retrieval_grid)
        if grid is not None:
            files["retrieval_grid"] = grid
    if dml.is_adapter:
        files["model_card"] = _write_card(dml, out, args, dataset, metrics["trained"])
    return files


def make_base_model_portable(model: nn.Module) -> None:
    """Name the base model in the saved adapter config(s) the way other machines can load it.

    The offline backbone's cache folder becomes its portable name and a Hub cache snapshot its repo id
    (:func:`vpdml.modules.loading.portable_backbone_name`); other local folders stay as they are.
    """
    configs = [*getattr(model, "peft_config", {}).values()]
    if hasattr(model, "lora_config"):
        configs.append(model.lora_config)
    for config in configs:
        if config.base_model_name_or_path:
            config.base_model_name_or_path = portable_backbone_name(config.base_model_name_or_path)


def _write_card(
    dml: DMLModel,
    out: Path,
    args: TrainingArguments,
    dataset: str,
    trained: Mapping[str, Mapping[str, float]],
) -> Path:
    saved_config = json.loads(
        (out / hub.ADAPTER_CONFIG_NAME).read_text()
    )  # what ships, inference_mode and all
    base_model = saved_config.get("base_model_name_or_path") or ""
    counts = dml.module.parameter_counts()
    return hub.write_model_card(
        out,
        base_model=base_model,
        base_model_on_hub=bool(base_model) and offline_spec(base_model) is None,
        dataset=dataset,
        method=dml.describe(),
        peft_config=saved_config,
        trainable_parameters=counts["trainable_total"],
        total_backbone_parameters=counts["backbone"],
        metrics={split: dict(values) for split, values in trained.items()},
        training_args=args.to_dict(),
        library_version=__version__,
        repo_id=args.push_to_hub,
        license=args.hub_license,
    )


def push_run(output_dir: Path, args: TrainingArguments, files: Mapping[str, Path]) -> str:
    """Upload a finished run's adapter, card, metrics and plots to ``args.push_to_hub``."""
    if "model_card" not in files:
        raise ValueError(
            "push_to_hub uploads PEFT adapters; full fine-tuning runs save the whole model locally."
        )
    # through the module, so that a test (or a user) can replace the upload
    return hub.push_adapter_to_hub(
        output_dir, args.push_to_hub, token=args.hub_token, private=args.hub_private
    )


def missing_run_files(run_dir: str | Path) -> list[str]:
    """What a finished adapter run writes that ``run_dir`` lacks: adapter config and weights, card, metrics."""
    run_dir = Path(run_dir)
    missing = [name for name in (hub.ADAPTER_CONFIG_NAME,) if not (run_dir / name).is_file()]
    if not any((run_dir / name).is_file() for name in hub.ADAPTER_WEIGHTS_NAMES):
        missing.append(hub.ADAPTER_WEIGHTS_NAMES[0])
    missing += [name for name in (CARD_FILE, METRICS_FILE) if not (run_dir / name).is_file()]
    return missing


def push_run_folder(
    run_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
) -> str:
    """Upload a finished adapter run (``vpdml push``) and return the repository URL.

    The upload is :func:`vpdml.hub.push_adapter_to_hub`'s (release files only, never checkpoints, refused when a
    file holds the token). A card written without a repo id gets ``repo_id`` in its usage snippet first.

    Raises:
        FileNotFoundError: ``run_dir`` is not a folder, or not a finished run (the message names what is missing).
        ValueError: a full fine-tuning or LoRA run (not a vpdml adapter), or a file holding the token.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"{run_dir} is not a folder: pass the --output-dir of a finished `vpdml train` run."
        )
    kind = saved_model_kind(run_dir)
    if kind == "full-finetune":
        raise ValueError(
            f"{run_dir} is a full fine-tuning run: it saves the whole backbone, not an adapter, and vpdml push "
            "uploads vpdml adapters. Share it with huggingface_hub's upload_folder if you mean to publish the model."
        )
    if kind is not None:
        raise ValueError(
            f"{run_dir} is a {kind} run (PEFT {kind} weights plus vpdml's head in separate files): vpdml push uploads "
            "vpdml adapters only."
        )
    missing = missing_run_files(run_dir)
    if missing:
        hint = ""
        if (run_dir / CHECKPOINTS_DIRNAME).is_dir():
            hint = " It holds checkpoints: finish the run (vpdml train ... --resume-from-checkpoint latest) first."
        raise FileNotFoundError(
            f"{run_dir} is not a finished vpdml run: it lacks {', '.join(missing)}.{hint}"
        )
    hub.fill_card_repo_id(run_dir / CARD_FILE, repo_id)
    return hub.push_adapter_to_hub(
        run_dir,
        repo_id,
        token=token,
        private=private,
        revision=revision,
        commit_message=f"Upload vpdml run {run_dir.resolve().name}",
    )
