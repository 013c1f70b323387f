"""The process's OpenMP runtime (libgomp): keep one thread pool, so kernel threads spin.

libgomp keeps one pool of worker threads per thread that opened a parallel region, for the
life of that thread. When its threads in all pools together outnumber the CPUs, every wait
(barrier, end of region) spins only `gomp_throttled_spin_count_var` (100 iterations) before
it sleeps on a futex instead of GOMP_SPINCOUNT's ~300,000. The fused decoder has ~11
barriers per layer, so a 2-core server whose model was loaded on a worker thread (torch
repacks and the kernels' warm-up run there: pool 1) and stepped on the engine thread (pool 2)
put both kernel threads to sleep and woke them ~140 times per token: measured offline on the
2-core dev VM (contended), decode on a second thread made ~18,000 voluntary context switches
per kernel thread per 128 tokens against 1-2 on the loading thread. That, not the front end's
work, is what made `ember serve --frontend-threads 0` decode at ~47 tok/s against ~148
offline. `release_thread_pool()` on the loading thread once loading is done frees its pool
(OpenMP 5.0 `omp_pause_resource_all(omp_pause_soft)` frees the calling thread's pool only),
so the engine thread's pool is the process's only one and waits spin as offline.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

logger = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1
"""`omp_pause_soft` of OpenMP 5.0's `omp_pause_resource_t`."""


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp already loaded in this process (torch's or the kernels'), or None."""
    try:
        lib = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
    except OSError:
        return None
    if not hasattr(lib, "omp_pause_resource_all"):  # libgomp before GCC 9
        return None
    lib.omp_pause_resource_all.restype = ctypes.c_int
    lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
    return lib


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP worker pool (if it has one); True when the runtime
    took the request. Call it outside any parallel region, on a thread that is done with
    OpenMP for now (a later parallel region from it builds a fresh pool)."""
    lib = _libgomp()
    if lib is None:
        return False
    ok = lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
    if not ok:
        logger.debug("omp_pause_resource_all refused on this thread")
    return ok
