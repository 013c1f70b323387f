"""Real `ember serve` processes for the end-to-end tests, talked to with the `openai` client.

Two servers per session, started together so their model loads overlap:
- `server`: default limits, used by most tests;
- `limited_server`: API keys, rate limits, a one-slot queue; the SIGTERM test ends it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

STARTUP_TIMEOUT_S = 180.0
MAIN_KEY = "sk-main"
EXTRA_KEYS = ("sk-rate", "sk-tpm", "sk-queue-a", "sk-queue-b", "sk-queue-c", "sk-term")
RATE_LIMIT_RPM = 5
RATE_LIMIT_TPM = 400
STREAM_READ_TIMEOUT_S = 4
"""The main server's --stream-read-timeout (test_stalled_reader waits this long)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ember_command() -> list[str]:
    script = Path(sys.executable).with_name("ember")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from ember.cli import main; sys.exit(main())"]


@dataclass
class ServerProcess:
    """One `ember serve` subprocess."""

    args: list[str]
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    saw_loading: bool = False
    """True when /health answered 503 before 200 (the model loads in the background)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", EMBER_NUM_THREADS="2")
        env.pop("EMBER_API_KEY", None)
        cmd = [*ember_command(), "serve", "--port", str(self.port), "--log-level", "warning",
               "--no-access-log", *self.args]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ember serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status = httpx.get(f"{self.url}/health", timeout=2).status_code
            except httpx.HTTPError:
                status = None
            if status == 200:
                return
            self.saw_loading |= status == 503
            time.sleep(0.25)
        pytest.fail(f"ember serve not ready after {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def _servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    tmp = tmp_path_factory.mktemp("ember-serve")
    key_file = tmp / "keys.txt"
    key_file.write_text("# test keys\n" + "\n".join(EXTRA_KEYS) + "\n")
    servers = {
        "main": ServerProcess(["--seed", "0", "--batch-dir", str(tmp / "batches"),
                               "--stream-read-timeout", str(STREAM_READ_TIMEOUT_S)],
                              tmp / "main.log"),
        "limited": ServerProcess(
            ["--api-key", MAIN_KEY, "--api-key-file", str(key_file),
             "--rate-limit-rpm", str(RATE_LIMIT_RPM), "--rate-limit-tpm", str(RATE_LIMIT_TPM),
             "--max-num-seqs", "1", "--max-queued-requests", "1", "--shutdown-grace", "60"],
            tmp / "limited.log"),
    }
    for server in servers.values():
        server.start()
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="session")
def server_process() -> type[ServerProcess]:
    """`ServerProcess`, for tests that start a server of their own."""
    return ServerProcess


@pytest.fixture(scope="session")
def limits() -> dict[str, object]:
    """The keys and limits `limited_server` runs with."""
    return {"main_key": MAIN_KEY, "rpm": RATE_LIMIT_RPM, "tpm": RATE_LIMIT_TPM}


@pytest.fixture(scope="session")
def server(_servers: dict[str, ServerProcess]) -> ServerProcess:
    _servers["main"].wait_ready()
    return _servers["main"]


@pytest.fixture(scope="session")
def limited_server(_servers: dict[str, ServerProcess]) -> ServerProcess:
    _servers["limited"].wait_ready()
    return _servers["limited"]


@pytest.fixture(scope="session")
def client(server: ServerProcess):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_name(client) -> str:
    return client.models.list().data[0].id


def metric_value(url: str, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` (optionally with a label substring) in /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"metric {name} missing from /metrics"
    return total


@pytest.fixture(scope="session")
def metric():
    """`metric(url, name, labels="")`: the summed value of a metric in /metrics."""
    return metric_value


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.model)
