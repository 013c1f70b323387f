"""`ember build-kernels`: every ISA this CPU runs lands in the kernel cache (built once, then
reported as cached); without a compiler it says so per ISA and exits 1. The compiler is
stubbed (a fake build writes bytes): the real builds are covered by test_kernel_abi.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.cli import main
from ember.kernels import build


@pytest.fixture
def fake_compiler(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    built: list[str] = []

    def fake_compile(target: Path, isa: build.Isa | None = None, cxx: str | None = None) -> None:
        if cxx is not None and build.find_compiler(cxx) is None:
            raise build.NoCompiler(f"no C++ compiler ({cxx!r} not found)")
        assert isa is not None
        built.append(isa.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"\x7fELF fake " + isa.name.encode())

    monkeypatch.setattr(build, "compile_library", fake_compile)
    monkeypatch.setattr(build, "cpu_flags", lambda: set(build.ISAS[1].required_flags))  # AVX2
    monkeypatch.delenv("EMBER_CXX", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    return built


def test_builds_each_runnable_isa_once(fake_compiler, tmp_path, capsys):
    assert main(["build-kernels", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert fake_compiler == ["avx2", "portable"]
    assert "avx2: built" in out and "portable: built" in out and "avx512-vnni" in out
    for isa in build.ISAS[1:]:
        assert build.library_path(str(tmp_path), isa).is_file()
    assert main(["build-kernels", "--cache-dir", str(tmp_path), "--isa", "portable"]) == 0
    assert "portable: already cached" in capsys.readouterr().out
    assert fake_compiler == ["avx2", "portable"]  # nothing rebuilt


def test_without_a_compiler_it_says_so(fake_compiler, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EMBER_CXX", str(tmp_path / "missing-g++"))
    assert main(["build-kernels", "--cache-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "avx2: not built" in out and "no C++ compiler" in out and "missing-g++" in out
    assert fake_compiler == []


def test_a_missing_peer_binary_is_one_line_not_a_traceback(capsys):
    """`ember bench offline --llama-bench PATH` with nothing there: exit 2, one error line."""
    from ember.cli import main

    assert main(["bench", "offline", "--llama-bench", "/nonexistent/llama-bench"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "/nonexistent/llama-bench" in err
    assert "Traceback" not in err
