"""scipy's BLAS/LAPACK on CPU tensors, in place: Cholesky factorisation and triangular inverse
(without the GIL), ger for SparseGPT's column loop, and their thread count.

scipy's f2py wrappers (``scipy.linalg.lapack.spotrf``) hold the GIL for the whole call, so a
factorisation in one thread stops every Python-driven loop in the others. The same LAPACK
routines, called through the function pointers scipy exports for Cython
(``scipy.linalg.cython_lapack``) with ctypes, release it: the engine factorises the next Hessian
while the current column loop runs. Single-threaded, OpenBLAS's potrf + trtri are also ~2×
faster than torch's Cholesky + a blocked triangular inverse on this class of CPU.

The factorisation and the inverse work on a square, C-contiguous tensor T, which Fortran sees as
Tᵀ: Fortran's upper triangle is T's lower one. Neither touches T's strict upper triangle.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from contextlib import contextmanager

import numpy as np
import torch

_P = ctypes.POINTER
_SCALARS = {torch.float32: ("s", ctypes.c_float), torch.float64: ("d", ctypes.c_double)}


@functools.lru_cache(maxsize=None)
def _routine(name: str, scalar):
    from scipy.linalg import cython_lapack

    api = ctypes.PyDLL(None)  # our own handle: restype/argtypes set here leave ctypes.pythonapi alone
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    capsule = cython_lapack.__pyx_capi__[name]
    pointer = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    if name.endswith("potrf"):  # (uplo, n, a, lda, info)
        argtypes = [ctypes.c_char_p, _P(ctypes.c_int), _P(scalar), _P(ctypes.c_int), _P(ctypes.c_int)]
    else:  # trtri: (uplo, diag, n, a, lda, info)
        argtypes = [ctypes.c_char_p, ctypes.c_char_p, _P(ctypes.c_int), _P(scalar), _P(ctypes.c_int), _P(ctypes.c_int)]
    return ctypes.CFUNCTYPE(None, *argtypes)(pointer)  # CFUNCTYPE: the GIL is released during the call


def available(T: torch.Tensor) -> bool:
    """Whether T can be factorised here: a contiguous square fp32/fp64 CPU tensor, and scipy's LAPACK found."""
    if T.device.type != "cpu" or T.dtype not in _SCALARS or T.dim() != 2 or T.shape[0] != T.shape[1] or not T.is_contiguous():
        return False
    try:
        _routine(_SCALARS[T.dtype][0] + "potrf", _SCALARS[T.dtype][1])
    except (ImportError, KeyError, AttributeError, OSError):
        return False
    return True


def cholesky_lower_in_place(T: torch.Tensor) -> int:
    """T's lower triangle ← L with A = LLᵀ, A the symmetric matrix in T's lower triangle. LAPACK's
    info: 0 on success, k > 0 if the leading k×k minor is not positive definite (T's lower triangle
    is then partly overwritten)."""
    prefix, scalar = _SCALARS[T.dtype]
    n, info = ctypes.c_int(T.shape[0]), ctypes.c_int(0)
    _routine(prefix + "potrf", scalar)(b"U", ctypes.byref(n), ctypes.cast(T.data_ptr(), _P(scalar)), ctypes.byref(n), ctypes.byref(info))
    return info.value


def invert_lower_in_place(T: torch.Tensor) -> int:
    """T's lower triangle ← L⁻¹ for the (non-unit) lower-triangular L held there. LAPACK's info:
    0 on success, k > 0 if L[k−1, k−1] is exactly zero."""
    prefix, scalar = _SCALARS[T.dtype]
    n, info = ctypes.c_int(T.shape[0]), ctypes.c_int(0)
    _routine(prefix + "trtri", scalar)(
        b"U", b"N", ctypes.byref(n), ctypes.cast(T.data_ptr(), _P(scalar)), ctypes.byref(n), ctypes.byref(info)
    )
    return info.value


@functools.lru_cache(maxsize=None)
def ger_in_place():
    """scipy's fp32 BLAS ger (A += αxyᵀ), or None if it does not update a Fortran-ordered view of a
    C-ordered array in place (SparseGPT's column loop relies on that). f2py: it holds the GIL."""
    try:
        from scipy.linalg.blas import sger
    except ImportError:
        return None
    a = np.zeros((3, 2), dtype=np.float32)
    result = sger(1.0, np.ones(2, dtype=np.float32), np.ones(3, dtype=np.float32), a=a.T, overwrite_a=1)
    return sger if np.shares_memory(result, a) and bool((a == 1.0).all()) else None


_LOCK = threading.Lock()
_USERS: list = [0, None]  # threads inside, and the limiter they share


@functools.lru_cache(maxsize=None)
def _controller():
    """threadpoolctl's view of the loaded BLAS libraries, found once (finding them takes milliseconds)."""
    import scipy.linalg.blas  # noqa: F401  (loaded first, so that its OpenBLAS is among them)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def single_threaded():
    """scipy's and numpy's BLAS (OpenBLAS) on one thread while any caller is inside. The limit is
    process-wide, so concurrent callers share one: the first in sets it, the last out restores it."""
    with _LOCK:
        if _USERS[0] == 0:
            _USERS[1] = _controller().limit(limits=1, user_api="blas")
        _USERS[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _USERS[0] -= 1
            if _USERS[0] == 0:
                _USERS[1].restore_original_limits()
                _USERS[1] = None
