"""Soak test of `ember serve`: 64 clients for 10 minutes mixing well-behaved and bad clients.

Client kinds (all loop until the end, each on its own connection per request):
- streamed:      streamed completion, read to [DONE] (well-behaved: must finish, 200);
- non-streamed:  plain completion / chat completion (well-behaved: must finish, 200);
- aborted:       streamed, reads a few chunks, then closes the connection;
- disconnected:  sends a request and closes the socket before any answer;
- stalled:       streamed with a big output (n=4, top logprobs), never reads its socket, keeps
                 it open for --stall-hold seconds (the server should abort it after its
                 --stream-read-timeout once its bounded socket buffers are full), then closes.

Reports (JSON + PNG under benchmarks/results/reliability/): 5xx count (client side and the
server's own `ember:http_requests` by status), completion of well-behaved requests, server RSS
growth after warm-up (< 5% is the target; before the clock starts every KV block is written
once, since the cache's pages are materialised on first write, and warm-up lasts the first
quarter of the run), KV blocks back in the pool at the end (usage 0, no
running/waiting sequences), and metrics consistency (engine requests added = finished + failed;
and, for information, HTTP requests counted vs sent). Exit status 1 when a target is missed.

One command (quiet machine, 10 minutes; --minutes to shorten):
    flock /tmp/ember-bench.lock python benchmarks/soak.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ember.bench.serve import wait_healthy

OUT = Path(__file__).parent / "results" / "reliability"
KINDS = {"streamed": 24, "non_streamed": 16, "aborted": 8, "disconnected": 8, "stalled": 8}
WELL_BEHAVED = ("streamed", "non_streamed")
_WORDS = ("garden letter morning evening sister brother mother father village river window "
          "table house year life world work people day time").split()


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    status: Counter[str] = field(default_factory=Counter)
    """Client-seen HTTP status codes ('kind:code')."""
    failures: list[str] = field(default_factory=list)
    """Well-behaved requests that did not complete (first 50)."""
    failed: int = 0
    """All of them."""
    tokens: int = 0
    """Output tokens the well-behaved clients received (stream chunks; usage when not streamed)."""

    def fail(self, kind: str, why: str) -> None:
        self.failed += 1
        if len(self.failures) < 50:
            self.failures.append(f"{kind}: {why}")


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 40)))


async def streamed(client: httpx.AsyncClient, rng: random.Random, tally: Tally,
                   abort_after: int | None) -> None:
    kind = "streamed" if abort_after is None else "aborted"
    body = {"prompt": prompt(rng), "max_tokens": rng.randint(8, 96), "stream": True,
            "temperature": 0.8}
    if rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    tally.sent[kind] += 1
    chunks, done = 0, False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            tally.status[f"{kind}:{resp.status_code}"] += 1
            if resp.status_code != 200:
                await resp.aread()
                tally.fail(kind, f"HTTP {resp.status_code}")
                return
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                    break
                if line.startswith("data:"):
                    chunks += 1
                    if abort_after is None:
                        tally.tokens += 1
                    if abort_after is not None and chunks >= abort_after:
                        tally.ok[kind] += 1
                        return  # leaving the context closes the connection mid-stream
    except httpx.HTTPError as exc:
        tally.fail(kind, f"{type(exc).__name__}: {exc}")
        return
    if done and chunks > 0:
        tally.ok[kind] += 1
    elif abort_after is None:
        tally.fail(kind, f"stream ended without [DONE] after {chunks} chunks")


async def non_streamed(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    kind = "non_streamed"
    tally.sent[kind] += 1
    chat = rng.random() < 0.5
    body: dict[str, object] = {"max_tokens": rng.randint(8, 64), "temperature": 0.8}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt(rng)}]
    else:
        body["prompt"] = prompt(rng)
        body["n"] = rng.choice((1, 1, 2))
    try:
        resp = await client.post("/v1/chat/completions" if chat else "/v1/completions",
                                 json=body)
    except httpx.HTTPError as exc:
        tally.fail(kind, f"{type(exc).__name__}: {exc}")
        return
    tally.status[f"{kind}:{resp.status_code}"] += 1
    if resp.status_code == 200 and resp.json().get("choices"):
        tally.ok[kind] += 1
        tally.tokens += int(resp.json().get("usage", {}).get("completion_tokens", 0))
    else:
        tally.fail(kind, f"HTTP {resp.status_code}: {resp.text[:200]}")


def _raw_request(body: dict[str, object]) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)


async def disconnected(port: int, rng: random.Random, tally: Tally) -> None:
    """Send a request, close before any answer (after 0-300 ms)."""
    tally.sent["disconnected"] += 1
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_raw_request({"prompt": prompt(rng), "max_tokens": 64,
                               "stream": rng.random() < 0.5}))
    await writer.drain()
    await asyncio.sleep(rng.uniform(0, 0.3))
    writer.close()
    tally.ok["disconnected"] += 1


async def stalled(port: int, rng: random.Random, tally: Tally, hold_s: float) -> None:
    """A streamed request with a big output whose socket is never read."""
    tally.sent["stalled"] += 1
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, _raw_request(
            {"prompt": prompt(rng), "max_tokens": 1024, "n": 4, "logprobs": 10,
             "stream": True, "ignore_eos": True, "temperature": 1.0}))
        await asyncio.sleep(hold_s)
        tally.ok["stalled"] += 1
    finally:
        sock.close()


async def client_loop(kind: str, index: int, args: argparse.Namespace, end: float,
                      tally: Tally) -> None:
    rng = random.Random(f"{kind}-{index}")
    base = f"http://127.0.0.1:{args.port}"
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=args.request_timeout,
                                 limits=limits) as client:
        await asyncio.sleep(rng.uniform(0, 3))  # stagger the start
        while time.monotonic() < end:
            if kind == "streamed":
                await streamed(client, rng, tally, None)
            elif kind == "aborted":
                await streamed(client, rng, tally, rng.randint(1, 6))
            elif kind == "non_streamed":
                await non_streamed(client, rng, tally)
            elif kind == "disconnected":
                await disconnected(args.port, rng, tally)
                await asyncio.sleep(rng.uniform(0.2, 1.0))
            else:
                await stalled(args.port, rng, tally, args.stall_hold)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def scrape(port: int) -> dict[str, float]:
    """Every sample of /metrics as 'name{labels}' -> value."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def total(samples: dict[str, float], name: str, contains: str = "") -> float:
    return sum(v for k, v in samples.items()
               if (k == name or k.startswith(name + "{")) and contains in k)


def health_latency(port: int) -> tuple[float, int]:
    """Seconds /health took, and its status (0: no answer within 30 s)."""
    start = time.monotonic()
    try:
        code = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code
    except httpx.HTTPError:
        code = 0
    return time.monotonic() - start, code


async def monitor(pid: int, port: int, end: float, rss: list[tuple[float, float]],
                  start: float, kv_cycled: list[float], tally: Tally,
                  timeline: list[dict[str, float]]) -> None:
    """Every 2 s: RSS, /health latency, the server's generated tokens, 5xx and running/waiting
    sequences, and the clients' completions and failures so far (the timeline of the report).
    Notes when the KV cache has been cycled through once (prompt + generated tokens past its
    capacity: the pool hands out never-used blocks first, and its memory is only materialised
    when first written, so RSS grows by up to the KV cache size until then; that is warm-up,
    not a leak)."""
    base_5xx = sum(v for k, v in (await asyncio.to_thread(scrape, port)).items()
                   if k.startswith("ember:http_requests_total{") and 'status="5' in k)
    while time.monotonic() < end:
        now = time.monotonic() - start
        rss.append((now, rss_mb(pid)))
        latency, code = await asyncio.to_thread(health_latency, port)
        try:
            samples = await asyncio.to_thread(scrape, port)
        except httpx.HTTPError:
            samples = {}
        timeline.append({
            "t": round(now, 2), "rss_mb": rss[-1][1], "health_s": round(latency, 4),
            "health_status": code,
            "generation_tokens": total(samples, "ember:generation_tokens_total"),
            "server_5xx": sum(v for k, v in samples.items()
                              if k.startswith("ember:http_requests_total{")
                              and 'status="5' in k) - base_5xx,
            "client_tokens": tally.tokens,
            "running": total(samples, "ember:num_requests_running"),
            "waiting": total(samples, "ember:num_requests_waiting"),
            "client_completed": sum(tally.ok.values()), "client_failed": tally.failed})
        if not kv_cycled and samples:
            used = (total(samples, "ember:prefix_cache_queries_total")
                    + total(samples, "ember:generation_tokens_total"))
            if used >= total(samples, "ember:kv_cache_capacity_tokens") > 0:
                kv_cycled.append(now)
        await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - start - now)))


async def soak(args: argparse.Namespace, pid: int) -> tuple[Tally, list[tuple[float, float]]]:
    tally = Tally()
    timeline: list[dict[str, float]] = args.timeline
    start = time.monotonic()
    end = start + args.minutes * 60
    rss: list[tuple[float, float]] = []
    tasks = [asyncio.create_task(client_loop(kind, i, args, end, tally))
             for kind, count in KINDS.items() for i in range(count)]
    tasks.append(asyncio.create_task(monitor(pid, args.port, end, rss, start, args.kv_cycled,
                                             tally, timeline)))
    progress_every = max(10.0, args.minutes * 6)
    while time.monotonic() < end:
        await asyncio.sleep(min(progress_every, max(0.1, end - time.monotonic())))
        print(f"[{time.monotonic() - start:5.0f}s] sent {dict(tally.sent)} "
              f"failures {tally.failed} rss {rss[-1][1] if rss else 0:.0f} MB "
              f"health {timeline[-1]['health_s'] if timeline else 0:.3f} s",
              flush=True)
    await asyncio.wait_for(asyncio.gather(*tasks), args.request_timeout + 60)
    return tally, rss


async def fill_kv_cache(port: int, capacity_tokens: float) -> dict[str, float]:
    """Write every KV block once before the clock starts: distinct ~1,500-token prompts (no
    prefix hits) adding up to 1.2x the cache, 4 at a time, 1 output token each. The pool hands
    out never-used blocks first and the cache's pages are only materialised when first written,
    so without this RSS grows by up to the cache size during the run (warm-up, not a leak)."""
    rng = random.Random("fill")
    count = int(1.2 * capacity_tokens / 1500) + 1
    gate = asyncio.Semaphore(4)
    start = time.monotonic()

    async def one(client: httpx.AsyncClient, i: int) -> int:
        text = f"{i}: " + " ".join(rng.choice(_WORDS) for _ in range(1500))
        async with gate:
            resp = await client.post("/v1/completions",
                                     json={"prompt": text, "max_tokens": 1})
        return resp.status_code

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        codes = await asyncio.gather(*(one(client, i) for i in range(count)))
    return {"requests": count, "not_200": sum(c != 200 for c in codes),
            "seconds": round(time.monotonic() - start, 1)}


def start_server(args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "import sys; from ember.cli import main; sys.exit(main())",
           "serve", "--model", args.model, "--quantization", args.quantization,
           "--port", str(args.port), "--no-access-log",
           "--log-level", "warning", "--stream-read-timeout", str(args.stream_read_timeout)]
    log = open(args.server_log, "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    wait_healthy(proc, f"http://127.0.0.1:{args.port}", "ember serve", 300)
    return proc


def wait_idle(port: int, timeout_s: float) -> dict[str, float]:
    """Metrics once no sequence runs or waits and the KV pool is empty (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(port)
        idle = (total(samples, "ember:num_requests_running") == 0
                and total(samples, "ember:num_requests_waiting") == 0
                and total(samples, "ember:kv_cache_usage_perc") == 0
                and total(samples, "ember:engine_requests_added_total")
                == total(samples, "ember:engine_requests_finished_total")
                + total(samples, "ember:engine_requests_failed_total"))
        if idle or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quantization", default="int4")
    ap.add_argument("--note", default="",
                    help="free text stored in the report (e.g. how the machine was shared)")
    ap.add_argument("--port", type=int, default=8471)
    ap.add_argument("--stream-read-timeout", type=float, default=5.0)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--stall-hold", type=float, default=90.0,
                    help="seconds a stalled reader keeps its unread connection open")
    ap.add_argument("--warmup-fraction", type=float, default=0.25,
                    help="RSS growth is measured from the end of this share of the run, or "
                         "once the KV cache was cycled through, whichever is later")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.kv_cycled = []
    args.timeline = []
    args.server_log = Path(tempfile.gettempdir()) / f"ember_soak_server_{os.getpid()}.log"
    load_before = os.getloadavg()
    proc = start_server(args)
    try:
        httpx.post(f"http://127.0.0.1:{args.port}/v1/completions",  # engine stats exist after
                   json={"prompt": "hi", "max_tokens": 1}, timeout=300)  # a first request
        capacity = total(scrape(args.port), "ember:kv_cache_capacity_tokens")
        print(f"filling the KV cache once ({capacity:.0f} tokens) ...", flush=True)
        kv_fill = asyncio.run(fill_kv_cache(args.port, capacity))
        print(f"... {kv_fill}; soak starts", flush=True)
        before = scrape(args.port)
        tally, rss = asyncio.run(soak(args, proc.pid))
        after = wait_idle(args.port, timeout_s=4 * args.stream_read_timeout + 30)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    load_after = os.getloadavg()
    report = build_report(args, tally, rss, before, after)
    log_text = args.server_log.read_text(errors="replace")
    report["stalled_streams_aborted_by_read_timeout"] = log_text.count(
        "aborted a stream whose client read nothing")
    report["server_log_tracebacks"] = log_text.count("Traceback")
    report["server_log"] = str(args.server_log)
    report["kv_fill_before_soak"] = kv_fill
    report["timeline"] = args.timeline
    report["note"] = args.note
    report.update(loadavg_before=load_before, loadavg_after=load_after, cpu_count=os.cpu_count(),
                  contended=max(load_before[0], load_after[0]) > (os.cpu_count() or 1) / 2)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"soak_{stamp}.json").write_text(json.dumps(report, indent=2))
    plot(report, args.timeline, args.out / f"soak_{stamp}.png")
    print(json.dumps({k: report[k] for k in ("passed", "targets")}, indent=2))
    print(f"wrote {args.out}/soak_{stamp}.json/.png")
    return 0 if report["passed"] else 1


def build_report(args: argparse.Namespace, tally: Tally, rss: list[tuple[float, float]],
                 before: dict[str, float], after: dict[str, float]) -> dict[str, object]:
    def delta(name: str, contains: str = "") -> float:
        return total(after, name, contains) - total(before, name, contains)

    server_5xx = sum(v - before.get(k, 0.0) for k, v in after.items()
                     if k.startswith("ember:http_requests_total{") and 'status="5' in k)
    client_5xx = sum(v for k, v in tally.status.items() if k.split(":")[1].startswith("5"))
    well_sent = sum(tally.sent[k] for k in WELL_BEHAVED)
    well_ok = sum(tally.ok[k] for k in WELL_BEHAVED)
    warmup_s = max([args.warmup_fraction * args.minutes * 60, *args.kv_cycled])
    warm = [m for t, m in rss if t >= warmup_s]
    head = warm[: max(1, len(warm) // 10)]
    tail = warm[-max(1, len(warm) // 10):]
    rss_growth = (sum(tail) / len(tail)) / (sum(head) / len(head)) - 1 if warm else 0.0
    added = delta("ember:engine_requests_added_total")
    finished = delta("ember:engine_requests_finished_total")
    failed = delta("ember:engine_requests_failed_total")
    http_completions = delta("ember:http_requests_total", "completions")
    sent_http = sum(tally.sent.values())
    targets = {
        "zero_5xx": server_5xx == 0 and client_5xx == 0,
        "well_behaved_all_complete": well_ok == well_sent,
        # None: too few samples after warm-up to tell (run longer).
        "rss_growth_below_5pct": rss_growth < 0.05 if len(warm) >= 5 else None,
        "kv_blocks_back_in_pool": (total(after, "ember:kv_cache_usage_perc") == 0
                                   and total(after, "ember:num_requests_running") == 0
                                   and total(after, "ember:num_requests_waiting") == 0),
        "engine_requests_in_equal_out": added == finished + failed,
        "health_always_200": all(r["health_status"] == 200 for r in args.timeline),
    }
    # NOTE: informational, not a target: a client that closes before the server read its
    # request is never seen by the app, so HTTP counted <= sent.
    return {
        "minutes": args.minutes, "clients": KINDS, "sent": dict(tally.sent),
        "completed": dict(tally.ok), "client_status": dict(tally.status),
        "failures": tally.failures, "failed_well_behaved": tally.failed,
        "well_behaved_tokens_received": tally.tokens,
        "server_5xx": server_5xx, "client_5xx": client_5xx,
        "health_latency_max_s": max((r["health_s"] for r in args.timeline), default=None),
        "health_not_200": sum(1 for r in args.timeline if r["health_status"] != 200),
        "warmup_s": warmup_s, "kv_cache_cycled_at_s": args.kv_cycled[0] if args.kv_cycled
        else None, "kv_cache_capacity_tokens": total(after, "ember:kv_cache_capacity_tokens"),
        "rss_mb_first_after_warmup": head[0] if head else None,
        "rss_mb_last": rss[-1][1] if rss else None, "rss_growth_after_warmup": rss_growth,
        "engine_requests": {"added": added, "finished": finished, "failed": failed},
        "http_completion_requests_counted": http_completions, "requests_sent": sent_http,
        "aborted_by_engine": delta("ember:num_aborted_requests_total"),
        "generation_tokens": delta("ember:generation_tokens_total"),
        "targets": targets, "passed": all(v is True for v in targets.values()),
    }


def plot(report: dict[str, object], timeline: list[dict[str, float]], path: Path) -> None:
    """RSS, throughput, errors, /health latency and running/waiting sequences over time, and
    the requests per client kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    minutes = [r["t"] / 60 for r in timeline]

    def series(ax, keys: tuple[str, ...], title: str, ylabel: str) -> None:
        for key in keys:
            ax.plot(minutes, [r[key] for r in timeline], label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("minutes")
        ax.set_ylabel(ylabel)
        if len(keys) > 1:
            ax.legend(fontsize=8)

    series(axes[0][0], ("rss_mb",),
           f"server RSS (growth after warm-up {report['rss_growth_after_warmup']:+.1%})", "MB")
    warm = report.get("warmup_s")
    if isinstance(warm, float | int):
        axes[0][0].axvline(warm / 60, color="grey", linestyle="--", label="warm-up end")
        axes[0][0].legend(fontsize=8)
    def rate(key: str, window: int = 5) -> list[float]:
        """Per-second rate of a cumulative timeline field over `window` samples (~10 s)."""
        out = []
        for i, row in enumerate(timeline):
            first = timeline[max(0, i - window)]
            dt = row["t"] - first["t"]
            out.append((row[key] - first[key]) / dt if dt > 0 else 0.0)
        return out

    axes[0][1].plot(minutes, rate("client_tokens"), label="received by well-behaved clients")
    axes[0][1].plot(minutes, rate("generation_tokens"), label="server counter (finished requests)")
    axes[0][1].legend(fontsize=8)
    axes[0][1].set_title("output tokens/s (10 s windows)", fontsize=10)
    axes[0][1].set_xlabel("minutes")
    axes[0][1].set_ylabel("tok/s")
    series(axes[0][2], ("server_5xx", "client_failed"),
           "errors (cumulative): server 5xx, well-behaved requests failed", "count")
    series(axes[1][0], ("health_s",), f"/health latency (max {report['health_latency_max_s']} s)",
           "s")
    series(axes[1][1], ("running", "waiting"), "sequences running / waiting", "sequences")
    sent = report["sent"]
    done = report["completed"]
    assert isinstance(sent, dict) and isinstance(done, dict)
    names = list(KINDS)
    ax = axes[1][2]
    ax.bar(names, [sent.get(n, 0) for n in names], label="sent")
    ax.bar(names, [done.get(n, 0) for n in names], width=0.5, label="completed as intended")
    ax.set_yscale("log")
    ax.set_title(f"requests ({report['server_5xx']:g} server 5xx)", fontsize=10)
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize=8)
    fig.suptitle(f"ember serve soak: 64 clients, {report['minutes']:g} min"
                 + (", contended machine" if report.get("contended") else "")
                 + (f" ({report['note']})" if report.get("note") else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
