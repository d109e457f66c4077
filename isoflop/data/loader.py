"""Batches of token windows for training and evaluation.

Training batches are random windows, and batch i is a pure function of (seed, i): the loader's
whole state is the step counter, so resuming from a checkpoint needs no data-order bookkeeping and
replays exactly the batches an uninterrupted run would have drawn. Evaluation uses one fixed set of
windows spread evenly over the validation tokens, identical for every run on the same corpus, so
validation losses compare across runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def _check_length(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}; allowed: >= 1")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"{what} has {len(tokens)} tokens; a window of seq_len={seq_len} needs at least "
            f"{seq_len + 1} (inputs plus the next-token targets)"
        )


def _windows_to_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    """(x, y) int64 [len(starts), seq_len], y being x shifted left by one token."""
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    data = torch.from_numpy(windows)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


class BatchSampler:
    """Seeded random windows over `tokens`; `next_batch()` returns (x, y) LongTensors [B, T].

    Windows start anywhere in [0, len(tokens) - seq_len - 1], drawn with replacement, so a run
    may see a token more than once well before it has seen all of them (sampling, not epochs).
    pin_memory pins the returned CPU tensors, for asynchronous copies to a CUDA device.
    """

    def __init__(
        self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, pin_memory: bool = False
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; allowed: >= 1")
        _check_length(tokens, seq_len, "the training token array")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.pin_memory = pin_memory
        self.step = 0

    def batch(self, step: int) -> Batch:
        """The batch drawn at `step` (no state change)."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        x, y = _windows_to_batch(self.tokens, starts, self.seq_len)
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def next_batch(self) -> Batch:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"sampler state has seed {state['seed']} but this sampler has seed {self.seed}: "
                "resuming would replay another run's data order"
            )
        self.step = int(state["step"])


def eval_windows(
    tokens: np.ndarray, batch_size: int, seq_len: int, n_tokens: int, seed: int = 0
) -> list[Batch]:
    """A fixed list of (x, y) batches covering about n_tokens target tokens of `tokens`.

    ceil(n_tokens / seq_len) windows (fewer if they would not fit without overlapping) start at
    evenly spaced positions across the whole array, so every part of the validation set counts.
    The last batch may be smaller. seed=0 starts the first window at token 0; another seed shifts
    every window by one deterministic offset below the spacing: a different, equally fixed set.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; allowed: >= 1")
    if n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens}; allowed: >= 1")
    _check_length(tokens, seq_len, "the evaluation token array")
    n_starts = len(tokens) - seq_len  # valid window starts: 0 .. n_starts - 1
    n_windows = min(math.ceil(n_tokens / seq_len), max(1, n_starts // seq_len))
    # spacing >= seq_len whenever n_windows > 1, so windows never overlap; the largest start,
    # offset + spacing * (n_windows - 1), stays below n_starts because offset < spacing.
    spacing = n_starts / n_windows
    offset = np.random.default_rng(seed).uniform(0, spacing) if seed else 0.0
    starts = np.floor(offset + spacing * np.arange(n_windows)).astype(np.int64)
    return [
        _windows_to_batch(tokens, starts[i : i + batch_size], seq_len)
        for i in range(0, n_windows, batch_size)
    ]
