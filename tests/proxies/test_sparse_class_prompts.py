"""Row-sparse and low-rank class-prompt storage and the row-sparse optimizers, against dense references."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file

import vpdml
from helpers.models import tiny_vit, train_in_lockstep
from vpdml import VisualPromptDMLConfig
from vpdml.modules.row_sparse import (
    RowSparseAdamW,
    RowSparseSGD,
    clip_grad_norm_,
    gather_rows,
    has_row_sparse_parameters,
    row_sparse_parameters,
)
from vpdml.proxies.class_prompts import (
    AUTO_SPARSE_MIN_ELEMENTS,
    ClassPromptTable,
    LowRankClassPromptTable,
    RowSparseClassPromptTable,
    build_class_prompt_table,
    resolve_class_prompt_storage,
)
from vpdml.tuner.state import TRAINING_STATE_FILE

COUNTS = [2, 0, 1]  # tokens per layer: 3 rows of width 4 per class, one layer without class prompts
HIDDEN = 4


def _tables(num_classes: int = 5) -> tuple[ClassPromptTable, RowSparseClassPromptTable]:
    torch.manual_seed(0)
    dense = ClassPromptTable(num_classes, COUNTS, HIDDEN)
    sparse = RowSparseClassPromptTable(num_classes, COUNTS, HIDDEN)
    sparse.weight.data.copy_(dense.weight.data)
    return dense, sparse


def _branch_loss(table: torch.nn.Module, head: torch.nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """A tiny non-linear stand-in for the proxy pass: gather, mix the tokens, a head, a loss."""
    tokens = torch.cat([p for p in table.gather(labels) if p is not None], dim=1)  # (B, 3, D)
    return (head(tokens).tanh() ** 2).mean() + tokens.pow(3).mean()


def _twin_heads() -> tuple[torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(1)
    head, twin = torch.nn.Linear(HIDDEN, 3), torch.nn.Linear(HIDDEN, 3)
    twin.load_state_dict(head.state_dict())
    return head, twin


# ------------------------------------------------------------------------------------------------ gathering
def test_sparse_gather_has_the_dense_values_and_a_row_sparse_gradient():
    dense, sparse = _tables()
    labels = torch.tensor([3, 1, 3, 0])
    for table, head in zip((dense, sparse), _twin_heads(), strict=True):
        _branch_loss(table, head, labels).backward()
    assert sparse.weight.grad.is_sparse and dense.weight.grad.layout == torch.strided
    assert sparse.weight.grad.coalesce().indices()[0].tolist() == [0, 1, 3]  # the batch's classes, once each
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad, rtol=0, atol=1e-7)
    per_layer = sparse.gather(labels)
    assert (
        per_layer[1] is None and per_layer[0].shape == (4, 2, HIDDEN) and per_layer[2].shape == (4, 1, HIDDEN)
    )
    torch.testing.assert_close(per_layer[2], dense.weight[labels, 2:3])


def test_gather_rows_moves_only_the_requested_rows():
    weight = torch.nn.Parameter(torch.arange(12.0).view(4, 3))
    rows = gather_rows(weight, torch.tensor([2, 0]))
    assert rows.tolist() == [[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]]
    (rows * torch.tensor([[1.0], [2.0]])).sum().backward()
    assert weight.grad.to_dense().tolist() == [[2.0] * 3, [0.0] * 3, [1.0] * 3, [0.0] * 3]


def test_low_rank_table_is_code_times_basis_with_sparse_codes_and_dense_basis():
    torch.manual_seed(0)
    table = LowRankClassPromptTable(6, COUNTS, HIDDEN, rank=2)
    labels = torch.tensor([5, 2, 5])
    per_layer = table.gather(labels)
    full = (table.codes @ table.basis.flatten(1)).view(6, 3, HIDDEN)
    torch.testing.assert_close(per_layer[0], full[labels, :2])
    torch.testing.assert_close(per_layer[2], full[labels, 2:])
    _branch_loss(table, torch.nn.Linear(HIDDEN, 3), labels).backward()
    assert table.codes.grad.is_sparse and table.codes.grad.coalesce().indices()[0].tolist() == [2, 5]
    assert not table.basis.grad.is_sparse and table.basis.grad.abs().sum() > 0
    assert row_sparse_parameters(table) == [table.codes]


def test_low_rank_init_has_the_dense_tables_scale():
    torch.manual_seed(0)
    table = LowRankClassPromptTable(2000, [5] * 4, 64, rank=32)
    prompts = (table.codes @ table.basis.flatten(1)).std().item()
    expected = math.sqrt(2.0 / (20 + 64))  # xavier-normal over (tokens, hidden), as the dense table
    assert abs(prompts - expected) / expected < 0.05


# ---------------------------------------------------------------------------------- optimizers vs dense ones
def _run_every_row_touched(make_dense, make_sparse, steps: int = 6):
    """Train a dense and a sparse table (plus a dense head each) on batches that hold every class."""
    dense, sparse = _tables()
    head, twin = _twin_heads()
    dense_opt = make_dense([*dense.parameters(), *head.parameters()])
    sparse_opt = make_sparse([*sparse.parameters(), *twin.parameters()])
    generator = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        labels = torch.cat(
            [torch.randperm(5, generator=generator), torch.randint(0, 5, (3,), generator=generator)]
        )
        for optimizer in (dense_opt, sparse_opt):
            optimizer.zero_grad()
        dense_loss, sparse_loss = _branch_loss(dense, head, labels), _branch_loss(sparse, twin, labels)
        dense_loss.backward()
        sparse_loss.backward()
        losses.append((dense_loss.item(), sparse_loss.item()))
        dense_opt.step()
        sparse_opt.step()
    return dense, sparse, head, twin, losses


@pytest.mark.parametrize(
    ("name", "make_dense", "make_sparse"),
    [
        (
            "adamw",
            lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
            lambda p: RowSparseAdamW(p, lr=0.05, weight_decay=0.1),
        ),
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.5), lambda p: RowSparseSGD(p, lr=0.5)),
        (
            "sgd-momentum-decay",
            lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=0.01),
            lambda p: RowSparseSGD(p, lr=0.5, momentum=0.9, weight_decay=0.01),
        ),
        (
            "sgd-nesterov",
            lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.8, nesterov=True),
            lambda p: RowSparseSGD(p, lr=0.5, momentum=0.8, nesterov=True),
        ),
    ],
)
def test_rows_touched_every_step_follow_the_dense_optimizer(name, make_dense, make_sparse):
    dense, sparse, head, twin, losses = _run_every_row_touched(make_dense, make_sparse)
    for dense_loss, sparse_loss in losses:
        assert abs(dense_loss - sparse_loss) <= 1e-6
    assert (dense.weight - sparse.weight).abs().max() <= 1e-6
    assert (dense.weight.detach() - _tables()[0].weight).abs().max() > 1e-2  # it did train
    for a, b in zip(head.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)  # dense parameters go through torch's own update


def _intermittent_batches() -> list[list[int]]:
    # class 4 is never seen; 2 only at steps 1 and 4; 0 and 1 at every step; 3 at 0, 2 and 4
    return [[0, 1, 3], [1, 0, 2, 2], [0, 3, 1], [1, 0], [2, 0, 1, 3, 3]]


def _train_intermittently(table: torch.nn.Module, optimizer, lrs: list[float]) -> list[torch.Tensor]:
    """Train on the first ``len(lrs)`` :func:`_intermittent_batches` with a per-step lr; returns each step's (dense)
    table gradient."""
    grads = []
    for lr, labels in zip(lrs, _intermittent_batches(), strict=False):
        for group in optimizer.param_groups:
            group["lr"] = lr  # a schedule: the decay clock must use each step's own lr
        optimizer.zero_grad()
        rows = table.gather(torch.tensor(labels))
        (torch.cat([r for r in rows if r is not None], 1).sin().sum()).backward()
        grad = table.weight.grad
        grads.append(grad.coalesce().to_dense() if grad.is_sparse else grad.clone())
        optimizer.step()
    return grads


def _train_sparse_intermittently(optimizer_factory, lrs: list[float]):
    _, table = _tables()
    start = table.weight.detach().clone()
    optimizer = optimizer_factory([table.weight])
    grads = _train_intermittently(table, optimizer, lrs)
    return start, table.weight.detach(), grads


def test_adamw_on_intermittent_rows_is_lazy_adam_with_global_decay_clock():
    """Hand-written reference: per row, Adam over its own gradients (its own step count); decoupled decay
    multiplied in for every optimizer step, applied when the row is next touched."""
    lrs, betas, eps, wd = [0.1, 0.08, 0.06, 0.04, 0.02], (0.9, 0.99), 1e-8, 0.5
    start, trained, grads = _train_sparse_intermittently(
        lambda p: RowSparseAdamW(p, lr=lrs[0], betas=betas, eps=eps, weight_decay=wd), lrs
    )
    expected = start.clone()
    for row in range(5):
        w, m, v, t, pending = start[row].clone(), 0.0, 0.0, 0, 1.0
        for step, labels in enumerate(_intermittent_batches()):
            pending *= 1 - lrs[step] * wd
            if row not in labels:
                continue
            g = grads[step][row]
            t += 1
            w, pending = w * pending, 1.0
            m = betas[0] * m + (1 - betas[0]) * g
            v = betas[1] * v + (1 - betas[1]) * g * g
            m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
            w = w - lrs[step] * m_hat / (v_hat.sqrt() + eps)
        expected[row] = w
    torch.testing.assert_close(trained, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(trained[4], start[4])  # never touched: pending decay, not applied yet


def test_plain_sgd_matches_dense_sgd_on_intermittent_rows():
    """Without momentum or decay an untouched row does not move in dense SGD either: exact for any batches."""
    lrs = [0.5, 0.4, 0.3, 0.2, 0.1]
    dense, sparse = _tables()
    _train_intermittently(dense, torch.optim.SGD([dense.weight], lr=0.5), lrs)
    _train_intermittently(sparse, RowSparseSGD([sparse.weight], lr=0.5), lrs)
    assert torch.equal(sparse.weight, dense.weight)


def test_sgd_decay_of_skipped_steps_is_caught_up_at_the_next_touch():
    """Hand-written reference: a row skipped at steps k gets prod(1 - lr_k * wd) when next touched (in that step's
    update, so that step's forward saw it undecayed); rows never touched keep it pending."""
    lrs, wd = [0.5, 0.4, 0.3, 0.2, 0.1], 0.2
    _, sparse = _tables()
    start = sparse.weight.detach().clone()
    optimizer = RowSparseSGD([sparse.weight], lr=0.5, weight_decay=wd)
    grads = _train_intermittently(sparse, optimizer, lrs)
    expected = start.clone()
    for row in range(5):
        w, pending = start[row].clone(), 1.0
        for step, labels in enumerate(_intermittent_batches()):
            if row not in labels:
                pending *= 1 - lrs[step] * wd
                continue
            w, pending = w * pending, 1.0
            w = w - lrs[step] * (grads[step][row] + wd * w)
        expected[row] = w
    torch.testing.assert_close(sparse.weight.detach(), expected, rtol=0, atol=1e-6)
    state = optimizer.state[sparse.weight]
    pending = torch.exp(state["decay_clock"] - state["decay_mark"])
    assert abs(pending[4].item() - math.prod(1 - lr * wd for lr in lrs)) < 1e-12  # never touched: all pending
    assert pending[0].item() == 1.0  # touched at the last step: nothing pending


def test_sgd_momentum_on_intermittent_rows_is_lazy_momentum():
    lrs, mu, wd = [0.5, 0.4, 0.3, 0.2, 0.1], 0.9, 0.1
    start, trained, grads = _train_sparse_intermittently(
        lambda p: RowSparseSGD(p, lr=lrs[0], momentum=mu, weight_decay=wd), lrs
    )
    expected = start.clone()
    for row in range(5):
        w, buffer, pending = start[row].clone(), None, 1.0
        for step, labels in enumerate(_intermittent_batches()):
            if row not in labels:
                pending *= 1 - lrs[step] * wd
                continue
            w, pending = w * pending, 1.0
            g = grads[step][row] + wd * w
            buffer = g if buffer is None else mu * buffer + g
            w = w - lrs[step] * buffer
        expected[row] = w
    torch.testing.assert_close(trained, expected, rtol=0, atol=1e-6)


def test_torch_sparse_adam_gets_late_rows_wrong_and_row_sparse_adamw_does_not():
    """Why a new optimizer: SparseAdam counts steps per tensor, so a row first seen at step 2000 gets a first
    update of about 3 * lr instead of Adam's lr (at step 50, 0.7 * lr), and SparseAdam has no weight decay."""
    first_updates = {}
    for name, factory in {
        "torch.SparseAdam": lambda p: torch.optim.SparseAdam(p, lr=0.01),
        "RowSparseAdamW": lambda p: RowSparseAdamW(p, lr=0.01, weight_decay=0.0),
    }.items():
        weight = torch.nn.Parameter(torch.zeros(2, 3))
        optimizer = factory([weight])
        for step in range(2001):
            optimizer.zero_grad()
            row = torch.tensor([1 if step == 2000 else 0])
            gather_rows(weight, row).sum().backward()
            optimizer.step()
        first_updates[name] = -weight[1].detach()
    torch.testing.assert_close(first_updates["RowSparseAdamW"], torch.full((3,), 0.01))
    assert first_updates["torch.SparseAdam"].min() > 2.5 * 0.01


# ------------------------------------------------------------------------------------ clipping, state, loading
def test_clip_grad_norm_handles_sparse_gradients_like_torch_on_dense_ones():
    dense, sparse = _tables()
    head, twin = _twin_heads()
    labels = torch.tensor([4, 4, 1])
    _branch_loss(dense, head, labels).backward()
    _branch_loss(sparse, twin, labels).backward()
    dense_norm = torch.nn.utils.clip_grad_norm_([*dense.parameters(), *head.parameters()], 0.01)
    sparse_norm = clip_grad_norm_([*sparse.parameters(), *twin.parameters()], 0.01)
    torch.testing.assert_close(sparse_norm, dense_norm)
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)
    torch.testing.assert_close(twin.weight.grad, head.weight.grad)
    assert dense_norm > 0.01  # clipping happened


def test_optimizer_state_survives_safetensors_and_training_resumes_exactly(tmp_path):
    lrs = [0.05] * 5
    _, reference = _tables()
    reference_opt = RowSparseAdamW([reference.weight], lr=0.05, weight_decay=0.3)
    _train_intermittently(reference, reference_opt, lrs)

    _, first = _tables()
    first_opt = RowSparseAdamW([first.weight], lr=0.05, weight_decay=0.3)
    _train_intermittently(first, first_opt, lrs[:3])  # interrupted after 3 of the 5 batches
    # What a checkpoint does: every state tensor into safetensors, the param groups aside (plain numbers).
    saved = first_opt.state_dict()
    tensors = {
        f"{index}.{key}": value for index, entries in saved["state"].items() for key, value in entries.items()
    }
    assert {t.dtype for t in tensors.values()} == {torch.float32, torch.int64, torch.float64}
    path = tmp_path / "state.safetensors"
    save_file({**tensors, "weight": first.weight.detach().clone()}, str(path))

    _, resumed = _tables()
    resumed_opt = RowSparseAdamW([resumed.weight], lr=0.05, weight_decay=0.3)
    loaded = load_file(str(path))
    with torch.no_grad():
        resumed.weight.copy_(loaded.pop("weight"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in loaded.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    resumed_opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    state = resumed_opt.state[resumed.weight]
    assert state["row_step"].dtype == torch.int64 and state["row_step"].tolist() == [3, 3, 1, 2, 0]
    assert state["decay_clock"].dtype == torch.float64
    for labels in _intermittent_batches()[3:]:
        resumed_opt.zero_grad()
        rows = resumed.gather(torch.tensor(labels))
        (torch.cat([r for r in rows if r is not None], 1).sin().sum()).backward()
        resumed_opt.step()
    assert torch.equal(resumed.weight, reference.weight)


# ------------------------------------------------------------------------------------------- through the model
def _model(storage: str, **overrides):
    config = VisualPromptDMLConfig.for_method(
        "vptsp-g",
        num_prompts=2,
        class_prompts=2,
        embedding_dim=8,
        class_prompt_storage=storage,
        **{"num_classes": 2, **overrides},
    )
    return get_peft_model(tiny_vit(0), config)


def test_sparse_storage_gives_the_dense_models_losses_and_updates(pixels):
    labels = torch.tensor([0, 0, 1, 1])  # every class in every batch: sparse must equal dense
    models = {storage: _model(storage) for storage in ("dense", "sparse")}
    assert not has_row_sparse_parameters(models["dense"]) and has_row_sparse_parameters(models["sparse"])
    for losses in train_in_lockstep(models, pixels, labels):
        assert abs(losses["dense"] - losses["sparse"]) <= 1e-6
    dense_state = models["dense"].base_model.dml_proxies["default"].state_dict()
    sparse_state = models["sparse"].base_model.dml_proxies["default"].state_dict()
    # the same layout: a dense run's training state loads into a sparse one
    assert dense_state.keys() == sparse_state.keys()
    for key, value in dense_state.items():  # proxies, class prompts, proxy head, GRU, semantic state
        torch.testing.assert_close(sparse_state[key], value, rtol=0, atol=1e-6, msg=key)
    trained = dict(models["sparse"].named_parameters())
    for name, value in models["dense"].named_parameters():  # prompts, head, BitFit offsets too
        if value.requires_grad:
            torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-6, msg=name)


def test_training_state_round_trips_for_sparse_and_low_rank(tmp_path, pixels, labels):
    for storage in ("sparse", "low_rank"):
        model = _model(storage, num_classes=4, class_prompt_rank=3)
        model.train()
        model.dml_loss(pixels, labels).backward()
        vpdml.save_training_state(model, tmp_path / storage)
        other = _model(storage, num_classes=4, class_prompt_rank=3)
        vpdml.load_training_state(other, tmp_path / storage)
        bank, other_bank = model.base_model.dml_proxies["default"], other.base_model.dml_proxies["default"]
        for key, value in bank.state_dict().items():
            assert torch.equal(value, other_bank.state_dict()[key]), key
    saved = load_file(str(tmp_path / "low_rank" / TRAINING_STATE_FILE))
    assert saved["class_prompts.codes"].shape == (4, 3)
    with pytest.raises(ValueError, match="class_prompt_storage"):
        vpdml.load_training_state(_model("sparse", num_classes=4), tmp_path / "low_rank")


def test_offloaded_table_stays_in_host_memory_and_keeps_parameter_order():
    torch.manual_seed(0)
    table = LowRankClassPromptTable(4, COUNTS, HIDDEN, rank=2, offload=True)
    names = [name for name, _ in table.named_parameters()]
    table.to(torch.float64)
    assert [name for name, _ in table.named_parameters()] == names
    assert table.codes.dtype == torch.float32 and table.basis.dtype == torch.float64
    sparse = RowSparseClassPromptTable(4, COUNTS, HIDDEN, offload=True).double()
    assert sparse.weight.dtype == torch.float32
    assert RowSparseClassPromptTable(4, COUNTS, HIDDEN).double().weight.dtype == torch.float64


# ------------------------------------------------------------------------------------------------- config
def test_auto_storage_is_dense_for_cub_and_cars_and_sparse_for_sop_and_inshop():
    def auto(classes: int, tokens: int, offload: bool = False) -> str:
        return resolve_class_prompt_storage(
            "auto", num_classes=classes, tokens=tokens, hidden_size=384, offload=offload
        )

    assert auto(100, 3 * 12) == "dense"  # CUB ViT-S: 1.4M elements
    assert auto(98, 50 * 8) == "dense"  # Cars ViT-S: 15M
    assert auto(11_318, 5 * 12) == "sparse"  # SOP ViT-S: 261M
    assert auto(3_997, 80 * 12) == "sparse"  # In-Shop ViT-S: 1.47B
    assert auto(100, 3, offload=True) == "sparse"
    assert AUTO_SPARSE_MIN_ELEMENTS == 2**25
    assert isinstance(
        build_class_prompt_table("auto", num_classes=3, counts=[1], hidden_size=2), ClassPromptTable
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"class_prompt_storage": "csr"}, r"class_prompt_storage must be one of 'auto', 'dense', 'sparse'"),
        ({"class_prompt_rank": 0}, r"class_prompt_rank must be an integer >= 1"),
        ({"class_prompt_offload": 1}, r"class_prompt_offload must be True or False"),
        (
            {"class_prompt_storage": "dense", "class_prompt_offload": True},
            r"needs a row-sparse class-prompt table",
        ),
    ],
)
def test_storage_config_is_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        VisualPromptDMLConfig(num_classes=3, **overrides)


def test_optimizer_rejects_a_layout_change_and_impossible_decay():
    weight = torch.nn.Parameter(torch.zeros(3, 2))
    optimizer = RowSparseAdamW([weight], lr=0.1)
    gather_rows(weight, torch.tensor([1])).sum().backward()
    optimizer.step()
    weight.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="received a dense gradient"):
        optimizer.step()
    weight.grad = None
    gather_rows(weight, torch.tensor([0])).sum().backward()
    optimizer.param_groups[0]["weight_decay"] = 20.0
    with pytest.raises(ValueError, match="lr \\* weight_decay must be < 1"):
        optimizer.step()
