"""The portable kernels compile for AArch64 (issue 15's ARM path), checked with a cross
compiler where one is installed (.ci/run installs g++-12-aarch64-linux-gnu): the x86-only
details (asm register constraints, intrinsics) must stay out of the portable flavour."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ember.kernels import build

CROSS = next((c for c in ("aarch64-linux-gnu-g++-12", "aarch64-linux-gnu-g++")
              if shutil.which(c)), None)


@pytest.mark.skipif(CROSS is None, reason="no AArch64 cross compiler "
                                          "(apt install g++-12-aarch64-linux-gnu)")
@pytest.mark.parametrize("source", build.SOURCES, ids=lambda p: p.name)
def test_portable_kernels_compile_for_aarch64_without_warnings(source: Path, tmp_path: Path):
    # build.py's flags for the portable flavour, with a named ARM core for the host's
    # -march=native (a cross compiler has no native CPU)
    flags = [f for f in build.PORTABLE.cxxflags if not f.startswith(("-march", "-mcpu"))]
    base = [f for f in build.BASE_FLAGS if f != "-shared"]
    assert CROSS is not None
    done = subprocess.run([CROSS, *base, "-mcpu=neoverse-n1", *flags, "-c", str(source),
                           "-o", str(tmp_path / "kernels.o")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning" not in done.stderr, done.stderr[-3000:]
