"""`GET /stats`: the numbers of `/metrics` as one small JSON document, for the live dashboard.

One source of truth: everything here is read from the app's Prometheus registry (the same
collectors that render `/metrics`), never counted a second time. Rates and windowed percentiles
are left to the client, which diffs successive snapshots (counters and cumulative histogram
buckets), as Prometheus' `rate()` and `histogram_quantile()` would.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field

from ember.config import EngineConfig

ENGINE_RESTART_METRICS = "ember:engine_restarts_total"
"""The counter of engine restarts (ember/server/metrics.py)."""


_NOT_ERRORS = frozenset({"/health"})
"""Routes whose 5xx are states, not failures (/health answers 503 while loading)."""


class HistogramStats(BaseModel):
    """A cumulative histogram: `buckets[i]` observations were <= `bounds[i]`."""

    count: float = 0.0
    sum: float = 0.0
    bounds: list[float] = Field(default_factory=list)
    """Finite upper bounds, ascending (the +Inf bucket is `count`)."""
    buckets: list[float] = Field(default_factory=list)


class Features(BaseModel):
    """Optional server features the playground shows controls for."""

    json_schema: bool = False
    """`response_format: {"type": "json_schema", ...}` is accepted."""
    speculative: bool = False
    """Speculative decoding is on (server-wide)."""
    speculative_method: str | None = None
    num_speculative_tokens: int = 0


class StatsResponse(BaseModel):
    """A snapshot of the server's metrics; counters are totals since start."""

    time: float = Field(description="Unix time of the snapshot (seconds).")
    model: str
    ready: bool
    running: float = Field(description="Sequences being computed (gauge).")
    waiting: float = Field(description="Sequences waiting to be scheduled (gauge).")
    kv_cache_usage: float = Field(description="Fraction of KV-cache blocks in use (0-1).")
    prompt_tokens: float
    generation_tokens: float
    prefix_cache_queries: float
    prefix_cache_hits: float
    preemptions: float
    aborted: float
    errors: float = Field(description="HTTP responses with a 5xx status (/health's 503 while "
                                      "loading or draining excluded).")
    rejected: float = Field(description="Requests refused by a limit (429).")
    engine_restarts: float
    finished: dict[str, float] = Field(description="Finished completions by finish reason.")
    ttft: HistogramStats
    itl: HistogramStats
    e2e: HistogramStats
    features: Features
    metrics: dict[str, float] = Field(
        description="Every counter and gauge sample of /metrics, summed over labels.")


def _histogram(samples: dict[str, list[tuple[dict[str, str], float]]],
               name: str) -> HistogramStats:
    bounds: dict[float, float] = defaultdict(float)
    for labels, value in samples.get(f"{name}_bucket", []):
        bound = float(labels["le"])
        if math.isfinite(bound):
            bounds[bound] += value
    ordered = sorted(bounds)
    return HistogramStats(
        count=sum(v for _, v in samples.get(f"{name}_count", [])),
        sum=sum(v for _, v in samples.get(f"{name}_sum", [])),
        bounds=ordered, buckets=[bounds[b] for b in ordered])


def features(config: EngineConfig) -> Features:
    """What the playground may offer: JSON-schema output (always: constrained decoding is part
    of every engine) and speculative decoding when `SpecConfig` enables it."""
    spec = config.spec
    return Features(json_schema=True, speculative=spec.enabled,
                    speculative_method=spec.method if spec.enabled else None,
                    num_speculative_tokens=spec.num_speculative_tokens if spec.enabled else 0)


def snapshot(registry: CollectorRegistry, model: str, ready: bool,
             config: EngineConfig) -> StatsResponse:
    """Read every sample of `registry` once and pick the dashboard's numbers."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in registry.collect():
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    totals = {name: sum(v for _, v in values) for name, values in samples.items()
              if not name.endswith(("_bucket", "_created"))}

    def total(name: str) -> float:
        return totals.get(name, 0.0)

    errors = sum(v for labels, v in samples.get("ember:http_requests_total", [])
                 if labels.get("status", "").startswith("5")
                 and labels.get("route") not in _NOT_ERRORS)
    restarts = totals.get(ENGINE_RESTART_METRICS, 0.0)
    finished = {labels.get("finished_reason", ""): v
                for labels, v in samples.get("ember:request_success_total", [])}
    return StatsResponse(
        time=time.time(), model=model, ready=ready,
        running=total("ember:num_requests_running"),
        waiting=total("ember:num_requests_waiting"),
        kv_cache_usage=total("ember:kv_cache_usage_perc"),
        prompt_tokens=total("ember:prompt_tokens_total"),
        generation_tokens=total("ember:generation_tokens_total"),
        prefix_cache_queries=total("ember:prefix_cache_queries_total"),
        prefix_cache_hits=total("ember:prefix_cache_hits_total"),
        preemptions=total("ember:num_preemptions_total"),
        aborted=total("ember:num_aborted_requests_total"),
        errors=errors, rejected=total("ember:requests_rejected_total"),
        engine_restarts=restarts, finished=finished,
        ttft=_histogram(samples, "ember:time_to_first_token_seconds"),
        itl=_histogram(samples, "ember:inter_token_latency_seconds"),
        e2e=_histogram(samples, "ember:e2e_request_latency_seconds"),
        features=features(config), metrics=totals)
