"""Tokenizers: raw UTF-8 bytes (the default) and byte-level BPE trained on the corpus.

Both mark document boundaries with one separator id whose text is NUL ("\\x00"). Corpora strip NUL
from every document before encoding (it never occurs in real text), so the separator id appears
exactly at document boundaries, for either tokenizer.

- 'bytes': vocab 256, id = byte value, separator = byte 0.
- 'bpe-<vocab>' (e.g. 'bpe-4096'): a byte-level BPE (`tokenizers` library, ByteLevel
  pre-tokenizer, no normaliser, so decode(encode(s)) == s) trained on the corpus train split. The
  separator is the special token "\\x00" with id 0; the 256 byte symbols follow, then the merges.
  Trained once per (corpus train split, vocab) and cached as JSON under <cache>/tokenizers/.
  Training is deterministic: the documents come in sorted order and the trainer breaks count ties
  by token ids that depend only on the data. On a tiny corpus the trained vocab may stop short of
  <vocab> (no pair left to merge); `vocab_size` is then the real, smaller size.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from isoflop.data.cache import atomic_write_text, default_cache_dir

SEPARATOR_TEXT = "\x00"
BYTE_VOCAB_SIZE = 256
_BPE_NAME = re.compile(r"bpe-(\d+)")
# The smallest BPE worth the name: 256 byte symbols, the separator and at least one merge.
_MIN_BPE_VOCAB = BYTE_VOCAB_SIZE + 2
_MAX_BPE_VOCAB = 1 << 20
TOKENIZER_NAMES_HELP = (
    f"'bytes' or 'bpe-<vocab>' with {_MIN_BPE_VOCAB} <= vocab <= {_MAX_BPE_VOCAB}"
)


def nominal_vocab_size(name: str) -> int:
    """The vocab size a tokenizer name asks for (no training, no I/O): for planning model sizes."""
    if name == "bytes":
        return BYTE_VOCAB_SIZE
    match = _BPE_NAME.fullmatch(name)
    if match is None or not _MIN_BPE_VOCAB <= int(match.group(1)) <= _MAX_BPE_VOCAB:
        raise ValueError(f"data.tokenizer={name!r}; allowed: {TOKENIZER_NAMES_HELP}")
    return int(match.group(1))


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id below vocab_size."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class Tokenizer:
    """Interface shared by all tokenizers; `encode_documents` is the fast path corpora use."""

    name: str
    vocab_size: int
    separator_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_documents(self, documents: Sequence[str]) -> np.ndarray:
        """Token ids of the documents, each followed by the separator, as one array."""
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    name = "bytes"
    vocab_size = BYTE_VOCAB_SIZE
    separator_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def encode_documents(self, documents: Sequence[str]) -> np.ndarray:
        joined = "".join(doc + SEPARATOR_TEXT for doc in documents).encode("utf-8")
        return np.frombuffer(joined, dtype=np.uint8)


class BPETokenizer(Tokenizer):
    separator_id = 0

    def __init__(self, name: str, backend) -> None:  # backend: tokenizers.Tokenizer
        self.name = name
        self._backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def encode_documents(self, documents: Sequence[str]) -> np.ndarray:
        # The separator text is the special token, so appending it yields the separator id.
        # encode_batch_fast (tokenizers >= 0.21) skips offsets we do not use: about 2x faster.
        encode_batch = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        texts = [doc + SEPARATOR_TEXT for doc in documents]
        encodings = encode_batch(texts, add_special_tokens=False)
        if not encodings:
            return np.zeros(0, dtype=token_dtype(self.vocab_size))
        return np.concatenate(
            [np.asarray(e.ids, dtype=token_dtype(self.vocab_size)) for e in encodings]
        )

    def to_json(self) -> str:
        return self._backend.to_str()


def train_bpe(vocab_size: int, documents: Iterable[str]) -> "BPETokenizer":
    """Train a byte-level BPE of `vocab_size` ids (separator included) on the documents."""
    try:
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models, pre_tokenizers, trainers
    except ImportError as err:
        raise ImportError(
            "BPE tokenizers need the `tokenizers` package: pip install 'isoflop[bpe]'"
        ) from err
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SEPARATOR_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer=trainer)
    return BPETokenizer(f"bpe-{vocab_size}", backend)


def load_bpe(name: str, path: Path) -> BPETokenizer:
    from tokenizers import Tokenizer as Backend

    return BPETokenizer(name, Backend.from_file(str(path)))


def get_tokenizer(
    name: str,
    training_documents: Callable[[], Iterable[str]] | None = None,
    cache_key: str | None = None,
    cache_dir: Path | None = None,
) -> Tokenizer:
    """The tokenizer called `name`.

    For 'bpe-<vocab>', `cache_key` names the training data (the corpus train split): a tokenizer
    cached under that key is loaded, otherwise one is trained on `training_documents()` and cached.
    """
    vocab_size = nominal_vocab_size(name)
    if name == "bytes":
        return ByteTokenizer()
    if cache_key is None:
        raise ValueError(f"tokenizer {name!r} needs cache_key naming its training data")
    path = (cache_dir or default_cache_dir()) / "tokenizers" / f"{name}-{cache_key}.json"
    if path.is_file():
        return load_bpe(name, path)
    if training_documents is None:
        raise ValueError(
            f"tokenizer {name!r} is not cached at {path} and no training documents were given"
        )
    tokenizer = train_bpe(vocab_size, training_documents())
    atomic_write_text(path, tokenizer.to_json())
    return tokenizer
