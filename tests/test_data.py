"""Corpora, the cache and the batch loader, on real files (stdlib, temporary folders, shards)."""

import json
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from isoflop.data import epochs_needed, is_pretokenized, load_corpus, tokens_available
from isoflop.data.cache import atomic_directory, atomic_output, default_cache_dir
from isoflop.data.corpora import _find_documents
from isoflop.data.loader import BatchSampler, eval_windows
from isoflop.runspec import DataConfig


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache, through the environment variable real runs use."""
    monkeypatch.setenv("ISOFLOP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_documents(folder: Path, n: int, start: int = 0) -> dict[str, str]:
    """n small files whose text is unique to each, so tokens can be traced to their file."""
    texts = {}
    for i in range(start, start + n):
        name = f"sub{i % 3}/doc_{i:03d}.txt"
        texts[name] = f"<marker {i:03d}> " + "text of document %d. " % i * (1 + i % 4)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(texts[name])
    return texts


def decoded(tokens: np.ndarray) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8)).decode()


# --- the standard library corpus -------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("stdlib-cache")


def test_stdlib_corpus_loads_and_reloads_from_cache(stdlib_cache):
    start = time.perf_counter()
    corpus = load_corpus(DataConfig(corpus="python-stdlib"), cache_dir=stdlib_cache)
    cold = time.perf_counter() - start
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    n_files = sum(
        1
        for p in stdlib.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(stdlib).parts)
    )
    assert corpus.n_documents == n_files > 500
    assert corpus.vocab_size == 256 and corpus.train.dtype == np.uint16
    assert corpus.n_train_tokens > 5_000_000 and corpus.val_rule == "documents"
    # Every document ends with the separator (NUL is removed from the text itself).
    assert (corpus.train == 0).sum() + (corpus.val == 0).sum() == n_files
    assert 0.002 < corpus.n_val_tokens / (corpus.n_train_tokens + corpus.n_val_tokens) < 0.08
    assert "import " in decoded(corpus.train[:200_000])
    assert str(corpus.n_documents) in corpus.describe().replace(",", "")

    start = time.perf_counter()
    again = load_corpus(DataConfig(corpus="python-stdlib"), cache_dir=stdlib_cache)
    assert time.perf_counter() - start < cold
    assert isinstance(again.train, np.memmap)
    assert again.fingerprint == corpus.fingerprint
    assert np.array_equal(again.train, corpus.train) and np.array_equal(again.val, corpus.val)
    assert tokens_available(corpus) == corpus.n_train_tokens
    assert epochs_needed(corpus, 2 * corpus.n_train_tokens) == 2.0


def test_default_cache_dir_follows_environment(private_cache, monkeypatch):
    assert default_cache_dir() == private_cache
    monkeypatch.delenv("ISOFLOP_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "isoflop"


# --- document corpora from folders and files -------------------------------------------------


def test_folder_split_is_disjoint_and_stable_when_files_are_added(tmp_path, private_cache):
    folder = tmp_path / "docs"
    texts = write_documents(folder, 60)
    (folder / "skipped.bin.bak").write_text("<marker 999>")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "x.txt").write_text("<marker 998>")
    assert not is_pretokenized(str(folder)) and not is_pretokenized("python-stdlib")
    corpus = load_corpus(DataConfig(corpus=str(folder), val_fraction=0.2))
    assert corpus.n_documents == 60 and corpus.val_rule == "documents"
    train, val = decoded(corpus.train), decoded(corpus.val)
    in_val = {name for name, text in texts.items() if text in val}
    in_train = {name for name, text in texts.items() if text in train}
    assert not in_val & in_train and in_val | in_train == set(texts)
    assert 3 <= len(in_val) <= 25
    assert "<marker 99" not in train + val
    # Documents come in sorted order of their relative path, each followed by the separator.
    train_names = sorted(in_train)
    assert train == "".join(texts[name] + "\x00" for name in train_names)

    texts.update(write_documents(folder, 30, start=60))
    grown = load_corpus(DataConfig(corpus=str(folder), val_fraction=0.2))
    grown_val = decoded(grown.val)
    assert {name for name in texts if texts[name] in grown_val} >= in_val
    assert grown.fingerprint != corpus.fingerprint


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe-300"])
def test_single_text_file_holds_out_the_tail(tmp_path, tokenizer):
    path = tmp_path / "book.txt"
    text = "".join(f"Line {i}: in the beginning.\n" for i in range(2000))
    path.write_text(text + "\x00")  # NUL is stripped from documents
    corpus = load_corpus(DataConfig(corpus=str(path), tokenizer=tokenizer, val_fraction=0.1))
    assert corpus.val_rule == "tail" and corpus.n_documents == 1
    everything = np.concatenate([corpus.train, corpus.val])
    assert corpus.tokenizer.decode(everything.tolist()) == text + "\x00"
    assert corpus.n_val_tokens == round(len(everything) * 0.1)


def test_python_site_lists_every_site_packages_module():
    # Loading it tokenizes hundreds of MB (seconds, and the same code path as the stdlib corpus),
    # so only the file discovery is checked here.
    paths = sysconfig.get_paths()
    roots = {Path(paths[key]).resolve() for key in ("purelib", "platlib")}
    expected = sorted(p.relative_to(root).as_posix() for root in roots for p in root.rglob("*.py"))
    documents = _find_documents("python-site")
    assert [d.rel for d in documents] == expected and len(expected) > 100
    assert "numpy/__init__.py" in expected


def test_fingerprint_is_deterministic_and_names_the_tokens(tmp_path):
    folder = tmp_path / "docs"
    write_documents(folder, 20)
    base = DataConfig(corpus=str(folder))
    first = load_corpus(base, cache_dir=tmp_path / "cache-a")
    second = load_corpus(base, cache_dir=tmp_path / "cache-b")
    assert first.fingerprint == second.fingerprint
    assert len(first.fingerprint) == 16 and int(first.fingerprint, 16) >= 0
    assert np.array_equal(first.train, second.train)
    changed_fraction = load_corpus(DataConfig(corpus=str(folder), val_fraction=0.3))
    changed_tokenizer = load_corpus(DataConfig(corpus=str(folder), tokenizer="bpe-300"))
    fingerprints = {first.fingerprint, changed_fraction.fingerprint, changed_tokenizer.fingerprint}
    assert len(fingerprints) == 3
    (folder / "sub0" / "doc_000.txt").write_text("edited")
    assert load_corpus(base).fingerprint != first.fingerprint


def test_bpe_corpus_encodes_with_the_trained_tokenizer(tmp_path, private_cache):
    folder = tmp_path / "docs"
    texts = write_documents(folder, 40)
    corpus = load_corpus(DataConfig(corpus=str(folder), tokenizer="bpe-300", val_fraction=0.2))
    assert corpus.tokenizer is not None and corpus.vocab_size == corpus.tokenizer.vocab_size <= 300
    assert corpus.train.max() < corpus.vocab_size
    separator = corpus.tokenizer.separator_id
    assert (corpus.train == separator).sum() + (corpus.val == separator).sum() == 40
    train_texts = corpus.tokenizer.decode(corpus.train.tolist()).split("\x00")[:-1]
    val_texts = corpus.tokenizer.decode(corpus.val.tolist()).split("\x00")[:-1]
    assert train_texts == [text for _, text in sorted(texts.items()) if text in train_texts]
    assert sorted(train_texts + val_texts) == sorted(texts.values())
    assert len(list((private_cache / "tokenizers").glob("bpe-300-*.json"))) == 1
    cached = load_corpus(DataConfig(corpus=str(folder), tokenizer="bpe-300", val_fraction=0.2))
    assert np.array_equal(cached.train, corpus.train)


# --- pre-tokenized shards ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_shards_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    high = 50_000 if dtype == "uint16" else 100_000
    parts = [rng.integers(0, high, size=n).astype(dtype) for n in (1000, 1500)]
    val = rng.integers(0, high, size=300).astype(dtype)
    folder = tmp_path / "shards"
    folder.mkdir()
    parts[0].tofile(folder / "train_000.bin")
    parts[1].tofile(folder / "train_001.bin")
    val.tofile(folder / "val_000.bin")
    assert is_pretokenized(str(folder)) and is_pretokenized(str(folder / "val_000.bin"))
    corpus = load_corpus(DataConfig(corpus=str(folder), bin_dtype=dtype))
    assert corpus.train.dtype == np.dtype(dtype) and corpus.val_rule == "shards"
    assert np.array_equal(corpus.train, np.concatenate(parts))
    assert np.array_equal(corpus.val, val)
    expected_vocab = int(max(p.max() for p in [*parts, val])) + 1
    assert corpus.vocab_size == expected_vocab and corpus.tokenizer is None
    # A glob names the same shards; the same bytes give the same fingerprint.
    by_glob = load_corpus(DataConfig(corpus=str(folder / "*.bin"), bin_dtype=dtype))
    assert by_glob.fingerprint == corpus.fingerprint
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 131072}))
    assert load_corpus(DataConfig(corpus=str(folder), bin_dtype=dtype)).vocab_size == 131072


def test_bin_shard_without_val_holds_out_the_tail(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    tokens.tofile(tmp_path / "corpus.bin")
    corpus = load_corpus(DataConfig(corpus=str(tmp_path / "corpus.bin"), val_fraction=0.05))
    assert corpus.val_rule == "tail" and corpus.vocab_size == 1000
    assert np.array_equal(corpus.train, tokens[:950]) and np.array_equal(corpus.val, tokens[950:])
    other = load_corpus(DataConfig(corpus=str(tmp_path / "corpus.bin"), val_fraction=0.1))
    assert other.fingerprint != corpus.fingerprint


def test_bin_shards_of_the_wrong_dtype_are_refused(tmp_path):
    np.arange(11, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(ValueError, match="data.bin_dtype"):
        load_corpus(DataConfig(corpus=str(tmp_path), bin_dtype="uint32"))
    with pytest.raises(ValueError, match=r"data\.bin_dtype='int8'; allowed: uint16, uint32"):
        load_corpus(DataConfig(corpus=str(tmp_path), bin_dtype="int8"))


# --- errors -----------------------------------------------------------------------------------


def test_unknown_corpus_names_key_value_and_choices():
    with pytest.raises(ValueError) as err:
        load_corpus(DataConfig(corpus="wikitext-103"))
    message = str(err.value)
    assert "data.corpus='wikitext-103'" in message
    for allowed in ["python-stdlib", "python-site", "text file", ".txt", ".bin shards"]:
        assert allowed in message


def test_bad_settings_are_refused_before_reading(tmp_path):
    write_documents(tmp_path / "docs", 3)
    with pytest.raises(ValueError, match=r"data\.tokenizer='wordpiece'"):
        load_corpus(DataConfig(corpus=str(tmp_path / "docs"), tokenizer="wordpiece"))
    with pytest.raises(ValueError, match=r"data\.val_fraction=0\.0; allowed: 0 < val_fraction < 1"):
        load_corpus(DataConfig(corpus=str(tmp_path / "docs"), val_fraction=0.0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no documents"):
        load_corpus(DataConfig(corpus=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="matches no file"):
        load_corpus(DataConfig(corpus=str(tmp_path / "nothing-*.bin")))


# --- the cache ---------------------------------------------------------------------------------


def test_interrupted_cache_writes_leave_nothing_to_load(tmp_path):
    target_dir, target_file = tmp_path / "entry", tmp_path / "file.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target_dir) as tmp:
            (tmp / "train.bin").write_bytes(b"half")
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target_file) as f:
            f.write(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target_dir) as tmp:
        (tmp / "meta.json").write_text("{}")
    with atomic_directory(target_dir) as tmp:  # a second writer finds the entry published
        (tmp / "meta.json").write_text("late")
    assert (target_dir / "meta.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


# --- the loader -------------------------------------------------------------------------------


TOKENS = np.arange(10_000, dtype=np.uint16)  # token value = position: windows are traceable


def test_batches_are_windows_with_shifted_targets():
    x, y = BatchSampler(TOKENS, batch_size=4, seq_len=16, seed=0).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        start = int(row_x[0])
        assert np.array_equal(row_x, TOKENS[start : start + 16])
        assert np.array_equal(row_y, TOKENS[start + 1 : start + 17])


def test_resumed_sampler_replays_the_uninterrupted_batches():
    straight = BatchSampler(TOKENS, batch_size=3, seq_len=8, seed=7)
    expected = [straight.next_batch() for _ in range(6)]
    first = BatchSampler(TOKENS, batch_size=3, seq_len=8, seed=7)
    for _ in range(2):
        first.next_batch()
    state = first.state_dict()
    assert state == {"step": 2, "seed": 7}
    resumed = BatchSampler(TOKENS, batch_size=3, seq_len=8, seed=7)
    resumed.load_state_dict(state)
    for want in expected[2:]:
        got = resumed.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    other_seed = BatchSampler(TOKENS, batch_size=3, seq_len=8, seed=8).next_batch()
    assert not torch.equal(other_seed[0], expected[0][0])
    assert not torch.equal(expected[1][0], expected[0][0])
    with pytest.raises(ValueError, match="seed 7 but this sampler has seed 8"):
        BatchSampler(TOKENS, batch_size=3, seq_len=8, seed=8).load_state_dict(state)


def test_eval_windows_are_fixed_disjoint_and_spread():
    batches = eval_windows(TOKENS, batch_size=4, seq_len=32, n_tokens=32 * 10)
    again = eval_windows(TOKENS, batch_size=4, seq_len=32, n_tokens=32 * 10)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    starts = [int(row[0]) for x, _ in batches for row in x.numpy()]
    assert starts[0] == 0 and starts == sorted(starts)
    assert min(np.diff(starts)) >= 32 and starts[-1] > 0.85 * len(TOKENS)
    shifted = eval_windows(TOKENS, batch_size=4, seq_len=32, n_tokens=32 * 10, seed=1)
    assert not torch.equal(shifted[0][0], batches[0][0])
    # Asking for more than fits gives every disjoint window once.
    short = np.arange(100, dtype=np.uint16)
    windows = eval_windows(short, batch_size=8, seq_len=10, n_tokens=10_000)
    targets = torch.cat([y for _, y in windows]).flatten()
    assert len(targets) == 90 and len(set(targets.tolist())) == 90


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="has 16 tokens; a window of seq_len=16 needs at least 17"):
        BatchSampler(np.zeros(16, dtype=np.uint16), batch_size=1, seq_len=16, seed=0)
    with pytest.raises(ValueError, match="evaluation token array has 5 tokens"):
        eval_windows(np.zeros(5, dtype=np.uint16), batch_size=1, seq_len=8, n_tokens=64)


def test_windows_of_a_real_corpus(tmp_path):
    write_documents(tmp_path / "docs", 30)
    corpus = load_corpus(DataConfig(corpus=str(tmp_path / "docs"), val_fraction=0.3))
    x, _ = BatchSampler(corpus.train, batch_size=2, seq_len=32, seed=0).next_batch()
    assert x.max() < corpus.vocab_size and decoded(x[0].numpy()) in decoded(corpus.train)
    assert eval_windows(corpus.val, batch_size=2, seq_len=32, n_tokens=64)
