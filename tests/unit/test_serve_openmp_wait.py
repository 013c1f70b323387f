"""`ember serve`'s OpenMP wait setting reaches libgomp, and the loading thread's OpenMP pool is
freed (ember/kernels/omp_runtime.py). Each case runs a fresh interpreter: libgomp reads its
environment once, when torch first loads it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ember.config import SERVE_OMP_SPIN_COUNT, ServingGuards

ROOT = Path(__file__).resolve().parents[2]

_SERVE_ENV = """
import sys
from ember.cli import build_parser
from ember.cli.serve import apply_openmp_environment
from ember.config import describe_openmp_wait
args = build_parser().parse_args(["serve", *sys.argv[1:]])
apply_openmp_environment(args.omp_spin_count)
print(describe_openmp_wait(), flush=True)
import torch
torch.ones(4096).sum()  # loads and initialises libgomp (OMP_DISPLAY_ENV prints its settings)
"""


def _run(code: str, *argv: str, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    base.update({"PYTHONPATH": str(ROOT), "OMP_DISPLAY_ENV": "VERBOSE", **(env or {})})
    return subprocess.run([sys.executable, "-c", code, *argv], env=base, capture_output=True,
                          text=True, timeout=120, check=True)


def test_serve_default_spin_count_reaches_libgomp():
    assert ServingGuards().omp_spin_count == SERVE_OMP_SPIN_COUNT
    out = _run(_SERVE_ENV)
    if SERVE_OMP_SPIN_COUNT is None:  # libgomp's own wait
        assert out.stdout.strip().startswith("libgomp default")  # the startup line
        assert "GOMP_SPINCOUNT = '300000'" in out.stderr  # libgomp's own report
    else:
        assert out.stdout.strip() == f"GOMP_SPINCOUNT={SERVE_OMP_SPIN_COUNT}"
        assert f"GOMP_SPINCOUNT = '{SERVE_OMP_SPIN_COUNT}'" in out.stderr


def test_serve_spin_count_flag_and_user_environment():
    out = _run(_SERVE_ENV, "--omp-spin-count", "libgomp")
    assert out.stdout.strip().startswith("libgomp default")
    assert "GOMP_SPINCOUNT = '300000'" in out.stderr
    out = _run(_SERVE_ENV, "--omp-spin-count", "1000")
    assert out.stdout.strip() == "GOMP_SPINCOUNT=1000"
    assert "GOMP_SPINCOUNT = '1000'" in out.stderr
    out = _run(_SERVE_ENV, "--omp-spin-count", "0")
    assert "GOMP_SPINCOUNT = '0'" in out.stderr
    out = _run(_SERVE_ENV, env={"GOMP_SPINCOUNT": "77"})  # the user's environment wins
    assert out.stdout.strip() == "GOMP_SPINCOUNT=77"
    assert "GOMP_SPINCOUNT = '77'" in out.stderr


def test_bad_spin_count_flag_is_a_usage_error():
    from ember.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--omp-spin-count", "lots"])


_POOL = """
import ctypes, os, threading, time
import torch
from ember.kernels.omp_runtime import release_thread_pool
torch.set_num_threads(2)
x = torch.randn(256, 256)

def busy():
    for _ in range(20):
        (x @ x).sum()

def threads():
    return set(os.listdir("/proc/self/task"))

busy()  # the main thread's pool: one OpenMP worker
before = threads()
ok = release_thread_pool()
# the worker leaves asynchronously: wait (bounded) for its /proc entry to go
deadline = time.monotonic() + 10.0
while not (before - threads()) and time.monotonic() < deadline:
    time.sleep(0.01)
print(ok, len(before - threads()), flush=True)  # its worker is gone
t = threading.Thread(target=busy); t.start(); t.join()
print(release_thread_pool(), flush=True)  # no pool on this thread now: still fine
"""


def test_release_thread_pool_ends_the_calling_threads_workers():
    out = _run(_POOL, env={"OMP_DISPLAY_ENV": "FALSE"})
    first, second = out.stdout.split("\n")[:2]
    assert first == "True 1"
    assert second == "True"
