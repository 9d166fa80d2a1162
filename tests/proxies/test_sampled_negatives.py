"""Sampled negative proxies (``proxy_negatives``): an unbiased Proxy Anchor estimate with row-sparse proxies.

What must hold: the sample is the batch's classes plus uniform draws from the other classes (never a batch class);
the reweighted loss and its gradients average to the exact loss and gradients; a sample that covers every class
*is* the exact loss and trains exactly like the dense model; a sampled step touches only the sampled rows of the
learnable proxies and reads only those rows of the state; the sample sequence is a function of the seed and the
step (so processes agree and resumes repeat it).
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

import vpdml
from helpers.models import tiny_vit, train_in_lockstep
from vpdml import VisualPromptDMLConfig, proxy_anchor_loss
from vpdml.modules.row_sparse import has_row_sparse_parameters
from vpdml.proxies.bank import ProxyBank
from vpdml.proxies.negatives import sample_negative_classes
from vpdml.training import build_model
from vpdml.tuner.state import TRAINING_STATE_FILE

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------ the sample
def test_sample_holds_the_batch_classes_and_uniform_draws_from_the_others():
    batch = torch.tensor([7, 2, 2, 11, 0])
    num_classes, draws, trials = 15, 4, 3000
    others = num_classes - 4  # classes 0, 2, 7, 11 are in the batch
    generator = torch.Generator().manual_seed(0)
    frequency = torch.zeros(num_classes)
    for _ in range(trials):
        classes, weights = sample_negative_classes(batch, num_classes, draws, generator)
        assert torch.equal(classes, classes.unique())  # sorted and distinct
        in_batch = torch.isin(classes, batch)
        assert in_batch.sum() == 4 and torch.all(weights[in_batch] == 1)
        # each draw of another class carries (C - U) / draws: their weights add up to the C - U classes replaced
        assert weights[~in_batch].sum().item() == pytest.approx(others)
        frequency[classes[~in_batch]] += weights[~in_batch] * draws / others  # = number of times drawn
    assert torch.all(frequency[batch.unique()] == 0)
    drawn = frequency[~torch.isin(torch.arange(num_classes), batch)]
    expected = trials * draws / others  # ~1091 per class; a binomial's sd is ~31
    assert drawn.sum() == trials * draws
    assert torch.all((drawn - expected).abs() < 5 * expected**0.5), drawn


def test_sample_is_none_when_the_draws_cover_the_other_classes():
    generator = torch.Generator().manual_seed(0)
    assert sample_negative_classes(torch.tensor([0, 1]), 6, 4, generator) is None
    assert sample_negative_classes(torch.tensor([0, 1]), 6, 40, generator) is None
    assert sample_negative_classes(torch.tensor([0, 1]), 6, 3, generator) is not None


# ------------------------------------------------------------------------------------------------- the loss
def _problem(seed: int = 0, num_classes: int = 40):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(12, 8, generator=generator, dtype=torch.float64)
    labels = torch.tensor([3, 3, 3, 9, 9, 9, 17, 17, 17, 30, 30, 30])
    # proxies near some samples, so that negative terms differ a lot between classes
    proxies = torch.randn(num_classes, 8, generator=generator, dtype=torch.float64)
    proxies[:12] += 2 * embeddings
    return embeddings, labels, proxies


def _sampled_loss(embeddings, labels, proxies, draws, generator, **settings):
    classes, weights = sample_negative_classes(labels, proxies.shape[0], draws, generator)
    return proxy_anchor_loss(
        embeddings,
        labels,
        proxies[classes],
        proxy_classes=classes,
        negative_weights=weights,
        num_classes=proxies.shape[0],
        **settings,
    )


@pytest.mark.parametrize("positive_average", ["classes_with_positives", "all_classes"])
def test_sampled_loss_and_gradients_are_unbiased(positive_average):
    embeddings, labels, proxies = _problem()
    settings = {"scale": 16.0, "margin": 0.1, "positive_average": positive_average}
    embeddings.requires_grad_(True)
    exact = proxy_anchor_loss(embeddings, labels, proxies, **settings)
    (exact_grad,) = torch.autograd.grad(exact, embeddings)
    generator = torch.Generator().manual_seed(1)
    losses, grads = [], []
    for _ in range(4000):
        loss = _sampled_loss(embeddings, labels, proxies, 5, generator, **settings)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, embeddings)[0])
    losses, grads = torch.stack(losses), torch.stack(grads)
    assert losses.std() > 1e-3  # the estimate does vary: the check below is not trivially met
    standard_error = losses.std() / len(losses) ** 0.5
    assert abs(losses.mean() - exact) < 4 * standard_error
    grad_error = grads.std(0) / len(grads) ** 0.5 + 1e-12
    assert ((grads.mean(0) - exact_grad).abs() / grad_error).max() < 5  # every coordinate within 5 SE


def test_sample_of_every_class_is_the_exact_loss():
    embeddings, labels, proxies = _problem()
    classes = torch.arange(proxies.shape[0])
    exact = proxy_anchor_loss(embeddings, labels, proxies)
    sampled = proxy_anchor_loss(
        embeddings, labels, proxies, proxy_classes=classes, negative_weights=torch.ones(len(classes))
    )
    torch.testing.assert_close(sampled, exact, rtol=0, atol=1e-12)


def test_sampled_loss_needs_every_labels_proxy():
    embeddings, labels, proxies = _problem()
    classes = torch.tensor([3, 9, 17])  # class 30 missing
    with pytest.raises(ValueError, match=r"must contain every label.*\[30\]"):
        proxy_anchor_loss(embeddings, labels, proxies[classes], proxy_classes=classes, num_classes=40)
    with pytest.raises(ValueError, match=r"Labels must lie in \[0, 19\]"):
        proxy_anchor_loss(embeddings, labels, proxies[:20], num_classes=20)


# ------------------------------------------------------------------------------------------- through the model
def _model(num_classes: int, negatives: int | None, **overrides):
    config = VisualPromptDMLConfig.for_method(
        "vptsp-g",
        num_prompts=2,
        class_prompts=2,
        embedding_dim=8,
        num_classes=num_classes,
        proxy_negatives=negatives,
        **overrides,
    )
    return get_peft_model(tiny_vit(0), config)


def _bank(model) -> ProxyBank:
    return model.base_model.dml_proxies["default"]


def test_negatives_covering_every_class_train_exactly_like_the_full_loss(pixels, labels):
    """Every row sampled at every step: the row-sparse proxies must follow dense AdamW to float rounding."""
    models = {"full": _model(6, None), "sampled": _model(6, 100)}
    assert has_row_sparse_parameters(models["sampled"]) and not has_row_sparse_parameters(models["full"])
    for losses in train_in_lockstep(models, pixels, labels):
        assert _bank(models["sampled"]).learnable.grad.is_sparse
        assert abs(losses["full"] - losses["sampled"]) <= 1e-6
    sampled = dict(models["sampled"].named_parameters())
    for name, value in models["full"].named_parameters():
        if value.requires_grad:
            torch.testing.assert_close(sampled[name], value, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(_bank(models["sampled"]).semantic_state, _bank(models["full"]).semantic_state)


def test_a_sampled_step_touches_only_the_batch_and_the_sampled_rows(pixels, labels):
    model = _model(500, 5, class_prompt_storage="sparse")
    bank = _bank(model)
    model.train()
    state_before = bank.semantic_state.clone()
    outputs = model.dml_loss(pixels, labels, return_outputs=True)
    outputs.loss.backward()
    sampled = outputs.proxy_classes
    assert outputs.proxies.shape == (len(sampled), 8)
    assert set(labels.tolist()) <= set(sampled.tolist()) and len(sampled) <= 2 + 5
    grad = bank.learnable.grad
    assert grad.is_sparse and set(grad.coalesce().indices()[0].tolist()) == set(sampled.tolist())
    changed = (bank.semantic_state != state_before).any(-1).nonzero().flatten()
    assert set(changed.tolist()) == set(labels.tolist())  # the state moves for the batch's classes only
    assert bank.class_prompts.weight.grad.is_sparse


def test_the_sample_is_a_function_of_seed_and_step_and_resumes(tmp_path, pixels, labels):
    model, twin = _model(200, 4), _model(200, 4)  # tiny_vit seeds 0: both adapters see initial seed 0
    model.train(), twin.train()
    first = [model.dml_loss(pixels, labels, return_outputs=True).proxy_classes for _ in range(3)]
    assert not all(torch.equal(first[0], other) for other in first[1:])  # a fresh sample every step
    for expected in first:  # another model built from the same seed draws the same samples
        assert torch.equal(twin.dml_loss(pixels, labels, return_outputs=True).proxy_classes, expected)
    model.eval()  # evaluation does not consume a step
    steps = int(_bank(model).negative_sampling[1])
    model.dml_loss(pixels, labels)
    assert int(_bank(model).negative_sampling[1]) == steps == 3
    model.train()
    vpdml.save_training_state(model, tmp_path)
    assert load_file(str(tmp_path / TRAINING_STATE_FILE))["negative_sampling"].tolist()[1] == 3
    resumed = _model(200, 4)
    vpdml.load_training_state(resumed, tmp_path)
    resumed.train()
    assert torch.equal(
        resumed.dml_loss(pixels, labels, return_outputs=True).proxy_classes,
        model.dml_loss(pixels, labels, return_outputs=True).proxy_classes,
    )


def test_full_fine_tuning_and_head_warm_up_take_sampled_negatives(pixels, labels):
    torch.manual_seed(0)
    model = build_model(tiny_vit(0), "full-finetune", 300, proxy_negatives=6, embedding_dim=8)
    model.train()
    loss = model.dml_loss(pixels, labels)
    loss.backward()
    assert model.proxies.learnable.grad.is_sparse
    assert model.proxies.learnable.grad.coalesce().indices().shape[1] <= 2 + 6
    # the warm-up's proxies alone: a sample too
    proxies = model.proxies.loss_proxies(labels, learnable_only=True)
    assert proxies.classes is not None and len(proxies.classes) <= 8
    torch.testing.assert_close(proxies.proxies.norm(dim=-1), torch.ones(len(proxies.classes)))


@pytest.mark.parametrize(
    ("value", "message"), [(0, "proxy_negatives"), (True, "proxy_negatives"), (2.5, "integer")]
)
def test_proxy_negatives_is_validated(value, message):
    with pytest.raises(ValueError, match=message):
        VisualPromptDMLConfig.for_method("vptsp-g", num_classes=5, proxy_negatives=value)


def test_offloaded_proxies_stay_in_host_memory_and_train_like_the_others(pixels, labels):
    models = {"on device": _model(300, 6), "offloaded": _model(300, 6, proxy_offload=True)}
    assert [n for n, _ in models["on device"].named_parameters()] == [
        n for n, _ in models["offloaded"].named_parameters()
    ]  # registration order kept: optimizer state is matched by position
    for losses in train_in_lockstep(models, pixels, labels):
        assert losses["on device"] == losses["offloaded"]
    for key, value in _bank(models["on device"]).state_dict().items():
        assert torch.equal(_bank(models["offloaded"]).state_dict()[key], value), key
    # A move (here a dtype change; on a GPU, .cuda()) leaves the proxies and the state where they are, in fp32.
    bank = _bank(models["offloaded"])
    learnable, state = bank.learnable, bank.semantic_state
    models["offloaded"].double()
    assert bank.learnable is learnable and bank.learnable.dtype == torch.float32
    assert bank.semantic_state is state and bank.semantic_state.dtype == torch.float32
    assert bank.proxy_head.proj.weight.dtype == torch.float64  # the rest of the bank moves as usual
    assert bank.negative_sampling.dtype == torch.long


def test_proxy_offload_needs_sampled_negatives():
    with pytest.raises(ValueError, match="proxy_offload=True needs proxy_negatives"):
        VisualPromptDMLConfig.for_method("vptsp-g", num_classes=5, proxy_offload=True)
    with pytest.raises(ValueError, match="proxy_offload must be True or False"):
        VisualPromptDMLConfig.for_method("vptsp-g", num_classes=5, proxy_negatives=2, proxy_offload="yes")
    with pytest.raises(ValueError, match="proxy_offload needs proxy_negatives"):
        build_model(tiny_vit(0), "full-finetune", 10, proxy_offload=True)
