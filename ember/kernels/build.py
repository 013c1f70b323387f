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
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ember.config import EnvSettings
from ember.kernels.cache_check import record_hash, untrusted_reason

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_kernels.cpp", HERE / "decoder.cpp")
HEADERS = (HERE / "common.h", HERE / "kernels.h", HERE / "isa_avx2.h", HERE / "attention.h")
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno")


@dataclass(frozen=True)
class Isa:
    """One instruction set the kernels are built for: the CPU flags it needs and its compiler
    flags (kernels.h picks the matching building blocks from EMBER_ISA_* macros)."""

    name: str
    required_flags: tuple[str, ...]
    cxxflags: tuple[str, ...]


ISAS = (
    Isa("avx512-vnni", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                        "avx512_bf16"),
        ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
         "-mavx512vnni", "-mavx512bf16")),
    Isa("avx2", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c", "-DEMBER_ISA_AVX2")),
)
"""Best first: the kernels use the first one this CPU has."""


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


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
    for f in (*SOURCES, *HEADERS):
        h.update(f.read_bytes())
    digest = h.hexdigest()[:16]
    root = EnvSettings(cache_dir=cache_dir).cache_path  # the one default cache location
    return root / "kernels" / digest / f"libember_cpu_{isa.name}.so"


def compile_library(target: Path, isa: Isa | None = None) -> None:
    """Build for `isa` (default: this CPU's best, else the first of ISAS: compiling needs no
    support from the CPU) into a temporary file, then rename: concurrent builders never see
    half a file."""
    isa = isa or select_isa() or ISAS[0]
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.parent.chmod(0o755)  # NOTE: loaded only from a folder no one else can write
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *BASE_FLAGS, *isa.cxxflags, *map(str, SOURCES), "-o", tmp],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed on the kernels: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library(cache_dir: str | None, isa: Isa | None = None) -> ctypes.CDLL | None:
    """The compiled kernels for `isa` (default: this CPU's best), building them on first use;
    None if this machine cannot run them."""
    isa = isa or select_isa()
    if isa is None:
        logger.info("CPU kernels off: CPU lacks %s", ", ".join(missing_cpu_features()))
        return None
    path = library_path(cache_dir, isa)
    try:
        reason = untrusted_reason(path) if path.exists() else None
        if reason is not None:
            logger.warning("kernel cache: %s; rebuilding", reason)
            path.unlink()
        if not path.exists():
            logger.info("compiling CPU kernels (%s) into %s", isa.name, path)
            compile_library(path, isa)
            record_hash(path)
        return ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as e:
        logger.warning("CPU kernels off: %s", e)
        return None
