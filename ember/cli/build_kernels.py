"""`ember build-kernels`: compile every kernel flavour this CPU runs into the kernel cache.

Run it once at install time (or in an image build) so a machine without a C++ compiler at run
time still gets the kernels: `CpuKernels.load` finds the cached library (verified by its hash)
and never calls the compiler. Prints one line per ISA: built, already cached, or why not.
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.markup import escape


def cmd_build_kernels(args: argparse.Namespace) -> int:
    from ember.config import EnvSettings
    from ember.kernels.build import ISAS, ensure_built, supported_isas

    env = EnvSettings.from_env()
    cache_dir = args.cache_dir or env.cache_dir
    console = Console(soft_wrap=True)
    isas = supported_isas()
    if args.isa:
        isas = [isa for isa in ISAS if isa.name in args.isa and isa in isas]
    failed = 0
    for isa in isas:
        t0 = time.perf_counter()
        try:
            path, built = ensure_built(cache_dir, isa, env.cxx)
        except (OSError, RuntimeError) as e:
            failed += 1
            console.print(f"[red]{isa.name}: not built[/] ({escape(str(e).splitlines()[0])})",
                          highlight=False)
            continue
        what = f"built in {time.perf_counter() - t0:.0f} s" if built else "already cached"
        console.print(f"{isa.name}: {what}: {path}", highlight=False)
    skipped = [isa.name for isa in ISAS if isa not in isas]
    if skipped:
        console.print(f"skipped (this CPU cannot run them{' or not asked' if args.isa else ''}):"
                      f" {', '.join(skipped)}", highlight=False)
    return 1 if failed or not isas else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-kernels", help="compile Ember's CPU kernels for every instruction "
                                             "set this CPU runs into the kernel cache")
    p.add_argument("--isa", action="append", default=None,
                   help="only this ISA (repeatable): avx512-vnni, avx2, portable")
    p.add_argument("--cache-dir", default=None,
                   help="cache root (default: $EMBER_CACHE_DIR or ~/.cache/ember)")
    p.set_defaults(func=cmd_build_kernels)
