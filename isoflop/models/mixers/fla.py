"""The optional fla-core bridge: flash-linear-attention's Triton kernels for both recurrences.

fla-core (the `fla` extra: pip install 'isoflop[fla]') is imported on first use, and only when a
call could go to it: CUDA tensors in bfloat16 or float16 (its chunked kernels refuse float32). A
missing or broken install (an ImportError, or a Triton it does not work with) falls back to the
PyTorch reference, with one warning saying why. Mamba-2's scan runs as `chunk_simple_gla` (its
recurrence is linear attention with a scalar decay per head: C, B, dt * x as query, key, value,
scale 1) and Gated DeltaNet's as `chunk_gated_delta_rule`; both take packed documents (cu_seqlens)
natively. Written against fla-core's [B, T, H, ...] layout (the default since its 0.2 releases).

fla-core refuses the backward of both gated kernels on Hopper GPUs with Triton 3.4.0 to 3.7.0
(those releases miscompile it: wrong gradients, fla issue #640) unless tilelang is installed. The
refusal comes only in the backward, after the forward ran, so `use_fla` checks that combination up
front: there, calls that need gradients (training) run the reference, and calls that do not (eval,
generation) still run fla-core.

Backend: "auto" (default) uses fla where it can and the reference elsewhere; "reference" always the
reference; "fla" insists (a call fla cannot take raises, saying why). Pick it with `set_backend` or
the environment variable ISOFLOP_MIXER_KERNELS. Decode steps always run the reference step.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from isoflop.backends import BackendChoice

BACKENDS = ("auto", "reference", "fla")
FLA_DTYPES = (torch.bfloat16, torch.float16)


_choice = BackendChoice("ISOFLOP_MIXER_KERNELS", BACKENDS, "mixer backend")


def set_backend(name: str) -> None:
    """Choose the recurrence kernels for every later call: "auto", "reference" or "fla"."""
    _choice.set(name)


def get_backend() -> str:
    return _choice.get()


@functools.cache
def _load() -> tuple[dict[str, Callable[..., Any]] | None, str]:
    """fla-core's two ops, or None and the reason they cannot be used."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as exc:  # noqa: BLE001 - a broken install must fall back, not stop a run
        return None, f"fla-core cannot be imported ({type(exc).__name__}: {exc})"
    return {"ssd": chunk_simple_gla, "gated_delta_rule": chunk_gated_delta_rule}, ""


def available() -> bool:
    """Whether fla-core imports here."""
    return _load()[0] is not None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@functools.cache
def backward_problem() -> str:
    """Why fla-core's gated backward cannot run on this machine, or "" where it can."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return ""
    if importlib.util.find_spec("tilelang") is not None:  # fla-core's fix: its tilelang backward
        return ""
    import triton

    if (3, 4, 0) <= _version(triton.__version__) < (3, 7, 1):
        return (f"fla-core refuses its gated backward on Hopper with Triton {triton.__version__} "
                "(3.4.0 to 3.7.0 give wrong gradients, fla issue #640; Triton >= 3.7.1 or "
                "tilelang lifts it)")
    return ""


def use_fla(activations: Tensor, needs_grad: bool = False) -> bool:
    """Whether a recurrence over these activations (the mixer's projections) runs on fla-core;
    needs_grad: the call will be differentiated."""
    if _choice.name == "reference":
        return False
    suitable = activations.is_cuda and activations.dtype in FLA_DTYPES
    ops, reason = _load()
    return decide(
        _choice.name, suitable, reason if ops is None else "",
        backward_problem() if needs_grad and suitable else "",
        f"{activations.device.type} {activations.dtype}",
    )


def decide(backend: str, suitable: bool, import_problem: str, grad_problem: str, got: str) -> bool:
    """use_fla's rule, apart from the machine: "fla" insists (raises if it cannot), "auto" takes
    fla-core where the tensors suit it and nothing stands in the way (warning once if something
    does), "reference" never."""
    if backend == "reference":
        return False
    if backend == "fla":
        if import_problem:
            raise RuntimeError(f"mixer backend 'fla' was asked for, but {import_problem}")
        if not suitable:
            raise ValueError(
                f"mixer backend 'fla' needs CUDA tensors in {', '.join(map(str, FLA_DTYPES))}; got "
                f"{got}"
            )
        if grad_problem:
            raise RuntimeError(f"mixer backend 'fla' was asked for a training step, but {grad_problem}")
        return True
    if suitable and import_problem:
        _warn_once(f"{import_problem}; the recurrent mixers run the PyTorch reference")
    elif suitable and grad_problem:
        _warn_once(f"{grad_problem}; training steps run the PyTorch reference")
    return suitable and not import_problem and not grad_problem


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def ssd(x: Tensor, a: Tensor, B: Tensor, C: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """Mamba-2's scan (see ssd.py for shapes) on fla-core; x, B in C's dtype, a in float32."""
    ops = _load()[0]
    y, _ = ops["ssd"](
        q=C, k=B.to(C.dtype), v=x.to(C.dtype), g=a.float(), scale=1.0, cu_seqlens=cu_seqlens
    )
    return y


def gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
    cu_seqlens: Tensor | None,
) -> Tensor:
    """Gated DeltaNet's scan (see delta_rule.py for shapes) on fla-core."""
    ops = _load()[0]
    o, _ = ops["gated_delta_rule"](
        q=q, k=k.to(q.dtype), v=v.to(q.dtype), g=g.float(), beta=beta.to(q.dtype), scale=scale,
        cu_seqlens=cu_seqlens,
    )
    return o
