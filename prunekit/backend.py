"""How the engine's steps run on this device: the engine's algorithm stays the same everywhere, and
what is specific to a CPU (or a GPU) lives here, behind the few names ``Backend`` offers:

- ``batch_tokens`` — tokens per activation micro-batch (small on a CPU, so intermediates are reused
  rather than page-faulted);
- ``tune_allocator`` / ``release_memory`` — glibc's allocator keeps freed blocks for the next batch
  while a layer is processed, and gives them back to the kernel once a layer is done;
- ``gemms(layer)`` — on CPUs without native bf16/fp16 dot products (known from the CPU's flags, never
  from a timing, so the choice and the checkpoint do not depend on the machine's load), half-precision
  Linears run as fp32 GEMMs (same products, accumulated in fp32);
- ``replace_weight`` — the solved weight copied in stripes of contiguous rows, with W − W′ kept for the
  error measurement;
- ``solve_groups`` — on a multi-core CPU, a helper thread prepares (factorises) the next groups while
  this one solves, for methods that have a ``prepare`` step.

On CUDA ``gemms`` is the layer's own forward and groups are solved one after the other; the allocator
calls act on host memory (glibc's heaps, where streamed weights are read) whatever the device, and do
nothing where glibc is not the allocator. The results never depend on the backend.
"""

from __future__ import annotations

import ctypes
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Callable

import torch

from prunekit.models import linear_sublayers

CPU_BATCH_TOKENS = 2048  # per micro-batch on the CPU: intermediates stay small enough to be reused, not page-faulted
GPU_BATCH_TOKENS = 8192

# ------------------------------------------------------------------------------------------- allocator

MMAP_THRESHOLD = 64 << 20  # blocks above this (Hessians of wide layers, weights) are still mapped and unmapped
TRIM_THRESHOLD = 256 << 20  # free memory kept at the top of the heap for the next batch
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_ALLOCATOR_TUNED = False


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def keep_freed_memory() -> None:
    """Let glibc reuse freed large blocks instead of returning them to the kernel.

    By default glibc serves allocations above its (dynamic) mmap threshold with fresh mappings and
    unmaps them on free, and trims free memory at the top of the heap, so the activations of every
    batch are page-faulted in anew (4 KB at a time: ~0.6 s per GB). With a 64 MB mmap threshold
    and a 256 MB trim threshold the activations of one batch reuse the memory of the previous one
    (~10 % less time on the CPU), while big long-lived blocks stay mapped, so the peak memory does
    not grow. Once per process, Linux/glibc only; PRUNEKIT_MALLOC_TUNING=0 turns it off."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("PRUNEKIT_MALLOC_TUNING") == "0":
        return
    _ALLOCATOR_TUNED = True
    libc = _glibc()
    try:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except AttributeError:  # a libc without mallopt
        pass


def release_freed_memory() -> None:
    """Give the free memory of every malloc arena back to the kernel (glibc's ``malloc_trim(0)``).

    ``keep_freed_memory`` keeps freed blocks in the heap so that the next batch reuses them; once a
    layer is done, its weights, statistics and intermediates are not coming back, and what they left
    free (scattered through the heaps of the threads that used them) would otherwise stay resident and
    grow with every layer. A no-op where glibc is not the allocator."""
    libc = _glibc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
    except AttributeError:
        pass


# ------------------------------------------------------------------------------------------- GEMMs

_NATIVE_FLAGS = {  # /proc/cpuinfo flags of x86 CPUs whose oneDNN kernels multiply this dtype natively
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            line = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def half_gemm_is_slow(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a bf16/fp16 GEMM on this CPU is emulated (then fp32 GEMMs are several times faster).

    Decided from hardware facts, never from a timing: the CPU's instruction-set flags (avx512_bf16 or
    AMX for bf16, avx512_fp16 or AMX-FP16 for fp16). The two paths round differently, so a timing
    could make a checkpoint depend on how loaded the machine was; the same CPU always chooses the
    same. PRUNEKIT_HALF_GEMMS=fp32 or =native overrides it."""
    if device.type != "cpu" or dtype not in _NATIVE_FLAGS:
        return False
    forced = os.environ.get("PRUNEKIT_HALF_GEMMS")
    if forced in ("fp32", "native"):
        return forced == "fp32"
    return not (_cpu_flags() & set(_NATIVE_FLAGS[dtype]))


def gemm_plan(dtype: torch.dtype, device: torch.device) -> str:
    """``fp32`` or ``native``: how this device runs the Linears of a model in ``dtype`` (what a staging
    directory records, so that a resumed run computes as the interrupted one did)."""
    return "fp32" if half_gemm_is_slow(dtype, device) else "native"


@contextmanager
def fp32_gemms(layer: torch.nn.Module):
    """Run the layer's Linears as fp32 GEMMs on half-precision inputs and weights, rounding the output
    back to the half dtype: the same products, accumulated in fp32 as a native bf16 GEMM does."""
    linears = list(linear_sublayers(layer).values())

    def make(module: torch.nn.Linear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            bias = None if module.bias is None else module.bias.float()
            return torch.nn.functional.linear(x.float(), module.weight.float(), bias).to(x.dtype)

        return forward

    for module in linears:
        module.forward = make(module)
    try:
        yield
    finally:
        for module in linears:
            del module.forward


# ------------------------------------------------------------------------------------- weight copies

STRIPE = 64  # rows of the solved weight made contiguous at a time


def _largest_magnitude(x: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    low, high = torch.aminmax(x)  # no temporary the size of x, unlike x.abs()
    return max(abs(float(low)), abs(float(high)))


def replace_weight(weight: torch.Tensor, new: torch.Tensor, keep_delta: bool) -> torch.Tensor | None:
    """weight ← new, rounded to weight's dtype; with ``keep_delta`` return W − W′ as well.

    ``new`` may be a transposed view (SparseGPT solves [in, out]): a stripe of rows at a time is
    first made contiguous in a small buffer, so the transposition is paid once and the difference
    and the copy run on contiguous memory (~1.5× faster than both on the strided view). For fp32
    weights the difference is kept in fp16 (half the memory, 90 MB a layer of a 2048×5632 Llama; the
    measured relative error moves by ~1e-5), unless max|W| + max|W′| could overflow fp16."""
    delta = None
    if keep_delta:
        dtype = weight.dtype
        if dtype == torch.float32:
            bound = _largest_magnitude(weight) + _largest_magnitude(new)
            dtype = torch.float16 if bound < torch.finfo(torch.float16).max else torch.float32
        delta = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    contiguous = new.is_contiguous()
    buffer = None if contiguous else torch.empty(min(STRIPE, weight.shape[0]), weight.shape[1], dtype=new.dtype, device=new.device)
    for lo in range(0, weight.shape[0], STRIPE):
        hi = min(lo + STRIPE, weight.shape[0])
        stripe = new[lo:hi] if contiguous else buffer[: hi - lo].copy_(new[lo:hi])
        stripe = stripe.to(weight.dtype)
        if delta is not None:
            torch.sub(weight[lo:hi], stripe, out=delta[lo:hi])
        weight[lo:hi].copy_(stripe)
    return delta


# ------------------------------------------------------------------------------------------- solving

@contextmanager
def one_torch_thread():
    """torch on one CPU thread (the count is process-wide), restored on exit."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


Job = tuple[list[str], Any]  # (the names of Linears that share statistics, their statistics or None)


class Backend:
    """The device-specific side of the engine, for one compute device."""

    def __init__(self, device: torch.device, solve_threads: int | None = None, gemms: str | None = None):
        self.device = device
        self.solve_threads = solve_threads
        self.forced_gemms = gemms  # ``fp32`` / ``native`` as recorded by an interrupted run; None: this device's

    def batch_tokens(self) -> int:
        return GPU_BATCH_TOKENS if self.device.type == "cuda" else CPU_BATCH_TOKENS

    def tune_allocator(self) -> None:
        """Before the calibration activations are made (host memory; see ``keep_freed_memory``)."""
        keep_freed_memory()

    def release_memory(self) -> None:
        """After a layer is finished and its tensors dropped (see ``release_freed_memory``)."""
        release_freed_memory()

    def gemms(self, layer: torch.nn.Module) -> AbstractContextManager:
        """The context the layer's forwards run in: fp32 GEMMs where half-precision ones are slow here."""
        dtype = next(layer.parameters()).dtype
        plan = self.forced_gemms or gemm_plan(dtype, self.device)
        return fp32_gemms(layer) if plan == "fp32" and dtype in _NATIVE_FLAGS else nullcontext()

    replace_weight = staticmethod(replace_weight)

    def solve_groups(
        self,
        jobs: list[Job],
        width: Callable[[Job], int],
        solve: Callable[[list[str], Any], Any],
        apply: Callable[[list[str], Any], None],
        prepare: Callable[[Any], None] | None = None,
        one_thread: Callable[[torch.device], AbstractContextManager] | None = None,
    ) -> None:
        """``apply(names, solve(names, stats))`` for every job, narrowest input (``width``) first.

        With a ``prepare`` step (SparseGPT's factorisations), on a multi-core CPU, a second thread
        prepares the groups with the widest inputs (the longest factorisations) while this one solves
        the others, preparing them itself; the helper then copies the solved weights back (``apply``). A
        solve is Python-driven (a column loop): two at once would contend for the GIL, so only one runs at
        a time. Both threads run on one torch/BLAS thread throughout (``one_thread``, the method's, or
        torch's alone): the thread count is process-wide, and each would otherwise restore the other's on
        leaving its own single-threaded stretch. ``solve_threads=1`` turns the second thread off. The
        results do not depend on it. ``solve`` may return a lazy sequence: applied at once, one solution
        is applied (and freed) before the next is solved. One after the other, the heaps are trimmed after
        each group (``release_memory``), so that one group's freed temporaries do not stay resident
        under the next one's."""
        threads = min(torch.get_num_threads(), self.solve_threads or torch.get_num_threads())
        ahead = self.device.type == "cpu" and prepare is not None and threads > 1 and len(jobs) > 1
        jobs.sort(key=width)  # preparation (a factorisation) grows with the input width
        if not ahead:
            while jobs:
                names, stats = jobs.pop(0)
                apply(names, solve(names, stats))
                del stats
                self.release_memory()  # the group's statistics, solutions and temporaries
            return

        def prepared_only(stats) -> None:  # returns nothing: a finished future must not keep the factor alive
            prepare(stats)

        single = one_thread(self.device) if one_thread is not None else one_torch_thread()
        with single, ThreadPoolExecutor(max_workers=1) as helper:
            # the helper prepares the costliest first; this thread solves the cheapest first and
            # prepares itself whatever the helper has not started yet
            prepared, applied = {}, []
            for _, stats in reversed(jobs):
                if stats is not None:
                    prepared[id(stats)] = helper.submit(prepared_only, stats)
            while jobs:
                names, stats = jobs.pop(0)
                ready = prepared.pop(id(stats), None)
                if ready is not None and not ready.cancel():
                    ready.result()
                solutions = list(solve(names, stats))  # applied later, on the helper, once it is free
                applied.append(helper.submit(apply, names, solutions))
                del stats, ready, solutions
            for done in applied:
                done.result()
        self.release_memory()  # both threads are done: what the groups left free goes back at once
