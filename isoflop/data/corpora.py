"""Corpora: token arrays for training and validation, from a name or a path in DataConfig.corpus.

Sources (`load_corpus` picks by the value of data.corpus):
- 'python-stdlib': the running interpreter's standard-library .py files (sysconfig "stdlib"),
  without any site-packages or dist-packages folder below it.
- 'python-site': the .py files of site-packages (sysconfig "purelib" and "platlib", deduplicated;
  when they differ, relative paths are prefixed 'purelib/' and 'platlib/').
- a text file: one document.
- a folder: every file with an extension in TEXT_EXTENSIONS below it, recursively, skipping hidden
  files and folders (names starting with '.'), one document per file.
- pre-tokenized .bin shards: a .bin file, a folder that directly holds .bin files, or a glob
  ('data/*.bin'). Each shard is a flat array of `data.bin_dtype` ids (np.memmap). Shards whose file
  name contains 'val' are validation, all others training. Without a val shard, the last
  val_fraction of the training tokens is held out. vocab_size is `{"vocab_size": N}` from a
  meta.json next to the shards (the folder, or the glob's common folder) when present, otherwise
  max token + 1 (a full scan: give meta.json for large shards). data.tokenizer is not used.

Documents (files) are read as UTF-8 (undecodable bytes become U+FFFD) with NUL removed, visited in
sorted order of their relative path, and each is followed by the tokenizer's separator. A document
is in validation when sha256(relative path), read as a fraction of 2**64, is below val_fraction, so
adding files never moves the others. When that leaves one side empty (a single file, a handful of
files), the split falls back to the token tail: the last val_fraction of all tokens is validation.

Tokenized document corpora are cached as raw arrays (train.bin, val.bin, meta.json) under
<cache>/corpora/<fingerprint>/ and memory-mapped, so later loads only stat the files. The
fingerprint hashes the sorted (relative path, content sha256) list with the tokenizer name,
val_fraction and a format version: it names exactly the tokens a run saw.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from isoflop.data.cache import atomic_directory, atomic_output, default_cache_dir, file_digests
from isoflop.data.tokenizers import (
    SEPARATOR_TEXT,
    Tokenizer,
    get_tokenizer,
    nominal_vocab_size,
    token_dtype,
)
from isoflop.runspec import DataConfig, canonical_json

BUILTIN_CORPORA = ("python-stdlib", "python-site")
TEXT_EXTENSIONS = frozenset(
    {
        ".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org",
        ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts",
        ".sh", ".sql", ".html", ".htm", ".xml", ".css",
        ".json", ".jsonl", ".csv", ".tsv", ".yaml", ".yml", ".toml", ".ini", ".cfg",
    }
)  # fmt: skip
BIN_DTYPES = ("uint16", "uint32")
# Bump when the way files become tokens changes, so old caches stop matching.
FORMAT_VERSION = 1
_ENCODE_CHUNK_CHARS = 8 << 20  # text handed to the tokenizer at once; bounds memory when streaming
_SCAN_CHUNK_TOKENS = 1 << 24
_PACKAGE_DIRS = frozenset({"site-packages", "dist-packages"})


@dataclass(frozen=True, eq=False)
class Corpus:
    """Token ids of one corpus, split for training and validation.

    val_rule says how validation was chosen: 'documents' (held-out files), 'tail' (the last
    val_fraction of the tokens) or 'shards' (val .bin shards).
    tokenizer is None for pre-tokenized shards.
    """

    name: str
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    fingerprint: str
    n_documents: int
    val_rule: str
    tokenizer: Tokenizer | None

    @property
    def n_train_tokens(self) -> int:
        return int(self.train.shape[0])

    @property
    def n_val_tokens(self) -> int:
        return int(self.val.shape[0])

    def describe(self) -> str:
        tokenizer = self.tokenizer.name if self.tokenizer else "pre-tokenized"
        return (
            f"{self.name}: {self.n_documents:,} documents, {self.n_train_tokens:,} train + "
            f"{self.n_val_tokens:,} val tokens (val by {self.val_rule}), {tokenizer} vocab "
            f"{self.vocab_size:,}, fingerprint {self.fingerprint}"
        )


def tokens_available(corpus: Corpus) -> int:
    """Training tokens in the corpus: a run needing more sees some tokens more than once."""
    return corpus.n_train_tokens


def epochs_needed(corpus: Corpus, total_tokens: int) -> float:
    """How many passes over the training tokens a run of total_tokens makes (> 1: repeated data)."""
    return total_tokens / corpus.n_train_tokens


def is_pretokenized(corpus: str) -> bool:
    """Whether data.corpus names .bin shards (ids given, tokenizer unused) rather than text."""
    return _find_shards(corpus) is not None


def check_corpus_exists(corpus: str) -> None:
    """ValueError unless data.corpus names a built-in corpus, an existing file or folder, or a
    glob: a cheap check (no file is read) for commands that should fail before training starts."""
    if corpus in BUILTIN_CORPORA or any(ch in corpus for ch in "*?[") or Path(corpus).expanduser().exists():
        return
    raise ValueError(
        f"data.corpus={corpus!r} is neither a built-in corpus nor an existing path; "
        f"allowed: {', '.join(BUILTIN_CORPORA)}, a text file, a folder of text files "
        f"({', '.join(sorted(TEXT_EXTENSIONS))}), or .bin shards (a folder or a glob)"
    )


def load_corpus(cfg: DataConfig, cache_dir: Path | None = None) -> Corpus:
    cache_dir = cache_dir or default_cache_dir()
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={cfg.val_fraction!r}; allowed: 0 < val_fraction < 1")
    shards = _find_shards(cfg.corpus)
    if shards is not None:
        return _load_shards(cfg, shards, cache_dir)
    nominal_vocab_size(cfg.tokenizer)  # reject a bad tokenizer name before reading anything
    return _load_documents(cfg, _find_documents(cfg.corpus), cache_dir)


# --- finding the files -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Document:
    path: Path
    rel: str  # posix path relative to the corpus root: the document's identity


def _find_documents(corpus: str) -> list[_Document]:
    if corpus == "python-stdlib":
        docs = _python_files(Path(sysconfig.get_paths()["stdlib"]), prefix="")
    elif corpus == "python-site":
        paths = sysconfig.get_paths()
        roots = {}  # realpath -> label; dict keeps purelib first
        for label in ("purelib", "platlib"):
            roots.setdefault(os.path.realpath(paths[label]), label)
        prefixed = len(roots) > 1
        docs = []
        for root, label in roots.items():
            docs += _python_files(Path(root), prefix=f"{label}/" if prefixed else "")
    else:
        check_corpus_exists(corpus)
        path = Path(corpus).expanduser()
        docs = [_Document(path, path.name)] if path.is_file() else _text_files(path)
    if not docs:
        raise ValueError(f"data.corpus={corpus!r} holds no documents")
    return sorted(docs, key=lambda d: d.rel)


def _python_files(root: Path, prefix: str) -> list[_Document]:
    docs = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _PACKAGE_DIRS and d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = Path(folder, name)
                docs.append(_Document(path, prefix + path.relative_to(root).as_posix()))
    return docs


def _text_files(root: Path) -> list[_Document]:
    docs = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(folder, name)
            if not name.startswith(".") and path.suffix.lower() in TEXT_EXTENSIONS:
                docs.append(_Document(path, path.relative_to(root).as_posix()))
    return docs


def _find_shards(corpus: str) -> list[Path] | None:
    """The .bin shards data.corpus names, or None when it names something else."""
    path = Path(corpus).expanduser()
    if path.is_file():
        return [path] if path.suffix == ".bin" else None
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.suffix == ".bin" and p.is_file())
        return shards or None
    if any(ch in corpus for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(corpus), recursive=True))
        if not matches:
            raise ValueError(f"data.corpus={corpus!r}: the glob matches no file")
        if any(p.suffix != ".bin" for p in matches):
            raise ValueError(f"data.corpus={corpus!r}: a glob must match .bin shards only")
        return matches
    return None


# --- identity --------------------------------------------------------------------------------


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def _in_val(rel: str, val_fraction: float) -> bool:
    fraction = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") / 2**64
    return fraction < val_fraction


# --- document corpora ------------------------------------------------------------------------


def _read_document(path: Path, max_bytes: int = -1) -> str:
    with open(path, "rb") as f:
        raw = f.read(max_bytes)
    return raw.decode("utf-8", errors="replace").replace(SEPARATOR_TEXT, "")


def _load_documents(cfg: DataConfig, docs: list[_Document], cache_dir: Path) -> Corpus:
    digests = file_digests([d.path for d in docs], cache_dir)
    source = {
        "format": FORMAT_VERSION,
        "files": [[d.rel, h] for d, h in zip(docs, digests)],
        "val_fraction": cfg.val_fraction,
    }
    fingerprint = _digest({**source, "tokenizer": cfg.tokenizer})
    by_documents = 0 < sum(_in_val(d.rel, cfg.val_fraction) for d in docs) < len(docs)
    tokenizer = get_tokenizer(
        cfg.tokenizer,
        training_documents=lambda: _training_text(docs, cfg.val_fraction, by_documents),
        cache_key=_digest(source),
        cache_dir=cache_dir,
    )
    target = cache_dir / "corpora" / fingerprint
    if not (target / "meta.json").is_file():
        with atomic_directory(target) as tmp:
            _tokenize_to(tmp, docs, tokenizer, cfg.val_fraction, by_documents)
    meta = json.loads((target / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return Corpus(
        name=cfg.corpus,
        train=_memmap(target / "train.bin", dtype),
        val=_memmap(target / "val.bin", dtype),
        vocab_size=tokenizer.vocab_size,
        fingerprint=fingerprint,
        n_documents=len(docs),
        val_rule=meta["val_rule"],
        tokenizer=tokenizer,
    )


def _training_text(docs: list[_Document], val_fraction: float, by_documents: bool) -> Iterator[str]:
    """The text of the train split, streamed. With the tail rule the cut is placed by bytes,
    which lands within a few tokens of the token cut that defines the split."""
    if by_documents:
        yield from (_read_document(d.path) for d in docs if not _in_val(d.rel, val_fraction))
        return
    budget = int(sum(d.path.stat().st_size for d in docs) * (1.0 - val_fraction))
    for doc in docs:
        if budget <= 0:
            return
        size = doc.path.stat().st_size
        yield _read_document(doc.path, max_bytes=min(size, budget))
        budget -= size


def _tokenize_to(
    folder: Path,
    docs: list[_Document],
    tokenizer: Tokenizer,
    val_fraction: float,
    by_documents: bool,
) -> None:
    """Write train.bin, val.bin and meta.json, encoding a bounded amount of text at a time."""
    dtype = token_dtype(tokenizer.vocab_size)
    with open(folder / "train.bin", "wb") as train_file, open(folder / "val.bin", "wb") as val_file:
        for is_val, texts in _chunks(docs, val_fraction if by_documents else 0.0):
            tokens = tokenizer.encode_documents(texts).astype(dtype, copy=False)
            tokens.tofile(val_file if is_val else train_file)
    if not by_documents:
        _hold_out_tail(folder, dtype, val_fraction)
    meta = {
        "dtype": dtype.name,
        "val_rule": "documents" if by_documents else "tail",
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "n_documents": len(docs),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _chunks(docs: list[_Document], val_fraction: float) -> Iterator[tuple[bool, list[str]]]:
    """(is_val, texts) batches in document order per split, each about _ENCODE_CHUNK_CHARS."""
    pending: dict[bool, list[str]] = {False: [], True: []}
    sizes = {False: 0, True: 0}
    for doc in docs:
        is_val = _in_val(doc.rel, val_fraction)
        text = _read_document(doc.path)
        pending[is_val].append(text)
        sizes[is_val] += len(text)
        if sizes[is_val] >= _ENCODE_CHUNK_CHARS:
            yield is_val, pending[is_val]
            pending[is_val], sizes[is_val] = [], 0
    for is_val, texts in pending.items():
        if texts:
            yield is_val, texts


def _hold_out_tail(folder: Path, dtype: np.dtype, val_fraction: float) -> None:
    """Move the last val_fraction of train.bin into val.bin (the split for few documents)."""
    n_tokens = (folder / "train.bin").stat().st_size // dtype.itemsize
    n_val = max(1, round(n_tokens * val_fraction))
    if n_tokens - n_val < 1:
        raise ValueError(f"corpus too small to split: {n_tokens} tokens")
    tokens = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
    tokens[n_tokens - n_val :].tofile(folder / "val.bin")
    del tokens
    os.truncate(folder / "train.bin", (n_tokens - n_val) * dtype.itemsize)


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


# --- pre-tokenized shards --------------------------------------------------------------------


def _load_shards(cfg: DataConfig, shards: list[Path], cache_dir: Path) -> Corpus:
    if cfg.bin_dtype not in BIN_DTYPES:
        raise ValueError(f"data.bin_dtype={cfg.bin_dtype!r}; allowed: {', '.join(BIN_DTYPES)}")
    dtype = np.dtype(cfg.bin_dtype)
    for shard in shards:
        if shard.stat().st_size % dtype.itemsize:
            raise ValueError(
                f"shard {shard} is {shard.stat().st_size} bytes, not a whole number of "
                f"{cfg.bin_dtype} tokens; is data.bin_dtype right?"
            )
    root = Path(os.path.commonpath([s.parent for s in shards]))
    val_shards = [s for s in shards if "val" in s.name.lower()]
    train_shards = [s for s in shards if s not in val_shards]
    if not train_shards:
        raise ValueError(
            f"data.corpus={cfg.corpus!r}: every shard is a validation shard (name contains 'val')"
        )
    digests = file_digests(shards, cache_dir)
    fingerprint = _digest(
        {
            "format": FORMAT_VERSION,
            "files": [[s.relative_to(root).as_posix(), h] for s, h in zip(shards, digests)],
            "tokenizer": "pre-tokenized",
            "bin_dtype": cfg.bin_dtype,
            # Only the tail rule reads val_fraction; keep it out of the identity otherwise.
            "val_fraction": None if val_shards else cfg.val_fraction,
        }
    )
    train = _concatenated(train_shards, dtype, cache_dir / "corpora" / fingerprint / "train.bin")
    if val_shards:
        val = _concatenated(val_shards, dtype, cache_dir / "corpora" / fingerprint / "val.bin")
    else:
        n_val = max(1, round(len(train) * cfg.val_fraction))
        if len(train) - n_val < 1:
            raise ValueError(f"data.corpus={cfg.corpus!r}: too few tokens to split ({len(train)})")
        train, val = train[: len(train) - n_val], train[len(train) - n_val :]
    return Corpus(
        name=cfg.corpus,
        train=train,
        val=val,
        vocab_size=_shard_vocab_size(root, (train, val)),
        fingerprint=fingerprint,
        n_documents=len(shards),
        val_rule="shards" if val_shards else "tail",
        tokenizer=None,
    )


def _concatenated(shards: list[Path], dtype: np.dtype, cached: Path) -> np.ndarray:
    """One array over the shards: the shard itself, or a cached concatenation of several."""
    if len(shards) == 1:
        return _memmap(shards[0], dtype)
    if not cached.is_file():
        with atomic_output(cached) as out:
            for shard in shards:
                with open(shard, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 24)
    return _memmap(cached, dtype)


def _shard_vocab_size(root: Path, arrays: Iterable[np.ndarray]) -> int:
    meta = root / "meta.json"
    if meta.is_file():
        return int(json.loads(meta.read_text())["vocab_size"])
    largest = 0
    for tokens in arrays:
        for start in range(0, len(tokens), _SCAN_CHUNK_TOKENS):
            largest = max(largest, int(tokens[start : start + _SCAN_CHUNK_TOKENS].max()))
    return largest + 1
