"""Associative-recall tasks: seeded, vectorised (numpy) generators of (inputs, targets) sequences.

One layout covers the three kinds (TaskConfig.kind):

    mqar         keys of 1 token, values of 1 token (Zoology's multi-query associative recall)
    mqar-varkey  keys of 1..key_len tokens (drawn per pair), values of value_len tokens
    fuzzy        keys of key_len tokens, values of value_len tokens (MAD's fuzzy recall)

A sequence of seq_len tokens is the n_pairs key-value pairs (keys unique within the sequence, as
token tuples; values need not be), then every pair queried once in a random order: the key again,
followed by its value. Query placement 'uniform' puts random runs of filler before the queries (the
free room split uniformly at random), 'end' puts them right after the pairs; filler (token 0) fills
whatever is left at the end. Keys come from ids 1..V_k and values from V_k+1..vocab_size-1 (V_k =
(vocab_size-1)//2), so a key's boundaries are visible even when key lengths vary.

Targets are next-token targets, -100 (ignored by the loss) everywhere except the answer positions:
the last key token of a query (target: the value's first token) and each value token of a query but
the last (target: the next value token; values are teacher-forced). Only queries are supervised, as
in Zoology. Accuracy is exact match per answer token: argmax prediction == target, over answer
positions only.

Training batch i of a run is a pure function of (seed, i) (stream 0), so resuming replays it exactly;
the test set is one fixed draw (stream 1), the same for every run of a task. The streams differ, so
train and test sequences are independent draws (a repeat is as unlikely as any other collision).
Torch-free: the orchestrator validates tasks with check_task.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict

import numpy as np

from isoflop.runspec import QUERY_PLACEMENTS, TASK_KINDS, TaskConfig

IGNORE = -100  # F.cross_entropy's ignore_index
FILLER = 0
TRAIN_STREAM, TEST_STREAM = 0, 1
MAX_KEY_CODE_BITS = 62  # keys are compared as one int64 code each (see _unique_keys)


def key_vocab_size(task: TaskConfig) -> int:
    return (task.vocab_size - 1) // 2


def key_lengths(task: TaskConfig) -> tuple[int, int]:
    """(shortest, longest) key in tokens."""
    if task.kind == "mqar":
        return 1, 1
    if task.kind == "mqar-varkey":
        return 1, task.key_len
    return task.key_len, task.key_len


def min_seq_len(task: TaskConfig) -> int:
    """The shortest sequence that holds every pair and every query at their longest keys."""
    return 2 * task.n_pairs * (key_lengths(task)[1] + task.value_len)


def check_task(task: TaskConfig, seq_len: int) -> None:
    """ValueError naming the field, its value and what is allowed, for a task that cannot be generated."""

    def fail(name: str, value: object, allowed: str) -> None:
        raise ValueError(f"task.{name}={value!r}; allowed: {allowed}")

    if task.kind not in TASK_KINDS:
        fail("kind", task.kind, ", ".join(TASK_KINDS))
    if task.query_placement not in QUERY_PLACEMENTS:
        fail("query_placement", task.query_placement, ", ".join(QUERY_PLACEMENTS))
    for name in ("vocab_size", "n_pairs", "key_len", "value_len", "n_test"):
        value = getattr(task, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(name, value, "an integer >= 1")
    if task.vocab_size < 3:
        fail("vocab_size", task.vocab_size, ">= 3 (filler, one key and one value token)")
    if task.kind == "mqar" and (task.key_len, task.value_len) != (1, 1):
        fail("key_len/value_len", (task.key_len, task.value_len),
             "1 and 1 for mqar (use mqar-varkey or fuzzy for longer keys or values)")
    shortest, longest = key_lengths(task)
    n_keys = key_vocab_size(task)
    distinct = sum(n_keys**length for length in range(shortest, longest + 1))
    if distinct < task.n_pairs:
        fail("n_pairs", task.n_pairs, f"<= {distinct}, the distinct keys of {shortest}..{longest} "
             f"tokens from {n_keys} key ids (raise vocab_size or key_len)")
    if longest * math.log2(n_keys + 1) > MAX_KEY_CODE_BITS:
        fail("key_len", task.key_len, f"keys of at most {MAX_KEY_CODE_BITS} bits "
             f"(key_len * log2({n_keys + 1}))")
    if seq_len < min_seq_len(task):
        raise ValueError(f"seq_len={seq_len} is too short for task {task.kind} with n_pairs="
                         f"{task.n_pairs}; allowed: >= {min_seq_len(task)} = 2 * n_pairs * "
                         "(longest key + value_len)")


def generate(task: TaskConfig, n_sequences: int, seq_len: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), int64 [n_sequences, seq_len] each, laid out as the module docstring says."""
    check_task(task, seq_len)
    n, v_len = task.n_pairs, task.value_len
    longest = key_lengths(task)[1]
    width = longest + v_len  # a pair's slot: the longest key plus the value
    lengths, keys = _unique_keys(task, n_sequences, rng)
    values = rng.integers(key_vocab_size(task) + 1, task.vocab_size, size=(n_sequences, n, v_len))

    # Each pair as `width` tokens: key, then value, then `valid` false for the unused tail.
    offset = np.arange(width)
    in_key = offset < lengths[..., None]
    value_index = np.clip(offset - lengths[..., None], 0, v_len - 1)
    padded_keys = np.pad(keys, ((0, 0), (0, 0), (0, width - longest)))
    pairs = np.where(in_key, padded_keys, np.take_along_axis(values, value_index, axis=2))
    pair_len = lengths + v_len
    valid = offset < pair_len[..., None]

    order = np.argsort(rng.random((n_sequences, n)), axis=1)  # query order
    query_len = np.take_along_axis(pair_len, order, axis=1)
    context_len = pair_len.sum(axis=1)
    slack = seq_len - 2 * context_len  # >= 0 by check_task
    if task.query_placement == "uniform":
        cuts = np.sort(np.floor(rng.random((n_sequences, n)) * (slack + 1)[:, None]).astype(np.int64), axis=1)
        gaps = np.diff(cuts, axis=1, prepend=0)
    else:
        gaps = np.zeros((n_sequences, n), dtype=np.int64)
    pair_start = np.cumsum(pair_len, axis=1) - pair_len
    query_start = context_len[:, None] + np.cumsum(gaps + query_len, axis=1) - query_len

    inputs = np.full((n_sequences, seq_len), FILLER, dtype=np.int64)
    targets = np.full((n_sequences, seq_len), IGNORE, dtype=np.int64)
    rows = np.broadcast_to(np.arange(n_sequences)[:, None, None], pairs.shape)
    pair_pos = pair_start[..., None] + offset
    inputs[rows[valid], pair_pos[valid]] = pairs[valid]

    queries = np.take_along_axis(pairs, order[..., None], axis=1)
    query_valid = np.take_along_axis(valid, order[..., None], axis=1)
    query_pos = query_start[..., None] + offset
    inputs[rows[query_valid], query_pos[query_valid]] = queries[query_valid]
    # Answer positions: the last key token and every value token but the last.
    query_key_len = np.take_along_axis(lengths, order, axis=1)[..., None]
    answer = (offset >= query_key_len - 1) & (offset < query_key_len + v_len - 1)
    following = np.pad(queries[..., 1:], ((0, 0), (0, 0), (0, 1)))
    targets[rows[answer], query_pos[answer]] = following[answer]
    return inputs, targets


def _unique_keys(task: TaskConfig, n_sequences: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Key lengths [N, n] and key tokens [N, n, longest] (zero past each key's length), the keys
    distinct within each sequence. A repeated key is drawn again, its length too (a sequence may
    hold more keys than there are short ones), so with many pairs short keys are a little rarer
    than uniform lengths would make them."""
    n = task.n_pairs
    n_keys, (shortest, longest) = key_vocab_size(task), key_lengths(task)
    lengths = rng.integers(shortest, longest + 1, size=(n_sequences, n))
    if longest == 1:  # one-token keys: a random subset of the key ids, no rejection needed
        return lengths, (np.argsort(rng.random((n_sequences, n_keys)), axis=1)[:, :n] + 1)[..., None]
    keys = rng.integers(1, n_keys + 1, size=(n_sequences, n, longest))
    weights = (n_keys + 1) ** np.arange(longest, dtype=np.int64)
    while True:
        used = np.arange(longest) < lengths[..., None]
        keys = np.where(used, keys, 0)
        codes = (keys * weights).sum(axis=2)  # distinct keys (lengths included) have distinct codes
        order = np.argsort(codes, axis=1, kind="stable")
        ranked = np.take_along_axis(codes, order, axis=1)
        repeated = np.zeros_like(used[..., 0])
        np.put_along_axis(repeated, order[:, 1:], ranked[:, 1:] == ranked[:, :-1], axis=1)
        if not repeated.any():
            return lengths, keys
        keys = np.where(repeated[..., None], rng.integers(1, n_keys + 1, size=keys.shape), keys)
        lengths = np.where(repeated, rng.integers(shortest, longest + 1, size=lengths.shape), lengths)


def train_batch(task: TaskConfig, batch_size: int, seq_len: int, seed: int,
                step: int) -> tuple[np.ndarray, np.ndarray]:
    """Training batch `step` of a run seeded `seed`: a pure function of its arguments."""
    return generate(task, batch_size, seq_len, np.random.default_rng([TRAIN_STREAM, seed, step]))


def fixed_test_set(task: TaskConfig, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The task's fixed test set: task.n_test sequences, the same for every run and seed."""
    return generate(task, task.n_test, seq_len, np.random.default_rng([TEST_STREAM]))


def answer_hits(predictions: np.ndarray, targets: np.ndarray) -> tuple[int, int]:
    """(correct, answer positions): exact match per answer token, other positions not counted."""
    answer = targets != IGNORE
    return int((predictions[answer] == targets[answer]).sum()), int(answer.sum())


def accuracy(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Share of answer tokens predicted exactly; NaN when there is no answer position."""
    correct, total = answer_hits(predictions, targets)
    return correct / total if total else math.nan


def task_fingerprint(task: TaskConfig, seq_len: int) -> str:
    """Names the data a task run saw (recorded where a corpus run records its corpus fingerprint)."""
    text = json.dumps(asdict(task) | {"seq_len": seq_len}, sort_keys=True)
    return "task-" + hashlib.sha256(text.encode()).hexdigest()[:16]


class TaskSampler:
    """Training batches of a task, with BatchSampler's interface (next_batch, state_dict): its whole
    state is the step counter, so a resumed run replays the batches of an uninterrupted one."""

    def __init__(self, task: TaskConfig, batch_size: int, seq_len: int, seed: int) -> None:
        check_task(task, seq_len)
        self.task, self.batch_size, self.seq_len, self.seed = task, batch_size, seq_len, seed
        self.step = 0

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        batch = train_batch(self.task, self.batch_size, self.seq_len, self.seed, self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']} but this sampler has seed "
                             f"{self.seed}: resuming would replay another run's batches")
        self.step = int(state["step"])
