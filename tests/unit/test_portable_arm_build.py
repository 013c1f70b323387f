"""The portable kernels compile for AArch64 (issue 15's ARM path), checked with a cross
compiler where one is installed (.ci/run installs g++-12-aarch64-linux-gnu): the x86-only
details (asm register constraints, intrinsics) must stay out of the portable flavour."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.kernels import build

CROSS = next((c for c in ("aarch64-linux-gnu-g++-12", "aarch64-linux-gnu-g++")
              if shutil.which(c)), None)


@pytest.fixture(scope="module")
def cross_builds(tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Every source's cross compile, all started at once (each takes ~50 s on one core: CI's
    two cores run two together); a test waits for its own."""
    assert CROSS is not None
    # build.py's flags for the portable flavour, with a named ARM core for the host's
    # -march=native (a cross compiler has no native CPU)
    flags = [f for f in build.PORTABLE.cxxflags if not f.startswith(("-march", "-mcpu"))]
    base = [f for f in build.BASE_FLAGS if f != "-shared"]
    out = tmp_path_factory.mktemp("aarch64")
    procs = {src.name: subprocess.Popen(
        [CROSS, *base, "-mcpu=neoverse-n1", *flags, "-c", str(src), "-o",
         str(out / f"{src.stem}.o")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True) for src in build.SOURCES}
    yield procs
    for p in procs.values():  # a failed test may leave one running
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.skipif(CROSS is None, reason="no AArch64 cross compiler "
                                          "(apt install g++-12-aarch64-linux-gnu)")
@pytest.mark.parametrize("source", build.SOURCES, ids=lambda p: p.name)
def test_portable_kernels_compile_for_aarch64_without_warnings(
        source: Path, cross_builds: dict[str, subprocess.Popen[str]]):
    proc = cross_builds[source.name]
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "warning" not in stderr, stderr[-3000:]
