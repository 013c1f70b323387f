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
from pathlib import Path

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_kernels.cpp", HERE / "decoder.cpp")
HEADERS = (HERE / "kernels.h",)
ISA = "avx512-vnni"
"""The instruction set the kernels are written for (as the ExecutionPlan reports it)."""
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16")
CXXFLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx2", "-mfma",
            "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni",
            "-mavx512bf16", "-fno-math-errno")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def missing_cpu_features() -> list[str]:
    flags = cpu_flags()
    return [f for f in REQUIRED_FLAGS if f not in flags]


def default_cache_dir(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "ember"


def library_path(cache_dir: str | None) -> Path:
    h = hashlib.sha256(" ".join(CXXFLAGS).encode())
    for f in (*SOURCES, *HEADERS):
        h.update(f.read_bytes())
    digest = h.hexdigest()[:16]
    return default_cache_dir(cache_dir) / "kernels" / digest / "libember_cpu.so"


def compile_library(target: Path) -> None:
    """Build into a temporary file, then rename: concurrent builders never see half a file."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *CXXFLAGS, *map(str, SOURCES), "-o", tmp],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed on the kernels: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library(cache_dir: str | None) -> ctypes.CDLL | None:
    """The compiled kernels, building them on first use; None if this machine cannot."""
    missing = missing_cpu_features()
    if missing:
        logger.info("CPU kernels off: CPU lacks %s", ", ".join(missing))
        return None
    path = library_path(cache_dir)
    try:
        if not path.exists():
            logger.info("compiling CPU kernels into %s", path)
            compile_library(path)
        return ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as e:
        logger.warning("CPU kernels off: %s", e)
        return None
