"""Ember on Ray Serve: N engine replicas behind one OpenAI-compatible ingress.

- `EmberReplica` (a Serve deployment, `num_replicas` or autoscaling bounds): one AsyncEngine
  and Ember's own FastAPI app (`ember.server.app.create_app`); requests run through that app
  in-process over ASGI, so OpenAI semantics, validation errors (4xx in OpenAI's error
  shape), streaming and metrics are exactly `ember serve`'s.
- `EmberIngress` (one replica, no CPU reserved): reads the body, computes the request's
  prefix-affinity key (`ember.distributed.routing`) and forwards the request, streaming the
  response back chunk by chunk.
- `PrefixAffinityRouter` (Serve's request-router extension): the same key goes to the same
  replica (its KV prefix cache is warm) unless that replica is `load_bound` requests busier
  than the least loaded; requests without a key go to the least loaded replica.

Use it from the CLI (`ember serve --ray --num-replicas 2`), from Python (`build_app(config,
...)` then `serve.run(app)`), or with Serve's own tooling:
`serve run ember.distributed.ray_serve:app_builder model=smollm2-135m-instruct num_replicas=2`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import (FIFOMixin, PendingRequest, RequestRouter,
                                      RunningReplica)
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ember.config import EngineConfig
from ember.distributed import with_threads
from ember.distributed.routing import affinity_key, rank_replicas

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-ember-replica"
"""Response header naming the replica that served the request."""
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection"}


@dataclass(frozen=True)
class RayServeOptions:
    """How the replicas are deployed (see `build_app`)."""

    num_replicas: int = 1
    """Replicas when not autoscaling."""
    threads_per_replica: int = 1
    """Intra-op threads of each replica's engine; each replica reserves that many CPUs."""
    min_replicas: int | None = None
    """Autoscaling lower bound (setting min or max turns autoscaling on)."""
    max_replicas: int | None = None
    """Autoscaling upper bound."""
    target_ongoing_requests: int = 16
    """Autoscaling target: ongoing requests per replica."""
    prefix_chars: int = 256
    """Characters of the prompt prefix hashed into the affinity key."""
    ingress_replicas: int = 1
    """Replicas of the HTTP ingress (each is one Python process forwarding requests)."""
    load_bound: int = 4
    """How many more ongoing requests than the least-loaded replica the preferred replica
    may have before a request leaves it."""

    def validate(self) -> None:
        if min(self.num_replicas, self.threads_per_replica, self.ingress_replicas) < 1:
            raise ValueError("num_replicas, threads_per_replica and ingress_replicas must be "
                             ">= 1")
        low, high = self.min_replicas, self.max_replicas
        if (low is not None and low < 0) or (high is not None and high < 1):
            raise ValueError("min_replicas must be >= 0 and max_replicas >= 1")
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_replicas ({low}) must be <= max_replicas ({high})")
        if self.prefix_chars < 1 or self.load_bound < 0:
            raise ValueError("prefix_chars must be >= 1 and load_bound >= 0")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Serve request router: prefix affinity with a load bound (see `rank_replicas`)."""

    def initialize_state(self, load_bound: int = 4, **kwargs: Any) -> None:
        self.load_bound = load_bound

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = pending_request.kwargs.get("affinity_key") if pending_request else None
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        loads = {uid: cache.get(r.replica_id) for uid, r in by_id.items()}
        ranks = rank_replicas(key, loads, getattr(self, "load_bound", 4))
        return [[by_id[uid] for uid in rank] for rank in ranks]


async def call_asgi(app: Any, method: str, path: str, query: str,
                    headers: list[tuple[str, str]], body: bytes
                    ) -> AsyncIterator[dict[str, Any] | bytes]:
    """Run one HTTP request through an ASGI app in-process: yields the response head
    ({"status", "headers"}) and then the body chunks as the app sends them.

    Closing the generator early (the client went away) reports a disconnect to the app, so a
    stream is aborted in the engine like a dropped connection to `ember serve`.
    """
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("ember-replica", 80)}
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except Exception:  # noqa: BLE001 - Ember's handlers already answered (500 at worst)
            logger.exception("replica app failed on %s %s", method, path)
        finally:
            await messages.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield {"status": message["status"],
                       "headers": [(k.decode(), v.decode()) for k, v in message["headers"]]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
    finally:
        disconnected.set()
        try:
            await asyncio.wait_for(task, timeout=30)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            task.cancel()


class EmberReplica:
    """One engine and Ember's FastAPI app (a Serve deployment's replica)."""

    def __init__(self, config: EngineConfig) -> None:
        from ember.engine.async_engine import AsyncEngine
        from ember.server.app import create_app

        self.engine = AsyncEngine.from_config(config)
        self.app = create_app(config, self.engine)
        self.app.state.ember.attach(self.engine)  # what the app's lifespan would do
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (tests constructing it directly)
            self.replica_id = "local"

    async def handle_request(self, method: str, path: str, query: str,
                             headers: list[tuple[str, str]], body: bytes,
                             affinity_key: str | None = None
                             ) -> AsyncIterator[dict[str, Any] | bytes]:
        """Serve one HTTP request; affinity_key is read by the router, not here."""
        async for item in call_asgi(self.app, method, path, query, headers, body):
            if isinstance(item, dict):
                item["headers"].append((REPLICA_HEADER, self.replica_id))
            yield item

    def check_health(self) -> None:
        """Serve's health check: a failed engine thread restarts the replica."""
        if self.engine.error is not None:
            raise RuntimeError(f"engine failed: {self.engine.error}")

    async def __del__(self) -> None:
        await self.app.state.ember.shutdown()


class EmberIngress:
    """The single HTTP entry point: affinity key, then forward to a replica and stream back."""

    def __init__(self, replicas: DeploymentHandle, prefix_chars: int = 256) -> None:
        self.replicas = replicas
        self.prefix_chars = prefix_chars

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        stream: Any = self.replicas.options(stream=True).handle_request.remote(
            request.method, path, request.url.query, list(request.headers.items()), body,
            affinity_key=affinity_key(path, body, self.prefix_chars))
        head = await stream.__anext__()
        headers = {k: v for k, v in head["headers"] if k.lower() not in _HOP_BY_HOP}
        if headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(_chunks(stream), status_code=head["status"],
                                     headers=headers)
        content = b"".join([chunk async for chunk in stream])
        return Response(content, status_code=head["status"], headers=headers)


async def _chunks(stream: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    finally:
        stream.cancel()  # the client left: the replica's generator sees a disconnect


def build_app(config: EngineConfig, options: RayServeOptions | None = None) -> Any:
    """The Serve application (ingress bound to the replicas) for `serve.run(app)`."""
    options = options or RayServeOptions()
    options.validate()
    config.validate()
    replica_config = with_threads(config, options.threads_per_replica)
    scaling: dict[str, Any]
    if options.autoscaling:
        low = options.min_replicas if options.min_replicas is not None else 1
        high = options.max_replicas if options.max_replicas is not None else max(
            low, options.num_replicas)
        scaling = {"autoscaling_config": {
            "min_replicas": low, "max_replicas": high,
            "initial_replicas": min(max(options.num_replicas, low), high),
            "target_ongoing_requests": options.target_ongoing_requests}}
    else:
        scaling = {"num_replicas": options.num_replicas}
    sched = config.scheduler
    deployment: Any = serve.deployment  # NOTE: its overloads hide .bind from mypy
    replica = deployment(
        EmberReplica, name="EmberReplica",
        ray_actor_options={"num_cpus": options.threads_per_replica},
        # NOTE: an engine batches up to max_num_seqs; beyond that Serve queues in the router
        # (backpressure) instead of in one replica.
        max_ongoing_requests=sched.max_num_seqs + config.server.max_queued_requests,
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,  # type: ignore[arg-type]
            request_router_kwargs={"load_bound": options.load_bound}),
        health_check_period_s=10, **scaling)
    ingress = deployment(EmberIngress, name="EmberIngress",
                         num_replicas=options.ingress_replicas,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    return ingress.bind(replica.bind(replica_config), options.prefix_chars)


def app_builder(args: Mapping[str, str]) -> Any:
    """Serve application builder for `serve run ember.distributed.ray_serve:app_builder
    model=... num_replicas=2 threads_per_replica=1 [min_replicas= max_replicas=]`."""
    from ember.config import ModelConfig

    known = {"model", "num_replicas", "threads_per_replica", "min_replicas", "max_replicas",
             "prefix_chars", "load_bound", "target_ongoing_requests", "ingress_replicas"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown arguments {unknown}; accepted: {sorted(known)}")
    ints = {k: int(v) for k, v in args.items() if k != "model"}
    config = EngineConfig(model=ModelConfig(model=args.get("model", ModelConfig.model),
                                            quantization="auto"))
    return build_app(config, RayServeOptions(**ints))
