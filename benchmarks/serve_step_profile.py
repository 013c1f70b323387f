"""Where one streamed client's time goes in `ember serve` (issue 11): a per-token breakdown.

Starts `ember serve` with timing wrappers around the engine thread's step cycle and the event
loop's callbacks, streams `--rounds` one-client completions (16-token prompt given as token
ids, greedy, ignore_eos, the lean client of serve_few_clients.py), stops the server and prints
medians per engine step (after the warm-up request; cycles over 50 ms, i.e. idle gaps between
requests, left out):
  step      LLMEngine.step (schedule + model + sample + detokenize: what offline also pays)
  handoff   the engine thread's wait for the event loop after a step (handoff.py)
  rest      the rest of the engine thread's cycle (dispatch, stats, metrics, commands)
  loop      event-loop callback time per step (SSE encoding, socket writes, mailbox, ...)
and how many steps ran on each kernel thread count (the auto policy's arms). cycle = step +
handoff + rest; offline pays ~step per token, so rest + handoff is what the server adds on the
engine's path. With a core left to the front end the loop's time overlaps the step, but its
Python still takes the GIL from the engine thread's Python (rest grows instead of handoff).

    flock /tmp/ember-bench.lock python benchmarks/serve_step_profile.py --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _stream_client import stream_completion

from ember.bench.serve import wait_healthy

_WRAPPED_SERVE = r"""
import asyncio, atexit, json, sys, threading, time
from ember.engine.engine import LLMEngine
from ember.engine.handoff import StepHandoff
out_path = sys.argv.pop(1)
rec = {"step": [], "start": [], "wait": [], "threads": [], "loop_busy_s": 0.0, "loop_calls": 0}
step, wait, run = LLMEngine.step, StepHandoff.wait, asyncio.events.Handle._run
main = threading.main_thread()

def timed_step(self):
    t0 = time.perf_counter()
    out = step(self)
    rec["start"].append(t0)
    rec["step"].append(time.perf_counter() - t0)
    kernels = self.core.kernels
    rec["threads"].append(kernels.num_threads if kernels is not None else 0)
    return out

def timed_wait(self):
    t0 = time.perf_counter()
    wait(self)
    rec["wait"].append((t0, time.perf_counter() - t0))

def timed_run(self):
    t0 = time.perf_counter()
    run(self)
    if threading.current_thread() is main:
        rec["loop_busy_s"] += time.perf_counter() - t0
        rec["loop_calls"] += 1

LLMEngine.step, StepHandoff.wait, asyncio.events.Handle._run = timed_step, timed_wait, timed_run
atexit.register(lambda: open(out_path, "w").write(json.dumps(rec)))
from ember.cli import main as cli_main
sys.exit(cli_main())
"""


def breakdown(rec: dict, first_step: int, max_cycle_s: float = 0.05) -> dict[str, float]:
    """Per-step medians (ms) over the steps from `first_step` whose cycle (start to the next
    step's start) is under `max_cycle_s` (decode steps of a running stream)."""
    starts, steps = rec["start"][first_step:], rec["step"][first_step:]
    waits = sorted(rec["wait"])
    cycles, handoffs, rests = [], [], []
    j = 0
    for i in range(len(starts) - 1):
        cycle = starts[i + 1] - starts[i]
        waited = 0.0
        while j < len(waits) and waits[j][0] < starts[i + 1]:
            if waits[j][0] >= starts[i]:
                waited += waits[j][1]
            j += 1
        if cycle < max_cycle_s:
            cycles.append(cycle)
            handoffs.append(waited)
            rests.append(cycle - steps[i] - waited)
    ms = 1e3
    n = max(1, len(rec["step"]))
    threads = rec["threads"][first_step:]
    return {"steps": len(cycles),
            "cycle_ms_p50": ms * statistics.median(cycles),
            "step_ms_p50": ms * statistics.median(steps),
            "handoff_ms_p50": ms * statistics.median(handoffs),
            "handoff_ms_mean": ms * statistics.fmean(handoffs),
            "rest_ms_p50": ms * statistics.median(rests),
            "loop_busy_ms_per_step": ms * rec["loop_busy_s"] / n,
            "loop_calls_per_step": rec["loop_calls"] / n,
            "steps_by_kernel_threads": dict(Counter(threads))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--input-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=8471)
    ap.add_argument("--serve-args", default="", help="extra `ember serve` arguments")
    args = ap.parse_args()
    rec_path = Path(tempfile.mkdtemp()) / "steps.json"
    cmd = [sys.executable, "-c", _WRAPPED_SERVE, str(rec_path), "serve", "--model", args.model,
           "--port", str(args.port), "--no-access-log", "--log-level", "warning",
           "--generation-config", "none", *args.serve_args.split()]
    env = dict(os.environ, EMBER_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    rates = []
    try:
        wait_healthy(proc, f"http://127.0.0.1:{args.port}", "ember serve", 300)
        body = {"max_tokens": args.output_len, "ignore_eos": True, "temperature": 0.0}
        stream_completion(args.port, {**body, "prompt": [7] * args.input_len}, 300)  # warm-up
        time.sleep(0.2)
        for r in range(args.rounds):
            prompt = [1000 + r + i for i in range(args.input_len)]
            s = stream_completion(args.port, {**body, "prompt": prompt}, 300)
            rates.append((len(s.tokens) - 1) / (s.tokens[-1] - s.tokens[0]))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    rec = json.loads(rec_path.read_text())
    result = {"decode_tok_s": [round(r, 1) for r in rates],
              "decode_tok_s_median": statistics.median(rates),
              **breakdown(rec, first_step=args.output_len), "loadavg": os.getloadavg()}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
