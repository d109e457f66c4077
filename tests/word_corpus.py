"""Small text corpora of random words for trainer tests (imported by name: tests/ is on sys.path).
Enough structure for the loss to fall in a few dozen steps, and quick to write."""

import random
from pathlib import Path

WORDS = "the a cat dog sat ran on under mat log and then it was good bad".split()


def write_word_corpus(folder: Path, n_files: int = 12, sentences: int = 300, seed: int = 0) -> Path:
    """n_files text files of `sentences` eight-word sentences each, in folder; returns folder."""
    rng = random.Random(seed)
    for i in range(n_files):
        text = ". ".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(sentences))
        (folder / f"doc{i:02d}.txt").write_text(text)
    return folder
