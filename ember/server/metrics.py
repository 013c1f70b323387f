"""Prometheus metrics (names prefixed `ember:`), one `CollectorRegistry` per app.

Histograms are observed by the engine thread through the `RequestObserver` protocol; gauges and
engine totals are read from the `AsyncEngine` stats snapshot when /metrics is scraped (a custom
collector), so the engine loop does no metrics bookkeeping beyond counting.

    ember:time_to_first_token_seconds     histogram
    ember:inter_token_latency_seconds     histogram
    ember:e2e_request_latency_seconds     histogram
    ember:request_queue_time_seconds      histogram
    ember:num_requests_running            gauge (sequences)
    ember:num_requests_waiting            gauge (sequences)
    ember:kv_cache_usage_perc             gauge (0..1)
    ember:prompt_tokens_total             counter
    ember:generation_tokens_total         counter
    ember:prefix_cache_queries_total      counter (tokens)
    ember:prefix_cache_hits_total         counter (tokens)
    ember:num_preemptions_total           counter
    ember:spec_decode_num_draft_tokens_total     counter (speculative decoding on)
    ember:spec_decode_num_accepted_tokens_total  counter
    ember:spec_decode_num_accepted_tokens_per_pos_total  counter {position}
    ember:num_aborted_requests_total      counter
    ember:request_success_total           counter {finished_reason}
    ember:requests_rejected_total         counter {reason}
    ember:http_requests_total             counter {method, route, status}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.engine.async_engine import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0)


class _EngineCollector(Collector):
    """Reads the engine stats snapshot at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None]) -> None:
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats() or EngineStats()
        labels, values = ["model_name"], [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            metric = GaugeMetricFamily(name, doc, labels=labels)
            metric.add_metric(values, value)
            return metric

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            metric = CounterMetricFamily(name, doc, labels=labels)
            metric.add_metric(values, value)
            return metric

        yield gauge("ember:num_requests_running", "Sequences being computed.", stats.num_running)
        yield gauge("ember:num_requests_waiting", "Sequences waiting to be scheduled.",
                    stats.num_waiting)
        yield gauge("ember:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                    stats.kv_cache_usage)
        yield gauge("ember:kv_cache_capacity_tokens", "Tokens the KV cache holds.",
                    stats.kv_capacity_tokens)
        yield counter("ember:prompt_tokens", "Prefilled prompt tokens.", stats.prompt_tokens)
        yield counter("ember:generation_tokens", "Generated tokens.", stats.generation_tokens)
        yield counter("ember:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats.prefix_cache_queries)
        yield counter("ember:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                      stats.prefix_cache_hits)
        yield counter("ember:num_preemptions", "Sequences preempted (KV cache exhausted).",
                      stats.num_preemptions)
        yield counter("ember:num_aborted_requests", "Requests aborted (client disconnected or "
                      "server shutdown).", stats.num_aborted)
        yield counter("ember:engine_requests_added", "Requests the engine took (at rest: "
                      "finished + failed).", stats.num_added)
        yield counter("ember:engine_requests_finished", "Requests the engine finished "
                      "(aborted ones included).", stats.num_finished)
        yield counter("ember:engine_requests_failed", "Requests ended by an engine failure.",
                      stats.num_failed)
        yield counter("ember:engine_restarts", "Engine restarts after a failed or hung step.",
                      stats.num_restarts)
        if stats.spec_accepted_per_position:
            yield from _spec_metrics(self.model_name, stats)
        success = CounterMetricFamily("ember:request_success", "Finished completions by reason.",
                                      labels=["model_name", "finished_reason"])
        for reason in ("stop", "length", "abort"):
            success.add_metric([self.model_name, reason],
                               stats.finished_by_reason.get(reason, 0))
        yield success


def _spec_metrics(model_name: str, stats: EngineStats) -> Iterator[Metric]:
    """Speculative decoding counters (vLLM's names with the `ember:` prefix)."""
    for name, doc, value in (
            ("ember:spec_decode_num_draft_tokens", "Draft tokens verified.",
             stats.spec_num_draft_tokens),
            ("ember:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
             stats.spec_num_accepted_tokens)):
        metric = CounterMetricFamily(name, doc, labels=["model_name"])
        metric.add_metric([model_name], value)
        yield metric
    per_pos = CounterMetricFamily("ember:spec_decode_num_accepted_tokens_per_pos",
                                  "Draft tokens accepted, by position in their step.",
                                  labels=["model_name", "position"])
    for pos, value in enumerate(stats.spec_accepted_per_position):
        per_pos.add_metric([model_name, str(pos)], value)
    yield per_pos


class ServerMetrics:
    """All metrics of one app, in the app's own registry (no global state).

    Implements `RequestObserver` for the engine thread (prometheus_client is thread-safe).
    """

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self._stats: Callable[[], EngineStats | None] = lambda: None
        labels = ["model_name"]
        self.ttft = Histogram("ember:time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("ember:inter_token_latency_seconds",
                             "Time between successive outputs of a request.", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("ember:e2e_request_latency_seconds",
                             "Arrival to last output of a request.", labels,
                             buckets=_REQUEST_BUCKETS, registry=self.registry)
        self.queue_time = Histogram("ember:request_queue_time_seconds",
                                    "Arrival to first scheduled.", labels,
                                    buckets=_REQUEST_BUCKETS, registry=self.registry)
        self.rejected = Counter("ember:requests_rejected", "Requests refused by a limit.",
                                ["reason"], registry=self.registry)
        self.http_requests = Counter("ember:http_requests", "HTTP requests handled.",
                                     ["method", "route", "status"], registry=self.registry)
        self.registry.register(_EngineCollector(model_name, lambda: self._stats()))
        self._itl: Histogram | None = None
        """`itl`'s child for this model, made at the first observation (as `labels()` does)
        and kept: on_inter_token runs per token on the engine thread."""

    def bind_engine(self, stats: Callable[[], EngineStats | None]) -> None:
        """Read engine gauges and totals from `stats` from now on."""
        self._stats = stats

    # ---- RequestObserver ------------------------------------------------------------------

    def on_first_token(self, ttft_s: float, queue_s: float) -> None:
        self.ttft.labels(self.model_name).observe(ttft_s)
        self.queue_time.labels(self.model_name).observe(queue_s)

    def on_inter_token(self, seconds: float) -> None:
        child = self._itl
        if child is None:
            child = self._itl = self.itl.labels(self.model_name)
        child.observe(seconds)

    def on_finished(self, e2e_s: float, finish_reasons: list[str]) -> None:
        self.e2e.labels(self.model_name).observe(e2e_s)

    # ---- exposition -----------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HttpMetricsMiddleware:
    """Counts HTTP requests by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            method = method if method in _METHODS else "other"  # bounded label values
            self.metrics.http_requests.labels(method, path, str(status)).inc()
