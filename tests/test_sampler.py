"""MixtureSampler: rates hold, streams are deterministic, ranks shard, resumes are exact."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from multipromot.data.mixtures import Mixture
from multipromot.data.sampler import BLOCK, Draw, MixtureSampler
from multipromot.errors import UserError


@dataclass
class ToyTask:
    """A task stand-in: ``n`` train examples ``{"i": 0..n-1}``."""

    name: str
    n: int
    n_validation: int = 0

    def examples(self, split: str) -> list[dict]:
        size = self.n if split == "train" else self.n_validation
        return [{"i": i, "split": split} for i in range(size)]

    def render(self, example: dict) -> tuple[str, str]:
        return f"{self.name} question {example['i']}", f"answer {example['i']}"


def toy_mixture(sizes: list[int], rates: list[float]) -> Mixture:
    return Mixture("toy", [ToyTask(f"t{i}", n) for i, n in enumerate(sizes)], rates)


def shares(draws: list[Draw], num_tasks: int) -> np.ndarray:
    counts = np.bincount([d.task_index for d in draws], minlength=num_tasks)
    return counts / len(draws)


@pytest.mark.parametrize(
    ("sizes", "rates"),
    [
        ([1000, 50, 7], [5, 3, 2]),
        ([10, 10], [1, 1]),
        ([300, 20, 5, 1], [0.7, 0.1, 0.15, 0.05]),
        ([40, 40, 40], [1, 0, 3]),  # a zero rate is never drawn
        ([40, 40, 0], [1, 3, 0]),  # ... nor needs examples, even last
    ],
)
def test_shares_follow_rates_over_100k_draws(sizes, rates):
    mixture = toy_mixture(sizes, rates)
    for seed in (0, 1):
        got = shares(MixtureSampler(mixture, seed=seed).take(100_000), len(sizes))
        np.testing.assert_allclose(got, mixture.rates, atol=0.01)
    if 0 in rates:
        assert got[rates.index(0)] == 0.0


def test_same_seed_same_stream_and_different_seed_differs():
    mixture = toy_mixture([100, 30], [1, 1])
    a = MixtureSampler(mixture, seed=7).take(3000)
    b = MixtureSampler(mixture, seed=7).take(3000)
    c = MixtureSampler(mixture, seed=8).take(3000)
    assert a == b
    assert sum(x != y for x, y in zip(a, c, strict=True)) > 1500
    assert all(isinstance(d, Draw) and 0 <= d.example_index < (100, 30)[d.task_index] for d in a)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_interleaved_equal_the_one_rank_stream(world_size):
    mixture = toy_mixture([1000, 50, 7], [5, 3, 2])
    per_rank = 2 * BLOCK + 17  # crosses block boundaries on every rank
    single = MixtureSampler(mixture, seed=3).take(per_rank * world_size)
    samplers = [
        MixtureSampler(mixture, seed=3, rank=r, world_size=world_size) for r in range(world_size)
    ]
    positions: list[list[int]] = [[] for _ in samplers]
    streams: list[list[Draw]] = [[] for _ in samplers]
    for _ in range(per_rank):
        for r, sampler in enumerate(samplers):
            positions[r].append(sampler.position)
            streams[r].append(next(sampler))
    interleaved = [d for step in zip(*streams, strict=True) for d in step]
    assert interleaved == single
    # Never overlap: rank r owns exactly the positions r, r + W, r + 2W, ...
    for r in range(world_size):
        assert positions[r] == list(range(r, per_rank * world_size, world_size))
    assert len({p for ps in positions for p in ps}) == per_rank * world_size


@pytest.mark.parametrize(
    ("rank", "world_size", "consumed"),
    [(0, 1, 1234), (0, 1, BLOCK), (0, 1, BLOCK - 1), (1, 2, BLOCK // 2), (1, 2, 777), (2, 3, 5000)],
)
def test_resume_from_state_dict_continues_identically(rank, world_size, consumed):
    mixture = toy_mixture([1000, 50, 7], [5, 3, 2])
    original = MixtureSampler(mixture, seed=5, rank=rank, world_size=world_size)
    original.take(consumed)
    state = json.loads(json.dumps(original.state_dict()))  # the state is plain JSON
    assert state["position"] == consumed * world_size + rank
    assert sum(state["counts"]) == consumed * world_size + rank
    resumed = MixtureSampler(mixture, seed=5, rank=rank, world_size=world_size)
    resumed.load_state_dict(state)
    assert resumed.take(BLOCK + 100) == original.take(BLOCK + 100)


def test_resume_refuses_a_state_from_another_run():
    mixture = toy_mixture([100, 30], [1, 1])
    state = MixtureSampler(mixture, seed=1).state_dict()
    with pytest.raises(UserError, match="seed"):
        MixtureSampler(mixture, seed=2).load_state_dict(state)
    with pytest.raises(UserError, match="world_size"):
        MixtureSampler(mixture, seed=1, rank=0, world_size=2).load_state_dict(state)
    other = toy_mixture([100, 30, 5], [1, 1, 1])
    with pytest.raises(UserError, match="tasks"):
        MixtureSampler(other, seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="sizes"):  # the data changed under the run
        MixtureSampler(toy_mixture([100, 31], [1, 1]), seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="rates"):
        MixtureSampler(toy_mixture([100, 30], [2, 1]), seed=1).load_state_dict(state)


def test_examples_without_replacement_and_each_small_task_epoch_reshuffles():
    mixture = toy_mixture([5], [1])
    draws = [d.example_index for d in MixtureSampler(mixture, seed=0).take(5 * 40)]
    epochs = [tuple(draws[i : i + 5]) for i in range(0, len(draws), 5)]
    assert all(sorted(e) == [0, 1, 2, 3, 4] for e in epochs)  # each epoch is a permutation
    assert len(set(epochs)) > 20  # 40 epochs, 120 possible orders: not one order repeated


def test_without_replacement_inside_a_mixture():
    mixture = toy_mixture([50, 2000], [1, 1])
    picks = [
        d.example_index for d in MixtureSampler(mixture, seed=4).take(4000) if d.task_index == 0
    ]
    for start in range(0, len(picks) - 50, 50):
        assert sorted(picks[start : start + 50]) == list(range(50))


def test_100k_draws_follow_the_rates():
    # Speed lives in benchmarks/ (data_path.py); here: a long stream is whole and follows rates.
    mixture = toy_mixture([100_000, 1000, 3], [5, 3, 2])
    draws = MixtureSampler(mixture, seed=0).take(100_000)
    assert len(draws) == 100_000
    counts = [sum(d.task_index == t for d in draws) for t in range(3)]
    assert [round(c / 1000) for c in counts] == [50, 30, 20]


def test_task_without_examples_in_split_is_an_error():
    mixture = Mixture("toy", [ToyTask("a", 3), ToyTask("b", 2)], [1, 1])
    with pytest.raises(UserError, match="'a' has rate 0.5 but no 'validation' examples"):
        MixtureSampler(mixture, split="validation")
