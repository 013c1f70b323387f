"""`ember run-batch` killed with SIGKILL at random points and restarted with the same command
finishes with every custom_id exactly once, every line whole and valid JSON."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import ember_command

NUM_REQUESTS = 24
RUN_TIMEOUT_S = 240.0


def _write_input(path: Path, rng: random.Random) -> tuple[set[str], int, int]:
    """Requests plus two bad-JSON lines and one duplicate; (ids, id-less lines, duplicates)."""
    lines = []
    for i in range(NUM_REQUESTS):
        url = "/v1/chat/completions" if i % 2 else "/v1/completions"
        body = ({"messages": [{"role": "user", "content": f"Tell me about the number {i}."}]}
                if i % 2 else {"prompt": f"Number {i} is"})
        body |= {"max_tokens": rng.randint(4, 12), "temperature": 0}
        lines.append(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url,
                                 "body": body}))
    lines.insert(5, "{broken")
    lines.insert(15, "also broken")
    lines.insert(10, lines[3])  # the duplicate of req-3
    path.write_text("\n".join(lines) + "\n")
    return {f"req-{i}" for i in range(NUM_REQUESTS)}, 2, 1


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _command(inp: Path, out: Path) -> list[str]:
    return [*ember_command(), "run-batch", "-i", str(inp), "-o", str(out), "--no-progress",
            "--max-num-seqs", "4", "--max-in-flight", "4"]


def _env() -> dict[str, str]:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", EMBER_NUM_THREADS="2")


def test_sigkill_and_resume_gives_every_custom_id_once(tmp_path: Path) -> None:
    seed = int(time.time())
    rng = random.Random(seed)
    print(f"kill points drawn with seed {seed}")
    inp, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    ids, num_idless, num_dups = _write_input(inp, rng)
    total = len(ids) + num_idless + num_dups
    kills = 0
    for _ in range(2):
        before = _count_lines(out)
        target = min(total - 1, before + rng.randint(1, 6))
        proc = subprocess.Popen(_command(inp, out), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while proc.poll() is None and _count_lines(out) < target:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("run-batch made no progress")
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1, "every run finished before it could be killed"
    done = subprocess.run(_command(inp, out), env=_env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    raw = out.read_bytes()
    assert raw.endswith(b"\n")
    lines = [json.loads(line) for line in raw.decode().splitlines()]  # every line valid JSON
    answered = [x["custom_id"] for x in lines
                if x["custom_id"] is not None and (x["error"] or {}).get("code")
                != "duplicate_custom_id"]
    assert sorted(answered) == sorted(ids)  # each id exactly once
    assert all(x["response"]["status_code"] == 200 for x in lines if x["custom_id"] in ids
               and x["error"] is None)
    assert sum(x["custom_id"] is None for x in lines) == num_idless
    assert sum((x["error"] or {}).get("code") == "duplicate_custom_id" for x in lines) == num_dups
    assert len(lines) == total
    # the rerun of a finished job changes nothing
    again = subprocess.run(_command(inp, out), env=_env(), capture_output=True, text=True,
                           timeout=RUN_TIMEOUT_S)
    assert again.returncode == 0 and out.read_bytes() == raw
