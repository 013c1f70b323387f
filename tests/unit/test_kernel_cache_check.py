"""The kernel cache is loaded only when it is ours, not writable by others, and matches the
content hash recorded at build; anything else is rebuilt with one warning line."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from ember.kernels import build
from ember.kernels.cache_check import hash_path, record_hash, untrusted_reason


def test_untrusted_reasons(tmp_path: Path):
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"library bytes")
    assert "no content hash" in (untrusted_reason(lib) or "")
    record_hash(lib)
    assert untrusted_reason(lib) is None
    lib.write_bytes(b"tampered bytes")
    assert "does not match" in (untrusted_reason(lib) or "")
    record_hash(lib)
    lib.chmod(0o666)
    assert "writable" in (untrusted_reason(lib) or "")
    lib.chmod(0o644)
    tmp_path.chmod(0o777)
    assert "writable" in (untrusted_reason(lib) or "")
    tmp_path.chmod(0o755)
    assert untrusted_reason(lib) is None


def test_tampered_cached_library_is_rebuilt(tmp_path: Path, monkeypatch, caplog):
    isa = build.select_isa()
    if isa is None:
        pytest.skip("this CPU runs none of the kernel ISAs")
    real = build.library_path(None, isa)
    if not real.exists():
        pytest.skip(f"no compiled kernel library at {real} to stand in for a build")
    builds: list[Path] = []

    def fake_compile(target: Path, isa: build.Isa | None = None,
                     cxx: str | None = None) -> None:
        builds.append(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real, target)

    monkeypatch.setattr(build, "compile_library", fake_compile)
    cache = str(tmp_path)
    assert build.load_library(cache, isa) is not None and len(builds) == 1
    path = build.library_path(cache, isa)
    assert hash_path(path).exists()
    assert build.load_library(cache, isa) is not None and len(builds) == 1  # verified, reused
    with open(path, "ab") as f:
        f.write(b"\0planted")
    with caplog.at_level(logging.WARNING, logger="ember.kernels.build"):
        assert build.load_library(cache, isa) is not None
    assert len(builds) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rebuilding" in warnings[0]
    assert untrusted_reason(path) is None
