"""The kernel library as a checked ctypes handle, without PyTorch.

`load_kernel_library` picks the ISA (forced, else the best this CPU runs, falling back to the
next one whose build succeeds), builds or finds the cached library (ember.kernels.build) and
checks its C ABI (ember.kernels.abi). `CpuKernels` (ops.py) wraps such a library for PyTorch
tensors; the torch-free edge runtime (ember.edge) calls it through numpy pointers.
NOTE: without torch in the process the library's `libgomp.so.1` is the system's (the dynamic
loader resolves it from the library's NEEDED entry), so a machine needs libgomp installed.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from ember.kernels.abi import check_abi
from ember.kernels.build import forced_isa, open_library, supported_isas


class KernelLibraryError(RuntimeError):
    """No kernel library runs here; the message says why (one line)."""


@dataclass(frozen=True)
class KernelLibrary:
    """A loaded kernel library whose ABI matches ember/kernels/abi.py."""

    lib: ctypes.CDLL
    isa: str
    """The instruction set it was built for ('avx512-vnni', 'avx2', 'portable')."""


def load_kernel_library(cache_dir: str | None, force_isa: str | None = None,
                        cxx: str | None = None) -> KernelLibrary:
    """The checked kernel library (built on first use). Raises KernelLibraryError with the
    reason when no ISA of build.ISAS can be built and loaded here or the ABI differs."""
    if force_isa is not None:
        forced = forced_isa(force_isa)
        if forced is None:
            raise KernelLibraryError(f"this CPU cannot run the forced kernel ISA {force_isa!r}")
        isas = [forced]
    else:
        isas = supported_isas()
    failures: list[str] = []
    for isa in isas:
        try:
            lib = open_library(cache_dir, isa, cxx)
        except (OSError, RuntimeError) as e:
            failures.append(f"{isa.name}: {str(e).splitlines()[0] if str(e) else e!r}")
            continue
        reason = check_abi(lib)
        if reason is not None:
            raise KernelLibraryError(reason)
        return KernelLibrary(lib, isa.name)
    raise KernelLibraryError("no kernel library could be built or loaded ("
                             + ("; ".join(failures) or "no ISA supported") + ")")
