"""Shared pytest setup: tests marked `gpu` are skipped where CUDA is absent, and the Triton
interpreter's tests start in their own process as soon as the session is collected."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

INTERPRETER_SUITE = "test_kernels_triton.py::test_interpreter_suite"
# Read once, before collection imports anything: benchmarks/kernel_resources.py drops the variable
# from os.environ when imported, and the interpreter's own process must never start another.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_SUITE = pytest.StashKey[tuple]()

# Keep the suite's caches (corpus tokens, BPE merges) out of the user's home.
os.environ.setdefault("ISOFLOP_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "isoflop"))


def _patch_triton_language_once_per_launch() -> None:
    """Under TRITON_INTERPRET=1, Triton (3.6-3.9) re-patches triton.language's builtins at every call
    of a nested @triton.jit function, though the kernel's launch has patched the same modules for its
    whole run; the head-wise walks call helpers per row and tap, and that re-patching was a third of
    the interpreter suite's time. Here a nested call whose language modules are patched already skips
    it, and the launch's own restore ends the launch. The values are the same either way. Where
    Triton's interpreter lacks these internals, nothing changes."""
    try:
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    if not (hasattr(interpreter, "_patch_lang") and hasattr(interpreter, "_LangPatchScope")):
        return
    patch_lang, patched = interpreter._patch_lang, set()

    def patch_lang_once(fn):
        langs = {id(value) for value in fn.__globals__.values() if inspect.ismodule(value) and value in (tl, tl.core)}
        if patched and langs <= patched:  # a nested call inside a launch that patched them
            return interpreter._LangPatchScope()
        scope = patch_lang(fn)
        if not patched:  # the launch's own patch (launches do not nest): its restore ends the launch
            restore = scope.restore

            def restore_and_forget():
                patched.clear()
                restore()

            scope.restore = restore_and_forget
        patched.update(langs)
        return scope

    interpreter._patch_lang = patch_lang_once


if INTERPRETING:
    _patch_triton_language_once_per_launch()


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.hookimpl(trylast=True)  # after -k, -m and --deselect have chosen the items
def pytest_collection_modifyitems(config, items):
    suite = [item for item in items if item.nodeid.endswith(INTERPRETER_SUITE)]
    if suite and not INTERPRETING and not config.option.collectonly:
        # Its subprocess runs on the second core while this process runs the rest; the test that
        # waits for it goes last.
        items.remove(suite[0])
        items.append(suite[0])
        start_interpreter_suite(config)
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); run `make gpu-test` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def start_interpreter_suite(config) -> tuple:
    """tests/test_kernels_triton.py's interpreter tests under TRITON_INTERPRET=1 (it must be set before
    Triton is imported, hence a process of their own), started once per session: (Popen, log path)."""
    if _SUITE not in config.stash:
        tests = Path(__file__).parent
        handle, name = tempfile.mkstemp(prefix="isoflop-interpreter-suite-", suffix=".log")
        os.close(handle)
        log = Path(name)
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not gpu",
               str(tests / "test_kernels_triton.py")]
        with log.open("w") as out:
            process = subprocess.Popen(cmd, cwd=tests.parent, stdout=out, stderr=subprocess.STDOUT,
                                       env={**os.environ, "TRITON_INTERPRET": "1"})
        config.stash[_SUITE] = (process, log)
    return config.stash[_SUITE]


def pytest_unconfigure(config):
    """A session that ends before test_interpreter_suite ran (-x, ^C) leaves no process behind."""
    process, log = config.stash.get(_SUITE, (None, None))
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()
    if log is not None:
        log.unlink(missing_ok=True)


@pytest.fixture
def interpreter_suite(request) -> tuple:
    """The interpreter suite's process and log (started now if collection did not start it); never
    inside the interpreter's own process, which would start another, and so on."""
    if INTERPRETING:
        pytest.skip("already interpreting")
    return start_interpreter_suite(request.config)


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
