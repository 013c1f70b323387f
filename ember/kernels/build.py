"""Compile the kernel sources once per source version and flags, cache the library.

The library is built with the system C++ compiler into `<cache>/kernels/<hash>/` and loaded with
ctypes. It links OpenMP dynamically; PyTorch has already loaded `libgomp.so.1`, so both share
one OpenMP runtime. `load_library` returns None (with the reason logged) when the CPU lacks the
instructions or no compiler is found: callers then fall back to the PyTorch implementations.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ember.config import EnvSettings
from ember.kernels.cache_check import record_hash, untrusted_reason

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_kernels.cpp", HERE / "decoder.cpp", HERE / "encoder_gemm.cpp",
           HERE / "q6_head.cpp")
HEADERS = (HERE / "common.h", HERE / "kernels.h", HERE / "isa_avx2.h", HERE / "few_rows_avx2.h",
           HERE / "isa_portable.h", HERE / "attention.h", HERE / "q6_layers.h",
           HERE / "avx2_prefill.h", HERE / "portable_prefill.h", HERE / "gemm_rows.h",
           HERE / "decode_few.h", HERE / "prefill_bf16.h", HERE / "prefill_f32.h")
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno")


@dataclass(frozen=True)
class Isa:
    """One instruction set the kernels are built for: the CPU flags it needs and its compiler
    flags (kernels.h picks the matching building blocks from EMBER_ISA_* macros)."""

    name: str
    required_flags: tuple[str, ...]
    cxxflags: tuple[str, ...]
    host_tuned: bool = False
    """Built for the host CPU (-march/-mcpu=native): its cache key includes the host's CPU
    identity, so a cache shared between machines never loads another CPU's build."""


def host_arch_flags(machine: str | None = None) -> tuple[str, ...]:
    """The compiler flags that target this host CPU: -march=native on x86-64, -mcpu=native on
    ARM (GCC and Clang spell the ARM one so), none elsewhere (a generic build)."""
    machine = (machine or platform.machine()).lower()
    if machine in ("x86_64", "amd64", "i686", "i386"):
        return ("-march=native",)
    if machine.startswith(("aarch64", "arm64", "arm")):
        return ("-mcpu=native",)
    return ()


PORTABLE = Isa("portable", (), (*host_arch_flags(), "-ffp-contract=fast", "-fno-trapping-math",
                                "-DEMBER_ISA_PORTABLE"),
               host_tuned=True)
"""Plain C++ (isa_portable.h) vectorised by the compiler for this host: runs on any CPU."""

ISAS = (
    Isa("avx512-vnni", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                        "avx512_bf16"),
        ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
         "-mavx512vnni", "-mavx512bf16")),
    Isa("avx2", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c", "-DEMBER_ISA_AVX2")),
    PORTABLE,
)
"""Best first: the kernels use the first one this CPU has (portable runs everywhere)."""


def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.readlines()
    except OSError:
        return []


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 'flags', ARM 'Features' of /proc/cpuinfo)."""
    for line in _cpuinfo_lines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def host_identity() -> str:
    """This CPU for cache keys of host-tuned builds: architecture, model and feature flags."""
    keep = ("model name", "CPU implementer", "CPU part", "flags", "Features")
    seen: dict[str, str] = {}
    for line in _cpuinfo_lines():
        key = line.split(":", 1)[0].strip()
        if key in keep and key not in seen:
            seen[key] = line.strip()
    return "\n".join([platform.machine(), *seen.values()])


def select_isa(flags: set[str] | None = None) -> Isa | None:
    """The best instruction set of ISAS that this CPU (or `flags`) supports, else None."""
    flags = cpu_flags() if flags is None else flags
    return next((isa for isa in ISAS if set(isa.required_flags) <= flags), None)


def forced_isa(name: str) -> Isa | None:
    """The ISA called `name`, if this CPU supports it (else None, with the reason logged)."""
    isa = next((i for i in ISAS if i.name == name), None)
    if isa is None:
        logger.warning("CPU kernels off: unknown ISA %r (known: %s)", name,
                       ", ".join(i.name for i in ISAS))
        return None
    if not set(isa.required_flags) <= cpu_flags():
        logger.warning("CPU kernels off: this CPU cannot run the forced ISA %s", name)
        return None
    return isa


def missing_cpu_features() -> list[str]:
    """[] when some ISA of the kernels runs here, else what the least demanding one lacks."""
    if select_isa() is not None:
        return []
    flags = cpu_flags()
    return [f for f in ISAS[-1].required_flags if f not in flags]


def library_path(cache_dir: str | None, isa: Isa) -> Path:
    h = hashlib.sha256(" ".join((*BASE_FLAGS, *isa.cxxflags)).encode())
    if isa.host_tuned:
        h.update(host_identity().encode())
    for f in (*SOURCES, *HEADERS):
        h.update(f.read_bytes())
    digest = h.hexdigest()[:16]
    root = EnvSettings(cache_dir=cache_dir).cache_path  # the one default cache location
    return root / "kernels" / digest / f"libember_cpu_{isa.name}.so"


class NoCompiler(RuntimeError):
    """No C++ compiler to build the kernels with."""


def find_compiler(cxx: str | None = None) -> str | None:
    """The C++ compiler: `cxx` (EnvSettings.cxx: EMBER_CXX or CXX) when given, else the first
    of g++, c++, clang++ on PATH; None when it is not found (an explicit `cxx` that is missing
    is not replaced by another compiler)."""
    if cxx:
        return shutil.which(cxx)
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def compile_library(target: Path, isa: Isa | None = None, cxx: str | None = None) -> None:
    """Build for `isa` (default: this CPU's best, else the first of ISAS: compiling needs no
    support from the CPU) into a temporary file, then rename: concurrent builders never see
    half a file. Raises NoCompiler, or RuntimeError with the compiler's message."""
    isa = isa or select_isa() or ISAS[0]
    compiler = find_compiler(cxx)
    if compiler is None:
        raise NoCompiler(f"no C++ compiler ({cxx!r} not found)" if cxx else
                         "no C++ compiler (g++, c++, clang++) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.parent.chmod(0o755)  # NOTE: loaded only from a folder no one else can write
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *BASE_FLAGS, *isa.cxxflags, *map(str, SOURCES), "-o",
                               tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed on the kernels ({isa.name}): "
                               f"{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_built(cache_dir: str | None, isa: Isa, cxx: str | None = None) -> tuple[Path, bool]:
    """The cached library of `isa` (verified, see cache_check) and whether it was built now.
    Raises NoCompiler / RuntimeError / OSError when it is not cached and cannot be built."""
    path = library_path(cache_dir, isa)
    reason = untrusted_reason(path) if path.exists() else None
    if reason is not None:
        logger.warning("kernel cache: %s; rebuilding", reason)
        path.unlink()
    if path.exists():
        return path, False
    logger.info("compiling CPU kernels (%s) into %s", isa.name, path)
    compile_library(path, isa, cxx)
    record_hash(path)
    return path, True


def open_library(cache_dir: str | None, isa: Isa, cxx: str | None = None) -> ctypes.CDLL:
    """The compiled kernels for `isa`, built on first use; raises when that is impossible."""
    path, _ = ensure_built(cache_dir, isa, cxx)
    return ctypes.CDLL(str(path))


def load_library(cache_dir: str | None, isa: Isa | None = None,
                 cxx: str | None = None) -> ctypes.CDLL | None:
    """The compiled kernels for `isa` (default: this CPU's best), building them on first use;
    None (reason logged) if this machine cannot run them."""
    isa = isa or select_isa()
    if isa is None:
        logger.info("CPU kernels off: CPU lacks %s", ", ".join(missing_cpu_features()))
        return None
    try:
        return open_library(cache_dir, isa, cxx)
    except (OSError, RuntimeError) as e:
        logger.warning("CPU kernels off: %s", e)
        return None


def supported_isas(flags: set[str] | None = None) -> list[Isa]:
    """The ISAs of ISAS this CPU (or `flags`) runs, best first (portable always last)."""
    flags = cpu_flags() if flags is None else flags
    return [isa for isa in ISAS if set(isa.required_flags) <= flags]
