"""The grain pipeline: shuffling per epoch, sharding by process, batching, exact resume."""
from __future__ import annotations

import collections
import itertools
import json

import pytest

from ruscarl_jax.data.pipeline import BatchIterator, PipelineSettings, make_dataset
from ruscarl_jax.data.types import Example, Message, RubricItem


def _examples(n: int) -> list[Example]:
    return [Example(f"ex{i}", (Message("user", f"q{i}"),), (RubricItem("c", 1.0),)) for i in range(n)]


def _ids(batches) -> list[list[str]]:
    return [[ex.id for ex in batch] for batch in batches]


def test_one_epoch_is_a_permutation_and_epochs_differ():
    examples = _examples(12)
    batches = _ids(BatchIterator(examples, PipelineSettings(batch_size=4, seed=1, num_epochs=3), 0, 1))
    assert len(batches) == 9 and all(len(b) == 4 for b in batches)
    flat = list(itertools.chain.from_iterable(batches))
    epochs = [flat[i * 12:(i + 1) * 12] for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(ex.id for ex in examples)
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != [ex.id for ex in examples]


def test_seed_decides_the_order():
    examples = _examples(20)
    run = lambda seed: _ids(BatchIterator(examples, PipelineSettings(batch_size=5, seed=seed, num_epochs=1), 0, 1))
    assert run(3) == run(3)
    assert run(3) != run(4)
    unshuffled = _ids(BatchIterator(examples, PipelineSettings(batch_size=5, num_epochs=1, shuffle=False), 0, 1))
    assert list(itertools.chain.from_iterable(unshuffled)) == [ex.id for ex in examples]


def test_drop_remainder():
    examples = _examples(10)
    batches = _ids(BatchIterator(examples, PipelineSettings(batch_size=3, seed=0, num_epochs=1), 0, 1))
    assert len(batches) == 3 and len(set(itertools.chain.from_iterable(batches))) == 9


@pytest.mark.parametrize("num_epochs", [1, 2])
def test_processes_take_contiguous_slices_of_each_global_batch(num_epochs):
    examples, batch, procs = _examples(23), 6, 3
    cfg = PipelineSettings(batch_size=batch, seed=5, num_epochs=num_epochs)
    single = list(itertools.chain.from_iterable(_ids(BatchIterator(examples, PipelineSettings(
        batch_size=1, seed=5, num_epochs=num_epochs), 0, 1))))  # the shuffled stream, unsharded
    per_process = [_ids(BatchIterator(examples, cfg, p, procs)) for p in range(procs)]
    steps = (23 * num_epochs) // batch
    assert [len(b) for b in per_process] == [steps] * procs  # every process gets the same number of batches
    one_process = _ids(BatchIterator(examples, cfg, 0, 1))
    for j in range(steps):
        joined = list(itertools.chain.from_iterable(per_process[p][j] for p in range(procs)))
        assert joined == single[j * batch:(j + 1) * batch] == one_process[j]  # same global order on any layout
    if num_epochs == 1:
        seen = collections.Counter(itertools.chain.from_iterable(itertools.chain.from_iterable(per_process)))
        assert max(seen.values()) == 1  # no example twice within the epoch across processes


@pytest.mark.parametrize("num_epochs,take", [(None, 7), (2, 3)])
def test_resume_is_exact(num_epochs, take):
    examples = _examples(11)
    cfg = PipelineSettings(batch_size=4, seed=9, num_epochs=num_epochs)
    reference = BatchIterator(examples, cfg, 1, 2)
    expected = _ids(itertools.islice(reference, take + 6))

    first = BatchIterator(examples, cfg, 1, 2)
    head = _ids(itertools.islice(first, take))
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
    resumed = BatchIterator(examples, cfg, 1, 2)
    resumed.set_state(state)
    assert head + _ids(itertools.islice(resumed, 6)) == expected


def test_infinite_pipeline_keeps_going():
    it = BatchIterator(_examples(120), PipelineSettings(batch_size=8, seed=0), 0, 1)
    batches = _ids(itertools.islice(it, 45))  # exactly 3 epochs
    assert len(batches) == 45
    counts = collections.Counter(itertools.chain.from_iterable(batches))
    assert set(counts) == {f"ex{i}" for i in range(120)} and set(counts.values()) == {3}


def test_state_from_another_pipeline_is_rejected():
    examples = _examples(11)
    it = BatchIterator(examples, PipelineSettings(batch_size=3, seed=9), 0, 1)
    next(it)
    state = it.get_state()
    other = BatchIterator(examples, PipelineSettings(batch_size=3, seed=10), 0, 1)
    with pytest.raises(ValueError, match="different pipeline.*seed"):
        other.set_state(state)
    with pytest.raises(ValueError, match="not a BatchIterator state"):
        other.set_state({"next_index": 3})


def test_bad_settings():
    with pytest.raises(ValueError, match="batch_size"):
        PipelineSettings(batch_size=0)
    with pytest.raises(ValueError, match="num_epochs"):
        PipelineSettings(batch_size=1, num_epochs=0)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        make_dataset(_examples(3), PipelineSettings(batch_size=4, num_epochs=1), 0, 2)
    with pytest.raises(ValueError, match="does not split over 2 processes"):
        make_dataset(_examples(9), PipelineSettings(batch_size=3), 0, 2)
    with pytest.raises(ValueError, match="process_index"):
        make_dataset(_examples(3), PipelineSettings(batch_size=1), 2, 2)


def test_default_process_comes_from_jax():
    import jax

    ds = make_dataset(_examples(8), PipelineSettings(batch_size=2, seed=0, num_epochs=1))
    assert len(ds) == 8 // 2  # global batches; each process holds its share of every one
