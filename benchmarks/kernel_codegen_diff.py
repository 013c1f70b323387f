"""Compare the machine code of Ember's kernels between a git revision and the working tree.

For each ISA flavour (avx512-vnni, avx2, portable: build.py's flags) and each kernel source
that includes kernels.h, both trees are compiled to assembly (-S, the library's -O3 flags);
every function is cut out, its local labels renumbered in order of appearance and its
assembler directives dropped, and the two are compared function by function. A refactor that
claims "the generated code is unchanged" shows `identical` for the functions that hold the
hot loops (the extern "C" entries and their OpenMP bodies, e.g. q4_gemm._omp_fn.0, into which
the tiles are inlined). Functions only one tree has are listed (inlining can move code).

    python benchmarks/kernel_codegen_diff.py --base f49d4fb [--isa avx2 --isa portable]
       [--show q4_tile] [--rename 'q4k_tile<(\d+)>=q4_tile<\1, Q4kScales>']
    # 2-5 min on 2 cores (8 compilations); writes nothing

The AVX-512 flavour only compiles here (no AVX-512 on this CPU); its code is compared all the same.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("cpu_kernels.cpp", "decoder.cpp", "q6_head.cpp")
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-fopenmp", "-fno-math-errno")
ISA_FLAGS = {
    "avx512-vnni": ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                    "-mavx512vnni", "-mavx512bf16"),
    "avx2": ("-mavx2", "-mfma", "-mf16c", "-DEMBER_ISA_AVX2"),
    "portable": ("-march=native", "-ffp-contract=fast", "-fno-trapping-math",
                 "-DEMBER_ISA_PORTABLE"),
}
LABEL = re.compile(r"\.L[A-Za-z]*\d+|CSWTCH\.\d+")


def export_tree(rev: str, dest: Path) -> Path:
    """ember/kernels of git revision rev, unpacked under dest."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "ember/kernels"],
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "ember/kernels"


def assemble(src_dir: Path, source: str, isa: str, out: Path) -> str:
    subprocess.run(["g++", *FLAGS, *ISA_FLAGS[isa], "-S", "-o", str(out), str(src_dir / source)],
                   check=True)
    return out.read_text()


SYMBOL = re.compile(r"_Z[\w.$]+")


def demangle(names: set[str]) -> dict[str, str]:
    ordered = sorted(names)
    proc = subprocess.run(["c++filt"], input="\n".join(ordered), capture_output=True, text=True)
    if proc.returncode != 0:
        return {n: n for n in ordered}
    return dict(zip(ordered, proc.stdout.splitlines()))


def short(name: str) -> str:
    """A demangled name without its parameter list and namespace noise."""
    name = name.replace("(anonymous namespace)::", "")
    depth = 0
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            rest = name[i:]
            clone = rest[rest.index(")") + 1:].strip() if ")" in rest else ""
            return name[:i] + (f" {clone}" if clone.startswith("[clone") else "")
    return name


def functions(asm: str, rename: list[tuple[re.Pattern[str], str]]) -> dict[str, list[str]]:
    """Function name (short, renamed) -> its normalized instructions: labels renumbered,
    directives dropped, called symbols demangled and renamed alike."""
    raw: dict[str, list[str]] = {}
    name, body = None, []
    for line in asm.splitlines():
        s = line.strip()
        if s.startswith(".type") and s.endswith("@function"):
            name, body = s.split()[1].rstrip(","), []
        elif name and s.startswith(".size") and s.split()[1].rstrip(",") == name:
            raw[name] = body
            name = None
        elif name and s and not (s.startswith(".") and not s.startswith(".L")):
            body.append(s)
    symbols = set(raw) | {m for b in raw.values() for line in b for m in SYMBOL.findall(line)}
    pretty = demangle(symbols)

    def canon(sym: str) -> str:
        out = short(pretty.get(sym, sym))
        for pat, rep in rename:
            out = pat.sub(rep, out)
        return out

    out: dict[str, list[str]] = {}
    for fn, body in raw.items():
        labels: dict[str, str] = {}
        norm = [SYMBOL.sub(lambda m: canon(m.group(0)),
                           LABEL.sub(lambda m: labels.setdefault(m.group(0), f".L{len(labels)}"), b))
                for b in body]
        out[canon(fn)] = norm
    return out


def compare(base: Path, new: Path, isa: str, source: str, tmp: Path, show: list[str],
            rename: list[tuple[re.Pattern[str], str]]) -> list[str]:
    tag = f"{isa}-{source}"
    fa = functions(assemble(base, source, isa, tmp / f"base-{tag}.s"), rename)
    fb = functions(assemble(new, source, isa, tmp / f"new-{tag}.s"), [])
    same = sorted(n for n in set(fa) & set(fb) if fa[n] == fb[n])
    lines = [f"== {isa} {source}: {len(fa)} functions (base), {len(fb)} (new); "
             f"{len(same)} identical"]
    for n in sorted(set(fa) | set(fb)):
        if n in fa and n in fb and fa[n] != fb[n]:
            lines.append(f"   DIFFERENT {n} ({len(fa[n])} -> {len(fb[n])} instructions)")
            if any(s in n for s in show):
                lines += ["      " + d for d in difflib.unified_diff(fa[n], fb[n], lineterm="", n=2)]
        elif n not in fb:
            lines.append(f"   only base {n} ({len(fa[n])} instructions)")
        elif n not in fa:
            lines.append(f"   only new  {n} ({len(fb[n])} instructions)")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="git revision to compare the working tree with")
    p.add_argument("--isa", action="append", choices=sorted(ISA_FLAGS),
                   help="ISA flavour(s) (default: all three)")
    p.add_argument("--source", action="append", choices=SOURCES, help="default: all")
    p.add_argument("--show", action="append", default=[],
                   help="print the instruction diff of differing functions whose name has this")
    p.add_argument("--rename", action="append", default=[], metavar="REGEX=REPLACEMENT",
                   help="a function the change renamed: applied to the base's (short) names "
                        "and the symbols its code calls, e.g. 'q4k_tile<(\\d+)>=q4_tile<\\1, Q4kScales>'")
    args = p.parse_args()
    rename = [(re.compile(r.split("=", 1)[0]), r.split("=", 1)[1]) for r in args.rename]
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        base = export_tree(args.base, tmp / "base")
        new = Path(shutil.copytree(ROOT / "ember/kernels", tmp / "new"))  # a snapshot
        jobs = [(isa, src) for isa in (args.isa or list(ISA_FLAGS))
                for src in (args.source or SOURCES)]
        with ThreadPoolExecutor(2) as pool:
            reports = pool.map(lambda j: compare(base, new, j[0], j[1], tmp, args.show, rename), jobs)
            for lines in reports:
                print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
