"""Serving benchmark: load any OpenAI-compatible server (Ember, vLLM, llama.cpp,
llama-cpp-python, ...) with streamed /v1/completions requests and measure it.

For each concurrency level, N clients send requests back to back (closed loop), or, with a
request rate, requests arrive as a seeded Poisson process (open loop, at most `concurrency` in
flight). Reports requests/s, output tokens/s, time to first token (TTFT), inter-token latency
(ITL: gaps between streamed text chunks), time per output token, end-to-end latency and
errors. Output tokens come from the usage chunk when the server sends one, else one token per
non-empty chunk (what llama.cpp-style servers stream).

Prompts are seeded random common words (about one token each), distinct per request so that a
prefix cache cannot make the benchmark trivial.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

logger = logging.getLogger(__name__)

_WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or have an "
    "they which one you were her all she there would their we him been has when who will more "
    "no if out so said what up its about into than them can only other new some could time "
    "these two may then do first any my now such like our over man me even most made after "
    "also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see "
    "men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three house "
    "garden letter morning evening sister brother mother father village river window table"
).split()


def wait_healthy(proc: subprocess.Popen, url: str, name: str, timeout_s: float) -> None:
    """Wait until the server `proc` at `url` answers GET /health with 200; kill it and raise
    RuntimeError if it exits first or is not ready within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{name} did not become ready in {timeout_s:.0f} s")


@dataclass
class BenchConfig:
    """One benchmark run against one server."""

    url: str
    """Base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)."""
    model: str | None = None
    """Model name to send; None asks GET /v1/models and takes the first."""
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 32])
    request_rate: float | None = None
    """Requests per second (Poisson arrivals); None = closed loop at each concurrency."""
    num_prompts: int | None = None
    """Requests per level; None = 2 x concurrency (at least 4)."""
    input_len: int = 128
    output_len: int = 128
    seed: int = 0
    api_key: str | None = None
    ignore_eos: bool = True
    """Send ignore_eos=true (Ember, vLLM, llama.cpp) so every request makes output_len tokens."""
    stream_usage: bool = True
    """Send stream_options.include_usage to get exact token counts."""
    timeout_s: float = 600.0
    label: str = ""
    """Name of the server in the report (default: the URL)."""


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    output_tokens: int = 0


@dataclass
class LevelResult:
    """Aggregates of one concurrency level."""

    concurrency: int
    request_rate: float | None
    num_requests: int
    num_errors: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    tpot_ms: dict[str, float]
    e2e_ms: dict[str, float]
    errors: list[str] = field(default_factory=list)


def _pcts(values: list[float]) -> dict[str, float]:
    """mean, p50, p90, p99 in milliseconds (NaN when empty)."""
    if not values:
        return {k: float("nan") for k in ("mean", "p50", "p90", "p99")}
    arr = np.asarray(values) * 1000.0
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"mean": float(arr.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def make_prompts(count: int, input_len: int, seed: int) -> list[str]:
    """`count` distinct prompts of about `input_len` tokens (seeded)."""
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(_WORDS) for _ in range(max(1, input_len - 3)))
            for i in range(count)]


class ServeBenchmark:
    """Runs a `BenchConfig` (use `await run()`)."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        base = config.url.rstrip("/")
        self.base = base[:-3] if base.endswith("/v1") else base
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        limits = httpx.Limits(max_connections=max(config.concurrency) + 8,
                              max_keepalive_connections=max(config.concurrency) + 8)
        self.client = httpx.AsyncClient(headers=headers, limits=limits,
                                        timeout=httpx.Timeout(config.timeout_s, connect=30))
        self.model = config.model

    async def run(self) -> list[LevelResult]:
        try:
            if self.model is None:
                self.model = await self._first_model()
            await self._warmup()
            results = []
            for level in self.config.concurrency:
                logger.info("benchmarking concurrency %d", level)
                results.append(await self.run_level(level))
            return results
        finally:
            await self.client.aclose()

    async def _first_model(self) -> str:
        resp = await self.client.get(f"{self.base}/v1/models")
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])

    async def _warmup(self) -> None:
        """One short request; drop extension fields the server refuses (e.g. ignore_eos)."""
        prompt = make_prompts(1, 8, self.config.seed + 999)[0]
        for _ in range(3):
            result = await self.one_request(prompt, max_tokens=4)
            if result.ok or not result.error.startswith("HTTP 4"):
                return
            if self.config.stream_usage:
                logger.warning("server refused stream_options; counting streamed chunks")
                self.config.stream_usage = False
            elif self.config.ignore_eos:
                logger.warning("server refused ignore_eos; outputs may end early")
                self.config.ignore_eos = False
        raise RuntimeError(f"warm-up request failed: {result.error}")

    def _body(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                                "temperature": 0.0, "stream": True, "seed": self.config.seed}
        if self.config.stream_usage:
            body["stream_options"] = {"include_usage": True}
        if self.config.ignore_eos:
            # NOTE: min_tokens too: servers without ignore_eos (llama-cpp-python) honour it.
            body["ignore_eos"] = True
            body["min_tokens"] = max_tokens
        return body

    async def one_request(self, prompt: str, max_tokens: int) -> RequestResult:
        """Send one streamed completion and time its chunks."""
        start = time.perf_counter()
        result = RequestResult(ok=False)
        last = None
        chunks = 0
        usage_tokens = None
        try:
            async with self.client.stream("POST", f"{self.base}/v1/completions",
                                          json=self._body(prompt, max_tokens)) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:300]
                    result.error = f"HTTP {resp.status_code}: {text}"
                    return result
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    data = json.loads(payload)
                    if "error" in data:
                        result.error = str(data["error"].get("message", data["error"]))[:300]
                        return result
                    now = time.perf_counter()
                    if (data.get("usage") or {}).get("completion_tokens") is not None:
                        usage_tokens = int(data["usage"]["completion_tokens"])
                    if any(c.get("text") for c in data.get("choices") or []):
                        chunks += 1
                        if last is None:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
        except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"[:300]
            return result
        result.e2e_s = time.perf_counter() - start
        result.output_tokens = usage_tokens if usage_tokens is not None else chunks
        result.ok = last is not None
        if not result.ok:
            result.error = "no text was streamed"
        return result

    async def run_level(self, concurrency: int) -> LevelResult:
        cfg = self.config
        count = cfg.num_prompts or max(4, 2 * concurrency)
        prompts = make_prompts(count, cfg.input_len, cfg.seed + concurrency)
        pending: asyncio.Queue[str] = asyncio.Queue()
        for p in prompts:
            pending.put_nowait(p)
        results: list[RequestResult] = []
        start = time.perf_counter()
        if cfg.request_rate is None:
            async def worker() -> None:
                while not pending.empty():
                    results.append(await self.one_request(pending.get_nowait(),
                                                          cfg.output_len))
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            results = await self._open_loop(prompts, concurrency, cfg.request_rate)
        duration = time.perf_counter() - start
        return summarize(results, concurrency, cfg.request_rate, duration)

    async def _open_loop(self, prompts: list[str], concurrency: int,
                         rate: float) -> list[RequestResult]:
        rng = np.random.default_rng(self.config.seed)
        gate = asyncio.Semaphore(concurrency)

        async def send(prompt: str) -> RequestResult:
            async with gate:
                return await self.one_request(prompt, self.config.output_len)

        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(send(prompt)))
            await asyncio.sleep(float(rng.exponential(1.0 / rate)))
        return list(await asyncio.gather(*tasks))


def summarize(results: list[RequestResult], concurrency: int, rate: float | None,
              duration: float) -> LevelResult:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = sorted({r.error for r in results if not r.ok})[:5]
    return LevelResult(
        concurrency=concurrency, request_rate=rate, num_requests=len(results),
        num_errors=len(results) - len(ok), duration_s=duration,
        requests_per_s=len(ok) / duration if duration > 0 else 0.0,
        output_tokens_per_s=tokens / duration if duration > 0 else 0.0,
        ttft_ms=_pcts([r.ttft_s for r in ok]),
        itl_ms=_pcts([gap for r in ok for gap in r.itl_s]), tpot_ms=_pcts(tpot),
        e2e_ms=_pcts([r.e2e_s for r in ok]), errors=errors)


def write_report(config: BenchConfig, model: str | None, levels: list[LevelResult],
                 out_dir: Path) -> tuple[Path, Path]:
    """Write <out>/bench_serve_<time>.json and .png; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = out_dir / f"bench_serve_{stamp}.json"
    payload = {"config": {**asdict(config), "api_key": None}, "model": model,
               "label": config.label or config.url, "results": [asdict(r) for r in levels]}
    json_path.write_text(json.dumps(payload, indent=2))
    png_path = out_dir / f"bench_serve_{stamp}.png"
    plot_levels(levels, config.label or config.url, png_path)
    return json_path, png_path


def plot_levels(levels: list[LevelResult], title: str, path: Path) -> None:
    """Latency (TTFT, ITL percentiles) and throughput against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [lv.concurrency for lv in levels]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, name in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "itl_ms", "ITL")):
        for pct, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(xs, [getattr(lv, key)[pct] for lv in levels], style, label=pct)
        ax.set(xlabel="concurrent clients", ylabel=f"{name} (ms)", title=f"{name} vs concurrency")
    axes[2].plot(xs, [lv.output_tokens_per_s for lv in levels], "o-", label="output tok/s")
    axes[2].set(xlabel="concurrent clients", ylabel="output tokens/s", title="throughput")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"ember bench serve: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_table(levels: list[LevelResult], title: str) -> Any:
    """A rich Table of the results (the CLI prints it)."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("clients", "reqs", "err", "req/s", "out tok/s", "TTFT p50", "p90", "p99",
                "ITL p50", "p90", "p99", "TPOT p50", "e2e p50"):
        table.add_column(col, justify="right")
    for lv in levels:
        ms = [f"{d[p]:.0f}" for d in (lv.ttft_ms, lv.itl_ms) for p in ("p50", "p90", "p99")]
        table.add_row(str(lv.concurrency), str(lv.num_requests), str(lv.num_errors),
                      f"{lv.requests_per_s:.2f}", f"{lv.output_tokens_per_s:.1f}", *ms,
                      f"{lv.tpot_ms['p50']:.0f}", f"{lv.e2e_ms['p50'] / 1000:.1f}s")
    table.caption = "latencies in ms unless marked; TPOT = (e2e - TTFT) / (tokens - 1)"
    return table
