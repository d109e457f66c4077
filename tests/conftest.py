"""Shared pytest setup: tests marked `gpu` are skipped where CUDA is absent."""

import os

import pytest

# Keep the suite's caches (corpus tokens, BPE merges) out of the user's home.
os.environ.setdefault("ISOFLOP_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "isoflop"))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); run `make gpu-test` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests train tiny models: one thread is fastest, and two OpenMP threads fighting another
    process on a 2-core machine make every op ~10x slower."""
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def corpus(tmp_path):
    """A small text corpus: a few standard-library modules, enough for train and val windows."""
    import json
    import textwrap
    from pathlib import Path

    folder = tmp_path / "corpus"
    folder.mkdir()
    for module in (json, textwrap, os):
        (folder / Path(module.__file__).name).write_text(Path(module.__file__).read_text())
    return folder


@pytest.fixture
def float64():
    """Default dtype float64 for the test (comparisons where only rounding may differ)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
