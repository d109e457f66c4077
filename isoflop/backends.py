"""A process-wide choice of compute backend ("auto" or a named implementation), settable from the
environment or in code. The short-conv kernels and the Mamba-2 / Gated DeltaNet recurrences each
keep one, so a test or a benchmark can pin the reference path without touching call sites."""

from __future__ import annotations

import os


class BackendChoice:
    def __init__(self, env: str, allowed: tuple[str, ...], what: str) -> None:
        self.env, self.allowed, self.what = env, allowed, what
        self.name = self._validated(os.environ.get(env, "auto"), env)

    def _validated(self, name: str, source: str) -> str:
        if name not in self.allowed:
            raise ValueError(f"{source}={name!r} is not a {self.what}; allowed: {', '.join(self.allowed)}")
        return name

    def set(self, name: str) -> None:
        self.name = self._validated(name, "backend")

    def get(self) -> str:
        return self.name
