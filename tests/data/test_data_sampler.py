"""ClassBalancedBatchSampler: balance, determinism, exact resume and multi-process sharding."""

from __future__ import annotations

import warnings
from itertools import islice

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, prepare_data_loader
from torch.utils.data import DataLoader, TensorDataset

from vpdml.data.sampler import ClassBalancedBatchSampler


def shuffled_labels(num_classes: int = 12, per_class: int = 7, seed: int = 0) -> np.ndarray:
    """Labels with non-contiguous ids (multiples of 5 plus 3), in random order."""
    labels = np.repeat(np.arange(num_classes) * 5 + 3, per_class)
    return np.random.default_rng(seed).permutation(labels)


LABELS = shuffled_labels()  # 84 rows


def epoch_batches(sampler: ClassBalancedBatchSampler) -> list[list[int]]:
    return list(sampler)


def test_every_batch_has_p_distinct_classes_with_m_images_each() -> None:
    sampler = ClassBalancedBatchSampler(LABELS, classes_per_batch=4, samples_per_class=3, seed=1)
    batches = epoch_batches(sampler)
    assert len(batches) == len(sampler) == 84 // 12
    for batch in batches:
        blocks = LABELS[np.asarray(batch)].reshape(4, 3)  # class-major layout: P blocks of m
        assert (blocks == blocks[:, :1]).all()
        assert len(set(blocks[:, 0])) == 4


def test_batch_size_is_an_alternative_to_classes_per_batch() -> None:
    sampler = ClassBalancedBatchSampler(LABELS, batch_size=8, samples_per_class=2)
    assert sampler.classes_per_batch == 4 and sampler.batch_size == 8


def test_epoch_length_rounds_down_or_up_with_drop_last() -> None:
    assert len(ClassBalancedBatchSampler(LABELS, 5, 2)) == 8  # 84 // 10
    sampler = ClassBalancedBatchSampler(LABELS, 5, 2, drop_last=False)
    assert len(sampler) == 9 and all(len(batch) == 10 for batch in sampler)


def test_images_are_each_used_once_when_classes_divide_evenly() -> None:
    labels = np.array([0, 1] * 6)
    batches = epoch_batches(ClassBalancedBatchSampler(labels, classes_per_batch=2, samples_per_class=2))
    assert sorted(index for batch in batches for index in batch) == list(range(12))


def test_classes_smaller_than_m_are_topped_up_with_repeats() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 2])
    with pytest.warns(UserWarning, match="1 of 3 classes have fewer than samples_per_class=3"):
        sampler = ClassBalancedBatchSampler(labels, 3, 3, seed=0, drop_last=False)
    batch = next(iter(sampler))
    assert sorted(batch) == [0, 1, 2, 3, 4, 5, 6, 6, 6]


def test_batches_are_a_function_of_seed_and_epoch() -> None:
    first = ClassBalancedBatchSampler(LABELS, 4, 2, seed=7)
    second = ClassBalancedBatchSampler(LABELS, 4, 2, seed=7)
    assert epoch_batches(first) == epoch_batches(second)
    second.set_epoch(0)
    epoch_0 = epoch_batches(second)
    assert epoch_batches(second) != epoch_0  # rolled over to epoch 1
    other_seed = ClassBalancedBatchSampler(LABELS, 4, 2, seed=8)
    assert epoch_batches(other_seed) != epoch_0


def test_finishing_an_epoch_moves_to_the_next_and_set_epoch_jumps() -> None:
    sampler = ClassBalancedBatchSampler(LABELS, 4, 2, seed=0)
    reference = ClassBalancedBatchSampler(LABELS, 4, 2, seed=0)
    epoch_batches(sampler)
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["batches_yielded"] == 0
    reference.set_epoch(1)
    assert epoch_batches(sampler) == epoch_batches(reference)
    sampler.set_epoch(5)
    reference.set_epoch(5)
    assert epoch_batches(sampler) == epoch_batches(reference)


def test_resume_mid_epoch_yields_exactly_the_remaining_batches() -> None:
    uninterrupted = ClassBalancedBatchSampler(LABELS, 4, 2, seed=3)
    uninterrupted.set_epoch(2)
    full_epoch = epoch_batches(uninterrupted)

    interrupted = ClassBalancedBatchSampler(LABELS, 4, 2, seed=3)
    interrupted.set_epoch(2)
    seen = list(islice(iter(interrupted), 4))
    state = interrupted.state_dict()
    assert state["epoch"] == 2 and state["batches_yielded"] == 4

    resumed = ClassBalancedBatchSampler(LABELS, 4, 2, seed=3)
    resumed.load_state_dict(state)
    assert resumed.batches_remaining == len(full_epoch) - 4
    assert seen + epoch_batches(resumed) == full_epoch
    assert resumed.epoch == 3  # and the stream carries on with the next epoch


def test_resume_point_from_a_step_counter() -> None:
    sampler = ClassBalancedBatchSampler(LABELS, 4, 2, seed=3)
    sampler.set_epoch(1)
    full_epoch = epoch_batches(sampler)
    resumed = ClassBalancedBatchSampler(LABELS, 4, 2, seed=3)
    resumed.set_resume_point(epoch=1, batches_done=2)
    resumed.set_epoch(1)  # what accelerate's prepared loader does: same epoch keeps the resume point
    assert epoch_batches(resumed) == full_epoch[2:]


def test_discarding_a_loaded_resume_point_warns() -> None:
    sampler = ClassBalancedBatchSampler(LABELS, 4, 2)
    sampler.set_resume_point(epoch=3, batches_done=2)
    with pytest.warns(UserWarning, match="discards the loaded resume point"):
        sampler.set_epoch(0)


def test_state_from_another_sampler_is_rejected() -> None:
    state = ClassBalancedBatchSampler(LABELS, 4, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed: saved 1 vs now 2"):
        ClassBalancedBatchSampler(LABELS, 4, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="labels_crc32"):
        ClassBalancedBatchSampler(shuffled_labels(seed=1), 4, 2, seed=1).load_state_dict(state)


def test_two_replicas_split_each_global_batch_into_whole_classes() -> None:
    single = ClassBalancedBatchSampler(LABELS, 4, 2, seed=5)
    ranks = [ClassBalancedBatchSampler(LABELS, 4, 2, seed=5, num_replicas=2, rank=r) for r in range(2)]
    assert all(len(rank) == len(single) and rank.batch_size == 4 for rank in ranks)
    for global_batch, rank_0, rank_1 in zip(*map(epoch_batches, [single, *ranks]), strict=True):
        assert rank_0 + rank_1 == global_batch
        classes_0, classes_1 = set(LABELS[rank_0]), set(LABELS[rank_1])
        assert len(classes_0) == len(classes_1) == 2 and not classes_0 & classes_1
        for local in (rank_0, rank_1):
            assert (LABELS[local].reshape(2, 2) == LABELS[local].reshape(2, 2)[:, :1]).all()


def test_accelerate_split_batches_gives_the_same_shards_as_num_replicas() -> None:
    for rank in range(2):
        own_sharding = ClassBalancedBatchSampler(LABELS, 4, 2, seed=5, num_replicas=2, rank=rank)
        accelerate_sharding = BatchSamplerShard(
            ClassBalancedBatchSampler(LABELS, 4, 2, seed=5),
            num_processes=2,
            process_index=rank,
            split_batches=True,
        )
        assert list(accelerate_sharding) == epoch_batches(own_sharding)


def test_resume_through_an_accelerate_prepared_loader() -> None:
    """The documented recipe: set the resume point, then set_epoch on the prepared loader."""
    dataset = TensorDataset(torch.arange(len(LABELS)))
    reference = ClassBalancedBatchSampler(LABELS, 4, 2, seed=1)
    reference.set_epoch(2)
    full_epoch = epoch_batches(reference)

    sampler = ClassBalancedBatchSampler(LABELS, 4, 2, seed=1)
    loader = prepare_data_loader(
        DataLoader(dataset, batch_sampler=sampler), num_processes=1, process_index=0, put_on_device=False
    )
    sampler.set_resume_point(epoch=2, batches_done=3)
    loader.set_epoch(2)
    assert [batch[0].tolist() for batch in loader] == full_epoch[3:]


def test_resume_works_with_a_different_number_of_replicas() -> None:
    single = ClassBalancedBatchSampler(LABELS, 4, 2, seed=5)
    list(islice(iter(single), 3))
    rank_1 = ClassBalancedBatchSampler(LABELS, 4, 2, seed=5, num_replicas=2, rank=1)
    rank_1.load_state_dict(single.state_dict())
    reference = ClassBalancedBatchSampler(LABELS, 4, 2, seed=5)
    assert epoch_batches(rank_1) == [batch[4:] for batch in epoch_batches(reference)[3:]]


def test_works_as_a_dataloader_batch_sampler() -> None:
    labels = torch.as_tensor(LABELS)
    dataset = TensorDataset(torch.arange(len(LABELS)), labels)
    loader = DataLoader(dataset, batch_sampler=ClassBalancedBatchSampler(labels, 3, 2, seed=0))
    batches = list(loader)
    assert len(batches) == len(loader) == 84 // 6
    assert all(batch[1].reshape(3, 2).unique(dim=0).shape[0] == 3 for batch in batches)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes_per_batch": 3, "num_replicas": 2}, "divisible by num_replicas"),
        ({"classes_per_batch": 13}, "Only 12 classes"),
        ({"batch_size": 7, "samples_per_class": 2}, "multiple of samples_per_class"),
        ({"classes_per_batch": 4, "batch_size": 6, "samples_per_class": 2}, "give only one"),
        ({}, "Give classes_per_batch"),
        ({"classes_per_batch": 2, "rank": 2, "num_replicas": 2}, "rank must be"),
        ({"classes_per_batch": 12, "samples_per_class": 8}, "make no full batch"),
    ],
)
def test_bad_arguments_fail_clearly(kwargs: dict, message: str) -> None:
    with warnings.catch_warnings(), pytest.raises(ValueError, match=message):
        warnings.simplefilter("ignore")
        ClassBalancedBatchSampler(LABELS, **kwargs)


def test_non_integer_labels_are_rejected() -> None:
    with pytest.raises(TypeError, match="labels must be integers"):
        ClassBalancedBatchSampler([0.5, 1.5], classes_per_batch=1)
