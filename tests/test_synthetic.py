"""The associative-recall generators: determinism, the layout, answers, keys, and accuracy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from isoflop.data.synthetic import (
    FILLER,
    IGNORE,
    TaskSampler,
    accuracy,
    answer_hits,
    check_task,
    fixed_test_set,
    generate,
    key_vocab_size,
    train_batch,
)
from isoflop.runspec import TaskConfig

TASKS = {
    "mqar": TaskConfig(kind="mqar", vocab_size=40, n_pairs=6),
    "mqar-varkey": TaskConfig(kind="mqar-varkey", vocab_size=16, n_pairs=10, key_len=3),
    "fuzzy": TaskConfig(kind="fuzzy", vocab_size=12, n_pairs=6, key_len=2, value_len=3),
    "end": TaskConfig(kind="mqar-varkey", vocab_size=30, n_pairs=5, key_len=2, query_placement="end"),
}
SEQ_LEN = 96


def segments(row: np.ndarray, task: TaskConfig) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """(start, key, value) of every key-value segment, read back from the tokens alone: a key is a
    run of key ids, the value_len tokens after it are its value."""
    is_key = (row >= 1) & (row <= key_vocab_size(task))
    found, t = [], 0
    while t < len(row):
        if not is_key[t]:
            assert row[t] == FILLER, f"value token {row[t]} at {t} outside a segment"
            t += 1
            continue
        start = t
        while is_key[t]:
            t += 1
        value = tuple(row[t:t + task.value_len])
        assert all(v > key_vocab_size(task) for v in value)
        found.append((start, tuple(row[start:t]), value))
        t += task.value_len
    return found


@pytest.mark.parametrize("name", TASKS)
def test_layout_answers_and_keys(name):
    task = TASKS[name]
    inputs, targets = generate(task, 64, SEQ_LEN, np.random.default_rng(3))
    assert inputs.shape == targets.shape == (64, SEQ_LEN) and inputs.dtype == np.int64
    assert inputs.min() >= 0 and inputs.max() < task.vocab_size
    lengths_seen = set()
    for row, target in zip(inputs, targets):
        found = segments(row, task)
        assert len(found) == 2 * task.n_pairs  # the pairs, then every pair queried once
        context, queries = found[:task.n_pairs], found[task.n_pairs:]
        memory = {key: value for _, key, value in context}
        assert len(memory) == task.n_pairs, "keys are unique within a sequence"
        assert sorted(key for _, key, _ in queries) == sorted(memory), "each key queried once"
        assert context[0][0] == 0 and all(  # the pairs are packed at the start
            a[0] + len(a[1]) + task.value_len == b[0] for a, b in itertools.pairwise(context))
        expected = np.full(SEQ_LEN, IGNORE)
        for start, key, value in queries:
            assert memory[key] == value  # the query's value is the one stored with its key
            last_key = start + len(key) - 1
            expected[last_key:last_key + task.value_len] = value  # next-token answers
            lengths_seen.add(len(key))
        np.testing.assert_array_equal(target, expected)
        if task.query_placement == "end":
            end_of_context = context[-1][0] + len(context[-1][1]) + task.value_len
            assert queries[0][0] == end_of_context
    expected_lengths = {"mqar": {1}, "mqar-varkey": {1, 2, 3}, "fuzzy": {2}, "end": {1, 2}}[name]
    assert lengths_seen == expected_lengths


def test_uniform_placement_spreads_the_queries():
    task = TaskConfig(kind="mqar", vocab_size=64, n_pairs=4)
    inputs, _ = generate(task, 200, 64, np.random.default_rng(0))
    first_query = [segments(row, task)[4][0] for row in inputs]
    assert min(first_query) == 8 and max(first_query) > 40  # right after the pairs, or far later


def test_generators_are_deterministic_and_seeded():
    task = TASKS["mqar-varkey"]
    a = train_batch(task, 8, SEQ_LEN, seed=1, step=5)
    np.testing.assert_array_equal(a[0], train_batch(task, 8, SEQ_LEN, seed=1, step=5)[0])
    assert not np.array_equal(a[0], train_batch(task, 8, SEQ_LEN, seed=1, step=6)[0])
    assert not np.array_equal(a[0], train_batch(task, 8, SEQ_LEN, seed=2, step=5)[0])
    test_a, test_b = fixed_test_set(task, SEQ_LEN), fixed_test_set(task, SEQ_LEN)
    np.testing.assert_array_equal(test_a[1], test_b[1])
    assert len(test_a[0]) == task.n_test


def test_sampler_resumes_exactly():
    task = TASKS["fuzzy"]
    sampler = TaskSampler(task, 4, SEQ_LEN, seed=7)
    batches = [sampler.next_batch() for _ in range(3)]
    resumed = TaskSampler(task, 4, SEQ_LEN, seed=7)
    resumed.load_state_dict({"step": 2, "seed": 7})
    np.testing.assert_array_equal(resumed.next_batch()[0], batches[2][0])
    with pytest.raises(ValueError, match="seed 7 but this sampler has seed 8"):
        TaskSampler(task, 4, SEQ_LEN, seed=8).load_state_dict(sampler.state_dict())


def test_accuracy_counts_answer_positions_only():
    targets = np.array([[IGNORE, 5, IGNORE, 7], [IGNORE, IGNORE, 9, 3]])
    predictions = np.array([[0, 5, 0, 1], [9, 9, 9, 3]])  # wrong guesses off the answers do not count
    assert answer_hits(predictions, targets) == (3, 4)
    assert accuracy(predictions, targets) == 0.75
    assert np.isnan(accuracy(predictions, np.full_like(targets, IGNORE)))


@pytest.mark.parametrize("task, seq_len, message", [
    (TaskConfig(kind="mqar", n_pairs=8), 31, "seq_len=31 is too short.*>= 32"),
    (TaskConfig(kind="mqar", key_len=2), 64, "key_len/value_len=\\(2, 1\\)"),
    (TaskConfig(kind="mqar", vocab_size=9, n_pairs=5), 64, "n_pairs=5; allowed: <= 4"),
    (TaskConfig(kind="recall"), 64, "task.kind='recall'; allowed: mqar, mqar-varkey, fuzzy"),
    (TaskConfig(query_placement="start"), 64, "query_placement='start'; allowed: uniform, end"),
    (TaskConfig(n_test=0), 64, "n_test=0; allowed: an integer >= 1"),
])
def test_bad_tasks_are_refused_with_the_field_named(task, seq_len, message):
    with pytest.raises(ValueError, match=message):
        check_task(task, seq_len)
