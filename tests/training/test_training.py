"""The training loop end to end: it learns, selects, saves, reloads, and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

import vpdml
import vpdml.hub
from helpers.models import tiny_vit
from helpers.toy_images import NORMALISATION, layout_dataset, layout_splits
from vpdml.data import DMLSplits, transforms_from_processor
from vpdml.retrieval.embed import embed_dataset
from vpdml.retrieval.evaluate import evaluate_splits
from vpdml.retrieval.metrics import retrieval_metrics
from vpdml.training import TrainingArguments, build_model, parameter_groups, train, warm_up_head
from vpdml.training.checkpoints import (
    latest_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    resolve_checkpoint,
)
from vpdml.training.optim import create_optimizer, fused_adamw

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_args(output_dir: Path, **overrides) -> TrainingArguments:
    values = {
        "output_dir": str(output_dir),
        "epochs": 8,
        "classes_per_batch": 8,
        "samples_per_class": 2,
        "learning_rate": 1e-2,
        "proxy_learning_rate": 0.1,
        "image_size": 32,
        "train_crop_scale": (0.5, 1.0),
        "eval_batch_size": 64,
        "log_every": 5,
        "show_progress": False,
    }
    return TrainingArguments(**{**values, **overrides})


def tiny_model(
    num_classes: int, seed: int = 1, method: str = "vptsp-g", adapter_seed: int | None = None, **config
):
    """A 2-layer random ViT (``seed``) with a fresh adapter (initialised from ``adapter_seed``, default ``seed``)."""
    backbone = tiny_vit(seed, num_hidden_layers=2)
    torch.manual_seed(seed if adapter_seed is None else adapter_seed)
    defaults = {"num_prompts": 4, "class_prompts": 2, "pooling": "mean"} if method != "full-finetune" else {}
    return build_model(backbone, method, num_classes, **{**defaults, **config})


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def semantic_state(model) -> torch.Tensor:
    return model.base_model.dml_proxies["default"].semantic_state.clone()


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


def test_training_beats_the_frozen_backbone_selects_saves_and_reloads(tmp_path):
    splits = layout_splits(seed=1)
    model = tiny_model(splits.num_train_classes)
    args = tiny_args(tmp_path / "run", head_warmup_epochs=60, checkpoint_every_steps=40)
    result = train(model, splits, args, image_processor=NORMALISATION)

    zero_shot, trained = result.metrics["zero_shot"], result.metrics["trained"]
    # Measured: test R@1 0.425 zero-shot -> 0.625 trained (validation 0.646 -> 0.812; 0.458 on test without the
    # head warm-up), so the asserted margin of 0.1 leaves room.
    assert trained["test"]["recall@1"] > zero_shot["test"]["recall@1"] + 0.1
    assert trained["validation"]["recall@1"] > zero_shot["validation"]["recall@1"]
    assert len(result.history) > 0 and any("validation/recall@1" in row for row in result.history)
    assert result.global_step == 8 * 12  # 32 classes x 6 images / 16 per batch = 12 steps, 8 epochs
    assert result.selected_on == "validation" and result.best_step is not None
    assert len(result.metrics["zero_shot"]) == 2 and set(trained) == {"validation", "test"}

    out = result.output_dir
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.json",
        "README.md",
        "training_curves.png",
        "retrieval_grid.png",
    ):
        assert (out / name).is_file(), name
    assert not (out / "vpdml_training_state.safetensors").exists()  # keep_training_state=False
    saved_metrics = json.loads((out / "metrics.json").read_text())
    assert saved_metrics["trained"] == trained and saved_metrics["zero_shot"] == zero_shot
    assert saved_metrics["selected_on"] == "validation" and saved_metrics["best_step"] == result.best_step
    card = (out / "README.md").read_text()
    assert "VPTSP-G" in card and f"{trained['test']['recall@1']:.4f}" in card
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-40", "step-80"]

    # The model holds the selected (best) weights, which are also what was released at the top of output_dir.
    best = load_file(str(out / "best" / "adapter_model.safetensors"))
    released = load_file(str(out / "adapter_model.safetensors"))
    in_memory = get_peft_model_state_dict(model)
    assert best.keys() == released.keys() == in_memory.keys()
    for key in best:
        assert torch.equal(best[key], released[key]) and torch.equal(best[key], in_memory[key].cpu())

    # A fresh process would do exactly this: load the adapter onto the backbone and get the same metrics.
    reloaded = PeftModel.from_pretrained(tiny_vit(1, num_hidden_layers=2), out)
    _, eval_transform = transforms_from_processor(NORMALISATION, 32)
    again = evaluate_splits(
        reloaded,
        {"validation": splits.eval_sets("validation"), "test": splits.eval_sets("test")},
        eval_transform,
        show_progress=False,
    )
    assert again == trained


def test_query_gallery_evaluation_matches_the_metrics_module():
    data = layout_dataset(num_classes=6, per_class=4, seed=3)
    rows = np.arange(len(data))
    query, gallery = data.select(rows[rows % 4 == 0]), data.select(rows[rows % 4 != 0])
    splits = DMLSplits(name="shop", train=data, query=query, gallery=gallery)
    model = tiny_model(6)
    _, transform = transforms_from_processor(NORMALISATION, 32)
    metrics = evaluate_splits(
        model, splits.eval_sets("test"), transform, recall_at=(1, 2), show_progress=False
    )
    query_embeddings, query_labels = embed_dataset(model, query, transform, show_progress=False)
    gallery_embeddings, gallery_labels = embed_dataset(model, gallery, transform, show_progress=False)
    expected = retrieval_metrics(
        gallery_embeddings,
        gallery_labels,
        query_embeddings=query_embeddings,
        query_labels=query_labels,
        recall_at=(1, 2),
    )
    assert metrics == {"test": expected}
    assert expected["num_queries"] == 6
    with model.disable_adapter():
        frozen = model.embed(torch.stack([transform(image) for image in query["image"]]))
    zero_shot, _ = embed_dataset(model, query, transform, zero_shot=True, show_progress=False)
    torch.testing.assert_close(zero_shot, frozen)


# --------------------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def stop_at(step: int):
    def callback(state) -> None:
        if state.global_step == step:
            raise Interrupt(f"simulated crash after step {step}")

    return callback


DATA_STARTED_PROXIES = {
    "semantic_proxy_init": "class_means",
    "proxy_head_init": "embedding_head",
    "unseen_semantic_proxies": "learnable",
    "proxy_mix": "normalized",
    "learnable_proxy_init": "small",
    "prompt_init": "token_mean",
    "class_prompt_init": "token_mean",
}


@pytest.mark.parametrize(
    ("storage", "optimizer", "negatives", "semantic", "schedule"),
    [
        ("dense", "adamw", None, {}, {}),
        ("sparse", "adamw", None, {}, {}),
        # the official schedule: a cosine longer than the run, with a floor (LambdaLR over per-group factors)
        ("low_rank", "sgd", None, {"gru_init": "xavier"}, {"lr_cosine_epochs": 5, "lr_min": 1e-3}),
        ("dense", "adamw", 3, {}, {}),
        ("dense", "adamw", None, DATA_STARTED_PROXIES, {}),
        (
            "dense",
            "adamw",
            3,
            {
                "semantic_proxy_init": "first_pass",
                "unseen_semantic_proxies": "learnable",
                "proxy_pass_every": 2,
                "proxy_pass_layers": 1,  # a shared trunk: the proxy pass continues the sample pass
                "proxy_pass_tokens": 0.5,  # a random half of the patches: draws from the saved generator
            },
            {},
        ),
    ],
    ids=[
        "dense-adamw",
        "row-sparse-adamw",
        "low-rank-sgd-official-schedule",
        "sampled-negatives-adamw",
        "data-started-proxies",
        "first-pass-sampled",
    ],
)
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(
    tmp_path, storage, optimizer, negatives, semantic, schedule
):
    splits = layout_splits(num_classes=24, per_class=4, seed=2, validation_classes=4)  # 12 train classes
    # GRU dropout makes the run depend on torch's global generator; accumulation makes checkpoints fall mid-epoch;
    # row-sparse class prompts bring their own optimizer (per-row int64 step counts, a float64 decay clock);
    # sampled negatives (3 of the 8 classes outside a batch) draw a sample per step from a saved seed and counter.
    config = {
        "gru_dropout": 0.2,
        "class_prompt_storage": storage,
        "class_prompt_rank": 4,
        "proxy_negatives": negatives,
        **semantic,
    }
    settings = {
        "optimizer": optimizer,
        "max_grad_norm": 1.0,
        "epochs": 3,
        "classes_per_batch": 4,
        "gradient_accumulation_steps": 2,
        "checkpoint_every_steps": 2,  # steps 2 and 4 fall mid-epoch
        "keep_checkpoints": None,
        **schedule,
    }

    full_model = tiny_model(splits.num_train_classes, **config)
    full = train(full_model, splits, tiny_args(tmp_path / "full", **settings), image_processor=NORMALISATION)
    assert full.global_step == 9  # 48 images / 8 per batch = 6 batches = 3 steps per epoch

    interrupted_dir = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        train(
            tiny_model(splits.num_train_classes, **config),
            splits,
            tiny_args(interrupted_dir, **settings),
            image_processor=NORMALISATION,
            step_callback=stop_at(5),
        )
    checkpoints = interrupted_dir / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step-4"
    # A save that never finished (even one that looks complete inside) is not resumed from.
    leftover = checkpoints / "step-99.tmp"
    leftover.mkdir()
    (leftover / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(checkpoints).name == "step-4"

    # Resume into a differently initialised adapter (same backbone): everything must come from the checkpoint.
    resumed_model = tiny_model(splits.num_train_classes, adapter_seed=7, **config)
    resumed = train(
        resumed_model,
        splits,
        tiny_args(interrupted_dir, **settings, resume_from_checkpoint="latest"),
        image_processor=NORMALISATION,
    )
    assert not leftover.exists()
    assert resumed.global_step == full.global_step
    assert resumed.history == full.history
    assert resumed.metrics == full.metrics
    assert resumed.best_step == full.best_step
    for name, tensor in trainable_state(full_model).items():
        assert torch.equal(tensor, trainable_state(resumed_model)[name]), name
    assert torch.equal(semantic_state(full_model), semantic_state(resumed_model))
    # Optimizer state at a checkpoint written after the resume is identical too.
    for name in ("optimizer.safetensors", "vpdml_training_state.safetensors", "adapter_model.safetensors"):
        a = load_file(str(tmp_path / "full" / "checkpoints" / "step-8" / name))
        b = load_file(str(checkpoints / "step-8" / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), name
    for name in ("optimizer.json", "scheduler.json"):
        assert (tmp_path / "full/checkpoints/step-8" / name).read_text() == (
            checkpoints / "step-8" / name
        ).read_text()


def test_checkpoints_hold_only_safetensors_and_json(tmp_path):
    splits = layout_splits(num_classes=24, per_class=4, seed=2, validation_classes=0)
    args = tiny_args(tmp_path, epochs=1, classes_per_batch=4, checkpoint_every_steps=2, keep_checkpoints=2)
    train(tiny_model(splits.num_train_classes), splits, args, image_processor=NORMALISATION)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-6", "step-8"]  # 64 images / 8 per batch = 8 steps, every 2, the newest 2 kept
    files = {p.name for p in (tmp_path / "checkpoints" / "step-6").iterdir()}
    assert files == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",  # written by PEFT's save_pretrained
        "vpdml_training_state.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "scheduler.json",
        "rng_state_0.safetensors",
        "rng_state_0.json",
        "trainer_state.json",
    }
    state = json.loads((tmp_path / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    assert (
        state["state"]["global_step"] == 6
        and state["state"]["epoch"] == 0
        and state["state"]["batch_in_epoch"] == 6
    )
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(tmp_path / "checkpoints" / "step-5", tmp_path)
    assert resolve_checkpoint("latest", tmp_path / "elsewhere") is None  # nothing yet: start fresh


@pytest.mark.parametrize("kind", ["adamw", "fused-adamw", "sgd"])
def test_optimizer_state_round_trips_without_pickle(kind):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))]

    def make(parameters):
        groups = [{"params": parameters[:1], "weight_decay": 0.1}, {"params": parameters[1:], "lr": 0.5}]
        if kind == "sgd":
            return torch.optim.SGD(groups, lr=0.1, momentum=0.9)
        if kind == "fused-adamw":
            return fused_adamw(groups, lr=0.1, betas=(0.8, 0.9))
        return torch.optim.AdamW(groups, lr=0.1, betas=(0.8, 0.9))

    optimizer = make(params)
    for _ in range(2):
        optimizer.zero_grad()
        sum((p**2).sum() for p in params).backward()
        optimizer.step()
    tensors, rest = optimizer_state_to_tensors(optimizer.state_dict())
    json.dumps(rest)  # the non-tensor part is plain JSON
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = make(copies)
    restored.load_state_dict(
        optimizer_state_from_tensors(tensors, json.loads(json.dumps(rest)), restored.param_groups)
    )
    assert restored.param_groups[0].get("betas", ()) == optimizer.param_groups[0].get("betas", ())
    for optim, parameters in ((optimizer, params), (restored, copies)):
        optim.zero_grad()
        sum((p**3).sum() for p in parameters).backward()
        optim.step()
    for original, copy in zip(params, copies, strict=True):
        assert torch.equal(original, copy)


def test_adamw_falls_back_to_the_standard_kernel_where_the_device_has_no_fused_one(monkeypatch):
    class NoFusedKernel(torch.optim.AdamW):
        def __init__(self, params, *, fused=None, **kwargs):
            if fused:
                raise RuntimeError(
                    "`fused=True` requires all the params to be floating point Tensors of supported devices"
                )
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", NoFusedKernel)
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = fused_adamw([param], lr=0.1, weight_decay=0.0)
    assert isinstance(optimizer, NoFusedKernel) and not optimizer.defaults["fused"]
    param.sum().backward()
    optimizer.step()
    torch.testing.assert_close(param.detach(), torch.full((3,), 0.9))


def test_adamw_is_the_fused_kernel_where_the_device_has_it_with_the_same_updates():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(30, 4)), torch.nn.Parameter(torch.randn(4))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    start = [p.detach().clone() for p in params]
    fused, loop = (
        fused_adamw(params, lr=0.1, weight_decay=0.05),
        torch.optim.AdamW(copies, lr=0.1, weight_decay=0.05),
    )
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    for _ in range(5):
        for optimizer, parameters in ((fused, params), (loop, copies)):
            optimizer.zero_grad()
            sum((p**3).sum() for p in parameters).backward()
            optimizer.step()
    for got, expected, first in zip(params, copies, start, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        assert (got - first).abs().min() > 0.1  # five steps of lr 0.1 moved every entry


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------


def test_head_warm_up_trains_only_the_head_and_the_learnable_proxies(tmp_path):
    splits = layout_splits(num_classes=24, per_class=4, seed=2, validation_classes=0)
    model = tiny_model(splits.num_train_classes)
    before = trainable_state(model)
    _, transform = transforms_from_processor(NORMALISATION, 32)
    losses = warm_up_head(model, splits.train, transform, tiny_args(tmp_path, head_warmup_epochs=5))
    assert len(losses) == 5 and losses[-1] < losses[0]
    after = trainable_state(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if "vpdml_head" in name or name.endswith("learnable")}


def test_parameter_groups_give_proxies_their_own_rate_and_spare_tokens_from_decay(tmp_path):
    model = tiny_model(5, bitfit=True)
    groups = parameter_groups(model, tiny_args(tmp_path, learning_rate=1e-3, proxy_learning_rate=0.2))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay, proxies = ([names[id(p)] for p in g["params"]] for g in groups)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, 0.2]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0, 0.0]
    assert proxies == ["base_model.dml_proxies.default.learnable"]
    assert all("prompts" not in n and n.endswith("weight") for n in decay)
    assert any("vpdml_prompts" in n for n in no_decay) and any("class_prompts" in n for n in no_decay)
    assert any("vpdml_bitfit" in n for n in no_decay)


@pytest.mark.parametrize("method", ["vptsp-g", "lora"])
def test_prompt_learning_rate_moves_prompts_and_class_prompts_at_their_own_rate(tmp_path, method):
    options = {"semantic_proxies": "gru"} if method == "lora" else {"bitfit": True}
    model = build_model(tiny_vit(), method, 5, **options)
    args = tiny_args(tmp_path, learning_rate=1e-3, proxy_learning_rate=0.2, prompt_learning_rate=0.05)
    groups = parameter_groups(model, args)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, 0.2, 0.05]
    prompts = sorted(names[id(p)] for p in groups[-1]["params"])
    expected = sorted(n for n, p in model.named_parameters() if p.requires_grad and "prompts." in n)
    assert prompts == expected and any("class_prompts" in n for n in prompts)
    if method == "vptsp-g":
        assert any("vpdml_prompts" in n for n in prompts)
    # Adam's first step moves every element by its group's lr (the gradient's sign times lr, up to eps).
    optimizer = create_optimizer(model, args)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for param in model.parameters():
        param.grad = torch.ones_like(param) if param.requires_grad else None
    optimizer.step()
    moved = {
        n: (before[n] - p.detach()).abs().max().item() for n, p in model.named_parameters() if n in before
    }
    assert all(moved[n] == pytest.approx(0.05, rel=1e-3) for n in prompts)
    head = [n for n in moved if "head" in n and "proxy" not in n]
    assert head and all(moved[n] < 2e-3 for n in head)


def test_prompt_learning_rate_left_unset_keeps_the_prompts_in_the_shared_group(tmp_path):
    model = tiny_model(5)
    assert len(parameter_groups(model, tiny_args(tmp_path))) == 3  # the optimizer-state layout of older runs
    with pytest.raises(ValueError, match="prompt_learning_rate"):
        tiny_args(tmp_path, prompt_learning_rate=0.0)


def test_full_fine_tuning_trains_through_the_same_loop(tmp_path):
    splits = layout_splits(num_classes=24, per_class=4, seed=2, validation_classes=0)
    model = tiny_model(splits.num_train_classes, method="full-finetune")
    backbone_before = model.backbone.embeddings.patch_embeddings.projection.weight.detach().clone()
    result = train(
        model, splits, tiny_args(tmp_path, max_steps=3, classes_per_batch=4), image_processor=NORMALISATION
    )
    assert result.global_step == 3 and result.selected_on is None
    assert not torch.equal(backbone_before, model.backbone.embeddings.patch_embeddings.projection.weight)
    assert (tmp_path / "backbone" / "config.json").is_file() and (tmp_path / "metrics.json").is_file()
    assert not (tmp_path / "README.md").exists()  # model cards describe adapters
    again = vpdml.FullFineTuningDML.from_pretrained(tmp_path)
    _, transform = transforms_from_processor(NORMALISATION, 32)
    assert evaluate_splits(again, splits.eval_sets("test"), transform, show_progress=False) == {
        "test": result.metrics["trained"]["test"]
    }


def test_push_to_hub_uploads_the_release_folder_without_the_token(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        vpdml.hub, "push_adapter_to_hub", lambda *args, **kwargs: calls.append((args, kwargs)) or "url"
    )
    splits = layout_splits(num_classes=24, per_class=4, seed=2, validation_classes=0)
    token = "hf_" + "x" * 34
    args = tiny_args(tmp_path, max_steps=1, classes_per_batch=4, push_to_hub="me/tiny-vptsp", hub_token=token)
    result = train(tiny_model(16), splits, args, image_processor=NORMALISATION)
    assert result.hub_url == "url"
    assert calls == [((tmp_path, "me/tiny-vptsp"), {"token": token, "private": False})]
    assert "me/tiny-vptsp" in (tmp_path / "README.md").read_text()
    for name in ("README.md", "metrics.json", "adapter_config.json"):
        assert token not in (tmp_path / name).read_text()


def test_bad_settings_fail_early_with_clear_messages(tmp_path):
    with pytest.raises(ValueError, match="learning_rate must be a positive number"):
        tiny_args(tmp_path, learning_rate=0)
    with pytest.raises(ValueError, match="method must be one of"):
        tiny_args(tmp_path, method="prefix-tuning")
    with pytest.raises(ValueError, match="add its K to recall_at"):
        tiny_args(tmp_path, select_metric="recall@3")
    with pytest.raises(ValueError, match="unknown tracker"):
        tiny_args(tmp_path, report_to="neptune")
    splits = layout_splits(num_classes=24, per_class=4, seed=2, validation_classes=0)
    with pytest.raises(ValueError, match="proxies for 7 classes but the training split has 16"):
        train(tiny_model(7), splits, tiny_args(tmp_path), image_processor=NORMALISATION)
    with pytest.raises(ValueError, match="no validation split"):
        train(
            tiny_model(16), splits, tiny_args(tmp_path, select_on="validation"), image_processor=NORMALISATION
        )
    with pytest.raises(ValueError, match="Unknown method"):
        build_model(tiny_vit(), "prefix-tuning", 3)
    with pytest.raises(ValueError, match="full-finetune does not take"):
        build_model(tiny_vit(), "full-finetune", 3, num_prompts=3)


def test_gradient_checkpointing_and_compiled_blocks_train_like_the_plain_loop(tmp_path, monkeypatch):
    """The memory/speed options change how a step runs, not what it computes."""
    import vpdml.modules.backbones
    import vpdml.training.trainer

    compiled: list[int] = []

    def compile_eagerly(backbone):  # the wiring, without inductor's minute of C++ compilation per test
        compiled.append(vpdml.modules.backbones.compile_blocks(backbone, backend="eager"))
        return compiled[-1]

    monkeypatch.setattr(vpdml.training.trainer, "compile_blocks", compile_eagerly)
    splits = layout_splits(num_classes=24, per_class=4, seed=2, validation_classes=0)
    states = {}
    for name, options in {
        "plain": {},
        "checkpointing": {"gradient_checkpointing": True},
        "compiled": {"torch_compile": True},
    }.items():
        model = tiny_model(splits.num_train_classes, num_prompts=2, class_prompts=2)
        args = tiny_args(tmp_path / name, max_steps=3, classes_per_batch=4, eval_every_epochs=0, **options)
        train(model, splits, args, image_processor=NORMALISATION)
        states[name] = trainable_state(model)
        if name == "checkpointing":
            backbone = model.base_model.model
            assert (
                getattr(backbone, "is_activation_checkpointing", None) or backbone.is_gradient_checkpointing
            )
    assert compiled == [2]
    for name in ("checkpointing", "compiled"):
        assert states[name].keys() == states["plain"].keys()
        for key, value in states["plain"].items():
            torch.testing.assert_close(states[name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    initial = trainable_state(tiny_model(splits.num_train_classes, num_prompts=2, class_prompts=2))
    assert not torch.equal(
        states["plain"]["base_model.vpdml_prompts.default.prompts.layer_0"],
        initial["base_model.vpdml_prompts.default.prompts.layer_0"],
    )
