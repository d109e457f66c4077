"""Tokenizers: byte and BPE round trips, the separator, BPE caching and determinism."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from isoflop.data.tokenizers import (
    ByteTokenizer,
    get_tokenizer,
    nominal_vocab_size,
    token_dtype,
    train_bpe,
)

SAMPLES = [
    "",
    "hello world",
    "déjà vu — ✓ 日本語 🙂",
    "def f(x):\n    return x ** 2\n\n\tindent",
    "a" * 300,
]


def tiny_corpus() -> list[str]:
    """About 40 KB of varied, repetitive text: enough pairs for a 300-token BPE in under 1 s."""
    words = ["alpha", "beta", "gamma", "delta", "lambda", "return", "import", "value", "self"]
    rng = np.random.default_rng(0)
    docs = []
    for i in range(60):
        body = " ".join(words[j] for j in rng.integers(0, len(words), size=100))
        docs.append(f"# document {i}\ndef f_{i}(x):\n    {body}\n")
    return docs


def test_bytes_round_trip_and_separator():
    tok = get_tokenizer("bytes")
    assert (tok.name, tok.vocab_size, tok.separator_id) == ("bytes", 256, 0)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    joined = tok.encode_documents(["ab", "", "é"])
    assert joined.tolist() == [97, 98, 0, 0, 0xC3, 0xA9, 0]


def test_names_and_dtypes():
    assert nominal_vocab_size("bytes") == 256
    assert nominal_vocab_size("bpe-4096") == 4096
    for bad in ["bpe", "bpe-12", "bpe-x", "BPE-4096", "sentencepiece", "bpe-4096 "]:
        expected = r"data\.tokenizer=.*allowed: 'bytes' or 'bpe-<vocab>'"
        with pytest.raises(ValueError, match=expected):
            nominal_vocab_size(bad)
    assert token_dtype(256) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_bpe_trains_to_size_and_round_trips():
    tok = train_bpe(300, tiny_corpus())
    assert tok.name == "bpe-300" and tok.vocab_size == 300
    assert tok.separator_id == 0 and tok.encode("\x00") == [0]
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    # Merges compress: the corpus' own text needs far fewer tokens than bytes.
    doc = tiny_corpus()[0]
    assert len(tok.encode(doc)) < 0.5 * len(doc.encode())
    joined = tok.encode_documents(tiny_corpus()[:3])
    assert (joined == 0).sum() == 3 and joined[-1] == 0
    assert joined.tolist() == sum((tok.encode(d) + [0] for d in tiny_corpus()[:3]), [])


def test_bpe_is_cached_under_its_key(tmp_path):
    calls = []

    def documents():
        calls.append(1)
        return iter(tiny_corpus())

    first = get_tokenizer("bpe-300", documents, cache_key="k1", cache_dir=tmp_path)
    cached = tmp_path / "tokenizers" / "bpe-300-k1.json"
    assert cached.is_file() and len(calls) == 1
    again = get_tokenizer("bpe-300", documents, cache_key="k1", cache_dir=tmp_path)
    assert len(calls) == 1  # loaded, not retrained
    text = "lambda value return self"
    assert again.encode(text) == first.encode(text)
    assert not list(cached.parent.glob(".tmp-*"))
    with pytest.raises(ValueError, match="not cached"):
        get_tokenizer("bpe-300", None, cache_key="other", cache_dir=tmp_path)


def test_bpe_training_is_deterministic_across_processes(tmp_path):
    # Rust hash maps are seeded per process, so only a fresh interpreter exposes order effects.
    corpus_file = tmp_path / "docs.json"
    corpus_file.write_text(json.dumps(tiny_corpus()))
    script = (
        "import json, sys; from isoflop.data.tokenizers import train_bpe; "
        "print(train_bpe(300, json.load(open(sys.argv[1]))).to_json())"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(corpus_file)], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == json.loads(train_bpe(300, tiny_corpus()).to_json())


def test_bytes_decode_rejects_non_bytes():
    with pytest.raises(ValueError):
        ByteTokenizer().decode([300])


def test_tokenizer_module_does_not_import_torch():
    script = "import sys, isoflop.data; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parent.parent)
