"""Data: corpora (built-in and user), tokenizers, the on-disk cache, and the batch loader.

Importing this package does not import torch (the planner reads corpus sizes); the loader, which
makes torch tensors, is imported on its own: `from isoflop.data.loader import BatchSampler`.
"""

from isoflop.data.cache import default_cache_dir
from isoflop.data.corpora import (
    BUILTIN_CORPORA,
    TEXT_EXTENSIONS,
    Corpus,
    epochs_needed,
    is_pretokenized,
    load_corpus,
    tokens_available,
)
from isoflop.data.tokenizers import Tokenizer, get_tokenizer, nominal_vocab_size

__all__ = [
    "BUILTIN_CORPORA",
    "TEXT_EXTENSIONS",
    "Corpus",
    "Tokenizer",
    "default_cache_dir",
    "epochs_needed",
    "get_tokenizer",
    "is_pretokenized",
    "load_corpus",
    "nominal_vocab_size",
    "tokens_available",
]
