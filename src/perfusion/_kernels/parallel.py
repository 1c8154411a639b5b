"""The one way the voxel loops run in parallel: chunks of voxels on threads, each chunk serial end to end.

Every per-voxel kernel (_kernels.deconv, _kernels.curves) is a serial ``nogil`` loop over the rows it
is given; :func:`run_chunks` hands consecutive row slices to a few threads, and the caller's ``work``
runs the kernel (after a BLAS product, for the deconvolution and the model fit) on its slice.

Why threads and not numba's ``prange``: some hot loops alternate a BLAS product (OpenBLAS, which starts
its own threads) with a kernel. With both parallel, each library's idle threads spin while the other's
run: on 2 cores a 60k-voxel model fit took 1.17 CPU-s in its products that take 0.27 s alone. Here every
chunk runs its product with BLAS limited to one thread (threadpoolctl) and then its kernel. The curve
kernels, which had ``prange`` loops of their own, run the same way: one mechanism, one thread count,
one chunk size, and no numba threading layer to compile for.

The threads are as many as numba's setting (NUMBA_NUM_THREADS, which batch bounds per worker). Chunks
are handed out in order to whichever thread is free; each chunk's result depends only on its own rows,
so the output is the same, bit for bit, for any number of threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

#: Voxels (rows) per chunk: large enough that a chunk's kernel call and BLAS product dwarf the
#: hand-out (a few microseconds a chunk), small enough that a 16384-voxel step balances over the threads.
CHUNK = 1024

_blas = None  # threadpoolctl's controller of the BLAS libraries, found on the first run_chunks (_one_blas_thread)


def n_threads() -> int:
    """Threads for chunk work: numba's current thread count (all cores unless NUMBA_NUM_THREADS says)."""
    import numba

    return max(1, int(numba.get_num_threads()))


def chunks(n: int, size: int | None = None) -> list[slice]:
    """Consecutive slices of ``range(n)`` of ``size`` items (default CHUNK; the last one shorter)."""
    size = CHUNK if size is None else size
    return [slice(lo, min(lo + size, n)) for lo in range(0, n, size)]


def run_chunks(work: Callable[[slice], Any], n: int, size: int | None = None, *, threads: int | None = None) -> list:
    """Call ``work(sl)`` for consecutive slices of ``range(n)`` of ``size`` items (default CHUNK), on
    ``threads`` threads (default n_threads(); the calling thread is one of them) with BLAS held to one
    thread. ``work`` writes its own outputs; its return values come back in slice order. An exception
    in a chunk is raised here (on threads, once the other chunks have run; the first in slice order)."""
    parts = chunks(n, size)
    threads = min(n_threads() if threads is None else max(1, int(threads)), len(parts))
    results: list = [None] * len(parts)
    errors: list = [None] * len(parts)
    with _one_blas_thread():
        if threads <= 1:
            for i, sl in enumerate(parts):
                results[i] = work(sl)
            return results
        _run_on_threads(work, parts, threads, results, errors)
    for err in errors:
        if err is not None:
            raise err
    return results


def _one_blas_thread():
    """A context in which the BLAS libraries run on one thread (threadpoolctl). Finding the libraries
    takes about 0.6 ms, which a step of 16384 voxels would pay in every stage and k-means in every
    iteration: they are found once, on the first call. numpy's BLAS, the one the chunks' products
    call, is loaded with numpy, before any chunk runs."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def _run_on_threads(work, parts: list[slice], threads: int, results: list, errors: list) -> None:
    """Run ``work`` on every slice of ``parts`` from ``threads`` threads (the caller's and threads - 1
    new ones), each taking the next slice not yet taken; results and exceptions by slice index."""
    lock = threading.Lock()
    next_part = [0]

    def loop():
        while True:
            with lock:
                i = next_part[0]
                next_part[0] += 1
            if i >= len(parts):
                return
            try:
                results[i] = work(parts[i])
            except BaseException as exc:  # noqa: BLE001 - raised by run_chunks once every chunk has run
                errors[i] = exc

    helpers = [threading.Thread(target=loop, daemon=True) for _ in range(threads - 1)]
    for t in helpers:
        t.start()
    loop()
    for t in helpers:
        t.join()
