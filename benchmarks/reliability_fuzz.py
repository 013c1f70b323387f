"""schemathesis (all checks but positive_data_acceptance, see tests/unit/test_openapi_fuzz.py,
with a 600 s response-time limit: speed is not the point here)
against a real `ember serve` on the default model: thousands of generated requests, which must
give 0 5xx and 0 schema violations. Writes the summary JSON (+ schemathesis' JUnit report) to
benchmarks/results/reliability/.

One command:
    flock /tmp/ember-bench.lock python benchmarks/reliability_fuzz.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

OUT = Path(__file__).parent / "results" / "reliability"


def _five_xx(metrics: str) -> dict[str, float]:
    """5xx counters of ember:http_requests_total by label set."""
    out = {}
    for line in metrics.splitlines():
        if line.startswith("ember:http_requests_total") and re.search(r'status="5\d\d"', line):
            labels, value = line.rsplit(" ", 1)
            out[labels] = float(value)
    return out


def _network_errors(text: str) -> int:
    """Cases schemathesis reports as errored (timeouts, dropped connections)."""
    found = re.search(r"(\d+) errored", text)
    return int(found.group(1)) if found else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-examples", type=int, default=80,
                    help="examples per operation and phase (19 operations: 4,392 cases in all "
                         "at 150, so > 2,300 at 80)")
    ap.add_argument("--port", type=int, default=8441)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=512,
                    help="the server's context: bounds the requests without max_tokens (which "
                         "generate to the end of the context: at 8192 tokens on a busy machine "
                         "they outlived the client timeout, counted as network errors)")
    ap.add_argument("--speculative-config", default=None, metavar="JSON",
                    help="serve with speculative decoding (ember serve's flag), e.g. "
                         "'{\"method\": \"suffix\", \"num_speculative_tokens\": 16}'")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    spec = ["--speculative-config", args.speculative_config] if args.speculative_config else []
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ember.cli import main; sys.exit(main())",
         "serve", "--port", str(args.port), "--no-access-log", "--log-level", "warning",
         "--max-num-seqs", "16", "--max-queued-requests", "64",
         "--max-model-len", str(args.max_model_len), *spec],
        stdout=subprocess.DEVNULL, stderr=open(args.out / f"fuzz_{stamp}_server.log", "w"))
    try:
        url = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 600  # a first start may compile the kernels
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                print("error: ember serve did not become ready (see the server log)")
                return 1
            time.sleep(0.5)
        before = _five_xx(httpx.get(f"{url}/metrics", timeout=5).text)  # e.g. /health 503s
        start, load_before = time.monotonic(), os.getloadavg()
        junit = args.out / f"fuzz_{stamp}_junit.xml"
        proc = subprocess.run(
            [str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json",
             "--checks", "all",
             "--exclude-checks", "positive_data_acceptance", "--max-response-time", "600",
             "--max-examples", str(args.max_examples), "--seed", str(args.seed),
             "--request-timeout", "120", "--report", "junit",
             "--report-junit-path", str(junit), "--no-color"],
            capture_output=True, text=True)
        elapsed = time.monotonic() - start
        health = httpx.get(f"{url}/health", timeout=5).status_code
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    text = proc.stdout + proc.stderr
    cases = sum(int(n) for n in re.findall(r"(\d+) generated", text)) or None
    after = _five_xx(metrics)
    five_xx_lines = {k: v - before.get(k, 0.0) for k, v in after.items()
                     if v - before.get(k, 0.0) > 0}
    five_xx = sum(five_xx_lines.values())
    summary = {"passed": proc.returncode == 0 and five_xx == 0 and (cases or 0) >= 2000,
               "exit_code": proc.returncode, "cases_generated": cases, "server_5xx": five_xx,
               "server_5xx_by_label": five_xx_lines,
               "health_after": health, "seconds": elapsed, "max_examples": args.max_examples,
               "max_model_len": args.max_model_len,
               "speculative_config": args.speculative_config,
               "network_errors": _network_errors(text),
               "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
               "contended": os.getloadavg()[0] > (os.cpu_count() or 1),
               "schemathesis_tail": text[-6000:]}
    path = args.out / f"fuzz_{stamp}.json"
    path.write_text(json.dumps(summary, indent=2))
    print(text[-3000:])
    print(f"wrote {path}: exit {proc.returncode}, {cases} cases, {five_xx:.0f} 5xx")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
