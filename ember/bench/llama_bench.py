"""Native llama.cpp (`llama-bench`) as a peer of `ember bench offline`.

One run is two fresh `llama-bench` processes on the same GGUF and thread count, flash
attention on, one repetition each (the bench's interleaved rounds provide the repeats):
  -p 512 -n 0           -> prefill_512_tok_s (a 512-token prompt into an empty context)
  -p 0 -n N -d 16,512   -> decode_16_tok_s / decode_512_tok_s (N tokens decoded one at a
                           time after 16 / 512 tokens of context, the filling untimed)
llama-bench reports neither load time, RSS, TTFT nor batched decode; those figures are absent.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LABEL = "llama.cpp-native"
FLAVOURS = ("native", "avx2")
"""Builds of shared/tools/build-llama-cpp.sh: `native` (tuned for this CPU) and `avx2` (AVX2 +
FMA only, AVX-512 off: what a laptop or an older server runs). Peer labels: llama.cpp-<flavour>."""
DECODE_DEPTHS = (16, 512)


def label_of(flavour: str) -> str:
    return f"llama.cpp-{flavour}"


def build_hint(flavour: str) -> str:
    return (f"build it with shared/tools/build-llama-cpp.sh {flavour} (about 5-10 min on 2 "
            "cores) or pass --llama-bench PATH")


def flavour_binary(flavour: str) -> Path:
    """Where `build-llama-cpp.sh <flavour>` puts llama-bench by default."""
    return (Path.home() / ".cache" / "ember-peers" / f"llama.cpp-{flavour}" / "build" / "bin"
            / "llama-bench")


def default_binary() -> Path:
    """Where `build-llama-cpp.sh native` puts llama-bench by default."""
    return flavour_binary("native")


def resolve_binary(path: str | None, flavour: str = "native") -> tuple[Path | None, str | None]:
    """(the llama-bench binary, None) or (None, a note saying why the peer is skipped).

    `path` is the binary or its bin folder; None auto-detects the default build of `flavour`.
    An explicit path that holds no llama-bench is an error, not a skip."""
    if path is None:
        found = default_binary() if flavour == "native" else flavour_binary(flavour)
        if found.is_file() and os.access(found, os.X_OK):
            return found, None
        return None, (f"{label_of(flavour)} skipped: no llama-bench at {found} "
                      f"({build_hint(flavour)})")
    binary = Path(path).expanduser()
    if binary.is_dir():
        binary = binary / "llama-bench"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise FileNotFoundError(f"--llama-bench {path}: no executable llama-bench there")
    return binary, None


def parse_results(text: str) -> dict[str, float]:
    """Figures from llama-bench's `-o json` output (a list with one object per test).

    A prompt test (n_gen 0) of 512 tokens at depth 0 gives prefill_512_tok_s; a generation
    test (n_prompt 0) at depth d gives decode_<d>_tok_s. Other tests are ignored."""
    figures: dict[str, float] = {}
    for test in json.loads(text):
        n_prompt, n_gen = int(test.get("n_prompt", 0)), int(test.get("n_gen", 0))
        depth = int(test.get("n_depth", 0))
        rate = float(test["avg_ts"])
        if n_gen == 0 and n_prompt == 512 and depth == 0:
            figures["prefill_512_tok_s"] = rate
        elif n_prompt == 0 and n_gen > 0:
            figures[f"decode_{depth}_tok_s"] = rate
    return figures


def run_engine_process(label: str, cmd: list[str], timeout_s: float,
                       env: dict[str, str] | None = None) -> str | None:
    """The stdout of one benchmark process, or None (reason logged) when it timed out or
    failed: a failed run is left out of the medians, never an error of the whole bench.
    env: the process environment (None: this one's)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        logger.warning("%s timed out after %.0f s", label, timeout_s)
        return None
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        logger.warning("%s failed: %s", label, tail[0])
        return None
    return proc.stdout


@dataclass(frozen=True)
class LlamaBenchSpec:
    """The llama-bench engine of `ember bench offline` (same interface as `EngineSpec`)."""

    binary: Path
    label: str = LABEL

    def commands(self, model_path: str, threads: int, decode_tokens: int) -> list[list[str]]:
        base = [str(self.binary), "-m", model_path, "-t", str(threads), "-fa", "1", "-r", "1",
                "-o", "json"]
        depths = ",".join(str(d) for d in DECODE_DEPTHS)
        return [base + ["-p", "512", "-n", "0"],
                base + ["-p", "0", "-n", str(decode_tokens), "-d", depths]]

    def run(self, model_path: str, threads: int, decode_tokens: int,
            timeout_s: float) -> dict[str, float] | None:
        figures: dict[str, Any] = {}
        for cmd in self.commands(model_path, threads, decode_tokens):
            stdout = run_engine_process(self.label, cmd, timeout_s)
            if stdout is None:
                return None
            try:
                figures.update(parse_results(stdout))
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("%s: unreadable llama-bench output: %s", self.label, exc)
                return None
        return figures
