"""Pieces shared by the Triton kernels of the short convolution: index helpers inside kernels, and
host-side helpers that pick block sizes and grids.

Conventions of every kernel here (see reference.py for the operator):
- tensors are batch-first, row = b*T + t indexes [B, T, ...] tensors as [B*T, ...]; outputs are
  contiguous, and inputs read from a fused projection (x, z, w) may be views with evenly strided
  rows (a row stride argument);
- `pos` (int32 [T], only with packed sequences) is each position's index inside its own sequence, so
  x[t-k] exists iff pos[t] >= k; without packing pos[t] = t;
- the effective tap k is dynamic + static + (1 if k == 0 and residual), so the residual costs nothing;
- everything accumulates in float32; outputs are cast to their tensor's dtype on store.
Kernels use plain pointers and masks (no block pointers) so they run on Triton 3.6 to 3.9.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors through numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@torch.compiler.assume_constant_result  # (asked while torch.compile traces: triton_lowrank.backward_rotates)
@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def processor_count(device: torch.device) -> int:
    """Multiprocessors on `device` (4 when interpreting: the grid only needs a few programs)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand type of tl.dot for a given generator dtype: half types use the tensor cores natively;
    float32 runs as exact float32 ("ieee"), never tf32, so float32 results match the reference."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)


def time_chunks(T: int, batch: int, tiles_across: int, block_t: int, device: torch.device,
                programs_per_processor: int) -> tuple[int, int]:
    """Split each sequence's T rows into chunks walked by one backward program each.

    Returns (chunk_t, chunks_per_seq). Fewer, longer chunks mean fewer per-chunk partial sums to
    write and reduce; enough chunks keep every multiprocessor busy, and the last wave of programs
    should be nearly full: 384 programs in 264 slots (the grouped q/k/v convs at 300M) ran 1.45
    waves, half the chip idle in the second; 2 chunks (768 programs, 2.9 waves) took 355 us
    against 431 (H200, benchmarks/KERNELS.md). chunk_t is a multiple of block_t.
    """
    return _time_chunks(T, batch, tiles_across, block_t, programs_per_processor * processor_count(device))


@functools.lru_cache(maxsize=1024)
def _time_chunks(T: int, batch: int, tiles_across: int, block_t: int, slots: int) -> tuple[int, int]:
    """time_chunks for `slots` programs at a time, computed once per shape: every backward call asks,
    and host time per conv call is what small models' steps are made of (KERNELS.md, training
    point 22)."""
    across = max(1, batch * tiles_across)
    most = triton.cdiv(T, block_t)
    chunks = max(1, min(most, slots // across))
    while chunks < most and wave_fill(across * chunks, slots) < 0.9:
        chunks += 1
    chunk_t = triton.cdiv(triton.cdiv(T, chunks), block_t) * block_t
    return chunk_t, triton.cdiv(T, chunk_t)


def wave_fill(programs: int, slots: int) -> float:
    """Busy fraction of the slots over the waves that `programs` take."""
    return programs / (triton.cdiv(programs, slots) * slots)


class SideStream:
    """A second stream on one device, for a kernel that runs beside the current stream's: `fork()`
    makes it wait for the current stream's work so far and current (returning the stream to go back
    to), `back(main)` makes `main` current again, `join(main)` makes `main` wait for the side's work.

    Its events are made once, and the current stream is read by its raw id (torch.cuda.current_stream
    builds a Stream object per call: ~12 us of host time, where the whole fork and join costs ~5),
    because host time per call is what small models' steps are made of (KERNELS.md, training point
    22). Buffers the side's kernel uses must be allocated before `fork()` (on the main stream, which
    frees them only after `join`)."""

    def __init__(self, device_index: int) -> None:
        self.device_index = device_index
        self.stream = torch.cuda.Stream(device=device_index)
        self.forked, self.done = torch.cuda.Event(), torch.cuda.Event()
        self._streams: dict[tuple, torch.cuda.Stream] = {}  # current streams seen, by raw id

    def _current(self) -> torch.cuda.Stream:
        key = torch._C._cuda_getCurrentStream(self.device_index)  # (stream_id, device_index, device_type)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = torch.cuda.Stream(stream_id=key[0], device_index=key[1], device_type=key[2])
        return stream

    def fork(self) -> torch.cuda.Stream:
        main = self._current()
        self.forked.record(main)
        self.stream.wait_event(self.forked)
        torch.cuda.set_stream(self.stream)
        return main

    def back(self, main: torch.cuda.Stream) -> None:
        torch.cuda.set_stream(main)

    def join(self, main: torch.cuda.Stream) -> None:
        self.done.record(self.stream)
        main.wait_event(self.done)


@functools.cache
def side_stream(device_index: int) -> SideStream:
    """The SideStream of a device, made once."""
    return SideStream(device_index)


def side_by_side(on_side: Callable[[], Any], on_main: Callable[[], Any], device: torch.device | None) -> tuple:
    """(on_side(), on_main()), on_side's launches on the side stream of `device` while on_main's
    run on the current stream, which waits for the side stream before returning. Without a CUDA
    device (None, the CPU, the interpreter) both run on the current stream, one after the other.
    Buffers either uses must exist before the call (SideStream)."""
    if device is None or device.type != "cuda" or interpreting():
        return on_side(), on_main()
    side = side_stream(device.index)
    main = side.fork()
    try:
        side_result = on_side()
    finally:
        side.back(main)
    main_result = on_main()
    side.join(main)
    return side_result, main_result


@triton.jit
def seq_pos(pos_ptr, t, t_ok, HAS_POS: tl.constexpr):
    """Index of positions t inside their own sequence (t itself when sequences are not packed)."""
    p = t
    if HAS_POS:
        p = tl.load(pos_ptr + t, mask=t_ok, other=0)
    return p


@triton.jit
def mma(a, b, acc, FP32: tl.constexpr):
    """acc + a @ b on the matrix units; exact float32 products when FP32 (no tf32 rounding)."""
    if FP32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def tile_channels(pid_c, H, HS: tl.constexpr, HS_P: tl.constexpr, HEADS: tl.constexpr):
    """Heads [HEADS], channels [HEADS, HS_P] and the channel mask of channel tile pid_c: a tile holds
    whole heads of HS channels, each padded to HS_P lanes (the head-wise and static kernels)."""
    h = pid_c * HEADS + tl.arange(0, HEADS)
    lane = tl.arange(0, HS_P)
    d = h[:, None] * HS + lane[None, :]
    ok = (h < H)[:, None] & (lane < HS)[None, :]
    return h, d, ok


@triton.jit
def _sum_group_block(part_ptr, out_ptr, N, M, local, M_BLOCKS, G_STRIDE, ROW, ROW_STRIDE,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Block `local` of one job: out[g, m] = sum over n of part[g, n, m] for BLOCK_M values of m
    (float32, BLOCK_N rows at a time, always in the same order), written in out's type at
    g * G_STRIDE + (m // ROW) * ROW_STRIDE + m % ROW (contiguous: G_STRIDE = ROW = M)."""
    g = (local // M_BLOCKS).to(tl.int64)
    m = (local % M_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = (g * N + n0 + n).to(tl.int64)
        ok = ((n0 + n) < N)[:, None] & (m < M)[None, :]
        acc += tl.sum(tl.load(part_ptr + rows[:, None] * M + m[None, :], mask=ok, other=0.0), axis=0)
    at = g * G_STRIDE + (m // ROW).to(tl.int64) * ROW_STRIDE + m % ROW
    tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=m < M)


@triton.jit
def _sum_partials_kernel(
    part0, out0, N0, M0, MB0, GS0, ROW0, RS0, part1, out1, N1, M1, MB1, GS1, ROW1, RS1,
    part2, out2, N2, M2, MB2, GS2, ROW2, RS2, END0, END1,
    JOBS: tl.constexpr, BLOCK_N0: tl.constexpr, BLOCK_M0: tl.constexpr, BLOCK_N1: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_M2: tl.constexpr,
):
    """Up to three jobs in one launch: programs [0, END0) sum job 0, [END0, END1) job 1, the rest
    job 2 (MB: each job's blocks of BLOCK_M values per group; GS, ROW, RS: where its sums go, as
    _sum_group_block places them)."""
    pid = tl.program_id(0)
    if pid < END0:
        _sum_group_block(part0, out0, N0, M0, pid, MB0, GS0, ROW0, RS0, BLOCK_N0, BLOCK_M0)
    else:
        if JOBS > 1:
            if pid < END1:
                _sum_group_block(part1, out1, N1, M1, pid - END0, MB1, GS1, ROW1, RS1, BLOCK_N1, BLOCK_M1)
            else:
                if JOBS > 2:
                    _sum_group_block(part2, out2, N2, M2, pid - END1, MB2, GS2, ROW2, RS2, BLOCK_N2, BLOCK_M2)


def sum_partials(part: torch.Tensor, dtype: torch.dtype, groups: int = 1) -> torch.Tensor:
    """The kernels' float32 partial sums reduced: part [groups * N, ...] (contiguous) summed over
    each group's N leading slices in a fixed order (so results are bit-reproducible), and cast to
    `dtype` in the same pass; returns [groups, prod(...)]. One launch where torch.sum and a cast
    take two, each ~2 us even for a few hundred KB (KERNELS.md, point 21)."""
    return sum_partials_together([(part, dtype, groups)])[0]


def sum_partials_together(jobs: list[tuple]) -> list[torch.Tensor]:
    """sum_partials of up to three jobs in one launch: a backward's dz, dU and ds sums, which took a
    launch each (KERNELS.md, v21). A job is (part, dtype, groups), whose sums come back as a new
    [groups, m] tensor, or (part, dtype, groups, out): they are written into `out` instead, a tensor
    of `dtype` whose last dimension holds each group's values of one row side by side (groups *
    row columns, row-major over the other dimensions, any row stride: a view of some columns of a
    bigger gradient), and `out` itself comes back. The low-rank backward writes dz so: straight into
    its fused projection's gradient, in z's layout for grouped convs, where it was copied there after
    (training point 29)."""
    if not 1 <= len(jobs) <= 3:
        raise ValueError(f"sum_partials_together: {len(jobs)} jobs; allowed: 1 to 3")
    shapes, ends, blocks = _sums_plan(tuple((job[0].shape[0], job[0].numel(), job[2]) for job in jobs),
                                      interpreting())
    outs, args = [], []
    for (part, dtype, groups, *into), (n, m, m_blocks) in zip(jobs, shapes):
        out = into[0] if into else torch.empty(groups, m, dtype=dtype, device=part.device)
        outs.append(out)
        args += [part, out, n, m, m_blocks, *(_placement(out, dtype, groups, m) if into else (m, m, m))]
    for _ in range(len(jobs), 3):  # unused slots: job 0's arguments, never reached (JOBS)
        args += args[:8]
    _sum_partials_kernel[(ends[-1],)](*args, ends[0], ends[1], JOBS=len(jobs), **blocks, num_warps=4)
    return outs


def _placement(out: torch.Tensor, dtype: torch.dtype, groups: int, m: int) -> tuple[int, int, int]:
    """(G_STRIDE, ROW, ROW_STRIDE) of _sum_group_block for sums written into `out` (see
    sum_partials_together), after checking that `out` can take them."""
    row = out.shape[-1] // groups
    rows_even = all(out.stride(i) == out.stride(i + 1) * out.shape[i + 1] for i in range(out.dim() - 2))
    fits = out.shape[-1] == groups * row and out.numel() == groups * m and out.stride(-1) == 1 and rows_even
    if not fits or out.dtype != dtype:
        raise ValueError(f"sum_partials_together: out {tuple(out.shape)} {out.dtype} with strides {out.stride()} "
                         f"cannot take {groups} groups of {m} {dtype} sums; allowed: rows of groups x row values "
                         "of that dtype, unit column stride")
    return row, row, out.stride(-2)


@functools.lru_cache(maxsize=1024)
def _sums_plan(jobs: tuple[tuple[int, int, int], ...], interpret: bool) -> tuple[tuple, tuple, dict]:
    """sum_partials_together's launch for jobs of (leading size, numel, groups), worked out once per
    shape (host time per backward call counts, KERNELS.md training point 22): each job's (n, m,
    m_blocks), the programs' ends and the block sizes (a dict: callers must not change it)."""
    shapes, ends, blocks = [], [], {}
    for j, (rows, numel, groups) in enumerate(jobs):
        n, m = rows // groups, numel // rows
        # 64 rows per step and 16 values per thread where n is a multiple of 64 (the head-wise and
        # static backwards' partials: one row per program), else 16 rows and 64 values. 64-row steps
        # everywhere (v20) lost where n is not a multiple: at n = 44 (the 300M gate conv's channel
        # tiles) a step loads 20 masked rows, 35.6 against 28.1 us (H200, training point 29); 16-row
        # steps everywhere (v35) cut the programs to a quarter where m is small, and the head-wise
        # backward's ds sums (m = W x D) took the paper's hs=16 backward from 65 to 79 us (v37).
        block_n = 64 if n % 64 == 0 else min(16, next_pow2(n))
        block_m = 16 if interpret else min(1024, max(128, 8192 // block_n))
        m_blocks = triton.cdiv(m, block_m)
        shapes.append((n, m, m_blocks))
        ends.append((ends[-1] if ends else 0) + m_blocks * groups)  # this job's programs end here
        blocks |= {f"BLOCK_N{j}": block_n, f"BLOCK_M{j}": block_m}
    for j in range(len(jobs), 3):  # unused slots end where the last job does (JOBS)
        ends.append(ends[-1])
        blocks |= {f"BLOCK_N{j}": blocks["BLOCK_N0"], f"BLOCK_M{j}": blocks["BLOCK_M0"]}
    return tuple(shapes), tuple(ends), blocks
