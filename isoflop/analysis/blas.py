"""One OpenBLAS thread while fitting.

The fits make many tiny BLAS calls (L-BFGS-B's updates, 5x5 solves, 200x5 products). OpenBLAS
hands even these to its worker threads, which on a busy 2-core machine wait for each other: L-BFGS-B
was measured 10x slower with the default threads than with one, and 40x slower once torch (with its
own OpenMP pool) was imported in the same process, as in the test suite. One thread is never slower
for these sizes.

OpenBLAS has no Python handle, so the loaded libraries are found in /proc/self/maps and their
`*openblas_set_num_threads*` entry points called through ctypes (threadpoolctl's method, without
the dependency). Where that is not possible (not Linux, another BLAS) this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from pathlib import Path

_SETTERS = ("openblas_set_num_threads", "openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_")
_GETTERS = ("openblas_get_num_threads", "openblas_get_num_threads64_",
            "scipy_openblas_get_num_threads", "scipy_openblas_get_num_threads64_")


@functools.cache
def _openblas_controls() -> tuple[tuple[object, object], ...]:
    """(getter, setter) of every OpenBLAS loaded in this process."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return ()
    paths = sorted({line.split()[-1] for line in maps.read_text().splitlines()
                    if "openblas" in line.lower() and line.split()[-1].startswith("/")})
    controls = []
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        getter = next((getattr(library, n) for n in _GETTERS if hasattr(library, n)), None)
        setter = next((getattr(library, n) for n in _SETTERS if hasattr(library, n)), None)
        if getter is not None and setter is not None:
            setter.argtypes = [ctypes.c_int]
            controls.append((getter, setter))
    return tuple(controls)


@contextlib.contextmanager
def single_blas_thread() -> Iterator[None]:
    """Run the body with every loaded OpenBLAS on one thread; restore the counts after."""
    controls = _openblas_controls()
    before = [getter() for getter, _ in controls]
    for _, setter in controls:
        setter(1)
    try:
        yield
    finally:
        for (_, setter), count in zip(controls, before):
            setter(count)
