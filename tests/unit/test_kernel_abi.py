"""The kernel library's C ABI is checked at load: version and struct sizes exported by the
library equal abi.py's ctypes mirrors, and a mismatch turns the kernels off (PyTorch runs).

Runs on any x86-64 machine with g++: compiling needs no AVX-512, and `ember_abi` only returns
constants (the library's other entry points are never called here).
"""

from __future__ import annotations

import ctypes
import shutil
from types import SimpleNamespace
from typing import Any

import pytest

from ember.kernels import abi, build, ops


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> ctypes.CDLL:
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    path = tmp_path_factory.mktemp("kernels") / "libember_cpu.so"
    build.compile_library(path)
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
    monkeypatch.setattr(ops, "load_library", lambda cache_dir: _fake_library(values))
    assert ops.CpuKernels.load(None, num_threads=1) is None
    assert "ABI version" in caplog.text
