"""The kernel library's C ABI is checked at load: version and struct sizes exported by the
library equal abi.py's ctypes mirrors, and a mismatch turns the kernels off (PyTorch runs).

Runs on any x86-64 machine with g++: compiling needs no AVX-512, and `ember_abi` only returns
constants (the library's other entry points are never called here).
"""

from __future__ import annotations

import ctypes
import shutil
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest

from ember.kernels import abi, build, ops


@pytest.fixture(scope="module")
def library() -> ctypes.CDLL:
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    # NOTE: the default kernel cache (keyed by the sources' hash and the flags, verified on
    # load): the build `make setup` made and the other kernel tests load, compiled once.
    path, _ = build.ensure_built(None, build.select_isa() or build.ISAS[0])
    return ctypes.CDLL(str(path))


def test_compiled_library_matches_the_python_mirrors(library):
    assert abi.check_abi(library) is None
    fn = library.ember_abi
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int64
    assert [fn(i) for i in range(4)] == [value for _, value in abi.MIRRORED]
    assert fn(4) == -1


def _fake_library(values: list[int]) -> Any:
    """A stand-in library whose ember_abi returns `values`."""
    def ember_abi(what: int) -> int:
        return values[what]
    return SimpleNamespace(ember_abi=ember_abi)


def test_a_mismatch_is_reported_by_name():
    values = [value for _, value in abi.MIRRORED]
    assert abi.check_abi(_fake_library(values)) is None
    values[2] += 8  # the library's LayerW grew a field Python does not know
    reason = abi.check_abi(_fake_library(values))
    assert reason is not None and "sizeof(LayerW)" in reason
    assert "exports no ember_abi" in str(abi.check_abi(SimpleNamespace()))


def test_a_mismatched_library_is_refused(monkeypatch, caplog):
    values = [value + 1 if i == 0 else value for i, (_, value) in enumerate(abi.MIRRORED)]
    monkeypatch.setattr(ops, "supported_isas", lambda: [build.ISAS[-1]])  # any CPU
    monkeypatch.setattr(ops, "open_library", lambda cache_dir, isa, cxx: _fake_library(values))
    assert ops.CpuKernels.load(None, num_threads=1) is None
    assert "ABI version" in caplog.text


def test_isa_selection_prefers_avx512_and_falls_back_to_avx2_then_portable():
    avx512 = set(build.ISAS[0].required_flags) | set(build.ISAS[1].required_flags)
    assert build.select_isa(avx512).name == "avx512-vnni"
    assert build.select_isa({"avx2", "fma", "f16c", "sse4_2"}).name == "avx2"
    assert build.select_isa({"sse4_2"}).name == "portable"  # e.g. an x86 CPU before AVX2
    assert build.select_isa({"fp", "asimd", "asimddp"}).name == "portable"  # ARM 'Features'
    assert [i.name for i in build.supported_isas(avx512)] == ["avx512-vnni", "avx2", "portable"]


def test_portable_builds_target_the_host_and_key_the_cache_by_it(monkeypatch, tmp_path):
    assert build.host_arch_flags("x86_64") == ("-march=native",)
    assert build.host_arch_flags("aarch64") == ("-mcpu=native",)
    assert build.host_arch_flags("riscv64") == ()
    portable = build.PORTABLE
    here = build.library_path(str(tmp_path), portable)
    monkeypatch.setattr(build, "host_identity", lambda: "aarch64\nCPU part : 0xd0c")
    assert build.library_path(str(tmp_path), portable) != here  # another CPU, another build
    avx2 = build.ISAS[1]
    assert build.library_path(str(tmp_path), avx2) == build.library_path(str(tmp_path), avx2)


def test_each_isa_compiles_to_its_own_library(tmp_path):
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    paths = {build.library_path(str(tmp_path), isa) for isa in build.ISAS}
    assert len(paths) == len(build.ISAS)
    # Every ISA compiles here (loading runs no vector code). NOTE: into the default kernel
    # cache, keyed by the sources' hash and the flags: the ISAs this CPU runs are the builds
    # `make setup` and the other kernel tests use (compiled once); the missing ones compile
    # side by side (one g++ each).
    with ThreadPoolExecutor(len(build.ISAS)) as pool:
        built = list(pool.map(lambda isa: build.ensure_built(None, isa)[0], build.ISAS))
    assert len(set(built)) == len(build.ISAS)
    for isa, path in zip(build.ISAS, built):
        assert path == build.library_path(None, isa) and path.name.endswith(f"_{isa.name}.so")
        assert abi.check_abi(ctypes.CDLL(str(path))) is None


def test_a_forced_isa_must_exist_and_run_here(monkeypatch):
    monkeypatch.setattr(build, "cpu_flags", lambda: set(build.ISAS[1].required_flags))
    assert build.forced_isa("avx2").name == "avx2"
    assert build.forced_isa("portable").name == "portable"
    assert build.forced_isa("avx512-vnni") is None  # this (pretend) CPU lacks it
    assert build.forced_isa("neon") is None


def test_the_cache_key_covers_every_included_header():
    """The kernel cache is keyed by the bytes of SOURCES and HEADERS: every local header the
    sources include (directly or not) is in HEADERS, so an edited header is a rebuild."""
    import re

    included = {name for f in (*build.SOURCES, *build.HEADERS)
                for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', f.read_text(), re.M)}
    assert included <= {h.name for h in build.HEADERS}, included - {h.name for h in build.HEADERS}
