"""`ember serve`: the OpenAI-compatible HTTP server.

SIGTERM / Ctrl-C: stop accepting (new connections refused, /health 503), let in-flight
requests and streams finish within --shutdown-grace seconds, then exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from types import FrameType

from rich.console import Console

from ember.cli.generate import (add_served_model_args, add_speculative_config_arg,
                                quantization_of)
from ember.cli.serve_ray import add_ray_args
from ember.config import (DEFAULT_MODEL, CacheConfig, ConfigError, EngineConfig, ModelConfig,
                          SchedulerConfig, ServerConfig, ServingGuards, SpecConfig,
                          describe_openmp_wait)

logger = logging.getLogger(__name__)


def _server_class() -> type:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn.Server that drains on the first signal and exits 0 (uvicorn would re-raise
        the signal after shutting down, ending the process with 128 + signum)."""

        def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]) -> None:
            super().__init__(config)
            self._on_signal = on_signal

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting
                return
            logger.warning("received signal %d: draining (grace %.0f s)", sig,
                           self.config.timeout_graceful_shutdown or 0)
            self._on_signal()
            self.should_exit = True

    return GracefulServer


def _split_models(models: list[str] | None) -> tuple[str, tuple[str, ...], bool]:
    """--model values -> (generation model, embedding models, serve the generator)."""
    from ember.config import EnvSettings
    from ember.engine.embedder import split_models

    return split_models(models or [], EnvSettings.from_env(), DEFAULT_MODEL)


def _config(args: argparse.Namespace) -> EngineConfig:
    model, embedders, generator = _split_models(args.model)
    keys = list(args.api_key)
    if args.api_key_file:
        from ember.server.limits import read_api_key_file
        keys += read_api_key_file(args.api_key_file)
    return EngineConfig(
        model=ModelConfig(model=model, dtype=args.dtype, max_model_len=args.max_model_len,
                          quantization=quantization_of(args),
                          cpu_kernels=not args.no_cpu_kernels,
                          kv_cache_dtype=args.kv_cache_dtype,
                          generation_config=args.generation_config,
                          chat_template=args.chat_template),
        cache=CacheConfig(block_size=args.block_size, kv_cache_mb=args.kv_cache_mb,
                          enable_prefix_caching=not args.no_prefix_caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs, policy=args.policy),
        spec=SpecConfig.from_json(args.speculative_config),
        server=ServerConfig(
            host=args.host, port=args.port, served_model_names=tuple(args.served_model_name),
            api_keys=tuple(keys), auth_all_endpoints=args.auth_all_endpoints,
            max_queued_requests=args.max_queued_requests, rate_limit_rpm=args.rate_limit_rpm,
            rate_limit_tpm=args.rate_limit_tpm, max_body_bytes=args.max_body_bytes,
            shutdown_grace_s=args.shutdown_grace, guards=_guards(args),
            embedding_models=embedders, serve_generator=generator, batch_dir=args.batch_dir,
            batch_max_in_flight=args.batch_max_in_flight),
        seed=args.seed)


def _guards(args: argparse.Namespace) -> ServingGuards:
    """--trusted-proxies, --allowed-hosts (default: loopback names when bound to loopback)
    and the engine supervision / stream timeouts."""
    from ember.server.hosts import check_proxies, default_allowed_hosts

    def names(value: str | None) -> tuple[str, ...]:
        return tuple(v.strip() for v in (value or "").split(",") if v.strip())

    proxies = names(args.trusted_proxies)
    try:
        check_proxies(proxies)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    hosts = names(args.allowed_hosts) if args.allowed_hosts else default_allowed_hosts(args.host)
    return ServingGuards(trusted_proxies=proxies, allowed_hosts=hosts,
                         step_deadline_s=args.step_deadline,
                         stream_read_timeout_s=args.stream_read_timeout,
                         frontend_threads=args.frontend_threads,
                         omp_spin_count=args.omp_spin_count,
                         step_handoff_timeout_s=args.step_handoff_ms / 1e3,
                         stream_interval_s=args.stream_interval_ms / 1e3,
                         send_buffer_bytes=args.send_buffer_bytes)


async def _serve(config: EngineConfig, log_level: str, access_log: bool) -> int:
    import uvicorn

    from ember.batch.routes import install_batch_api
    from ember.server.app import create_app

    app = create_app(config, addons=(install_batch_api,))
    state = app.state.ember
    server_cfg = config.server
    uv_config = uvicorn.Config(
        app, host=server_cfg.host, port=server_cfg.port, log_level=log_level,
        access_log=access_log, timeout_graceful_shutdown=int(server_cfg.shutdown_grace_s) or 1,
        lifespan="on",
        # NOTE: X-Forwarded-For rewrites the client address (the rate-limit key) only when
        # the peer is a trusted proxy; uvicorn's default trusts 127.0.0.1, so say it.
        proxy_headers=bool(server_cfg.guards.trusted_proxies),
        forwarded_allow_ips=",".join(server_cfg.guards.trusted_proxies) or None)
    server = _server_class()(uv_config, on_signal=state.begin_drain)
    console = Console(stderr=True)
    url = f"http://{server_cfg.host}:{server_cfg.port}"

    async def watch_loading() -> None:
        await state.loaded.wait()
        if state.load_error is not None:
            console.print(f"[red]error:[/] {state.load_error}", highlight=False)
            server.should_exit = True
        else:
            served = (*state.generator_names, *config.server.embedding_models)
            console.print(f"[green]ready[/]: {url}/v1 serves {', '.join(served)}",
                          highlight=False)

    loading = ", ".join((*state.generator_names[:1], *config.server.embedding_models))
    console.print(f"ember serve: loading {loading}; {url}/health answers 503 "
                  f"until ready; kernel waits: {describe_openmp_wait()}", highlight=False)
    watcher = asyncio.create_task(watch_loading())
    try:
        sock = uv_config.bind_socket()
        if server_cfg.guards.send_buffer_bytes:  # accepted connections inherit it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                            server_cfg.guards.send_buffer_bytes)
        await server.serve(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind
        return int(exc.code or 1)
    finally:
        watcher.cancel()
    return 1 if state.load_error is not None else 0


def apply_openmp_environment(spin_count: int | None) -> None:
    """Set the server's OpenMP wait (GOMP_SPINCOUNT) in this process's environment; libgomp
    reads it once, when torch or the kernels load it, so this runs before either."""
    import os
    import sys

    from ember.config import openmp_environment

    if "torch" in sys.modules:  # in-process callers (tests): the runtime is already set up
        if spin_count != ServingGuards.omp_spin_count:
            logger.warning("--omp-spin-count ignored: the OpenMP runtime is already loaded")
        return
    os.environ.update(openmp_environment(spin_count))


def cmd_serve(args: argparse.Namespace) -> int:
    apply_openmp_environment(args.omp_spin_count)
    config = _config(args)
    config.validate()
    if args.ray:
        from ember.cli.serve_ray import run_ray_serve
        return run_ray_serve(config, args)
    logging.getLogger("ember").setLevel(args.log_level.upper())
    return asyncio.run(_serve(config, args.log_level, not args.no_access_log))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve` to the `ember` command."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (streaming, metrics)")
    g = p.add_argument_group("model")
    add_served_model_args(g, "routed by the request's `model`",
                          "name clients use for the model (repeatable; default: --model)")
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs,
                   help="most sequences decoded together")
    g.add_argument("--max-num-batched-tokens", type=int,
                   default=SchedulerConfig.max_num_batched_tokens, help="token budget per step")
    g.add_argument("--kv-cache-mb", type=int, default=CacheConfig.kv_cache_mb)
    g.add_argument("--block-size", type=int, default=CacheConfig.block_size)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--policy", default="fcfs", choices=["fcfs", "priority"])
    add_speculative_config_arg(g)
    g = p.add_argument_group("server")
    g.add_argument("--host", default=ServerConfig.host, help="bind address (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=ServerConfig.port)
    g.add_argument("--api-key", action="append", default=[],
                   help="accepted Bearer key (repeatable; also EMBER_API_KEY)")
    g.add_argument("--api-key-file", default=None, help="file with one key per line")
    g.add_argument("--auth-all-endpoints", action="store_true",
                   help="also require a key for /health, /metrics and the docs")
    g.add_argument("--max-queued-requests", type=int, default=ServerConfig.max_queued_requests,
                   help="sequences allowed to wait beyond --max-num-seqs (then 429)")
    g.add_argument("--rate-limit-rpm", type=int, default=None, help="requests/min per key")
    g.add_argument("--rate-limit-tpm", type=int, default=None, help="tokens/min per key")
    g.add_argument("--max-body-bytes", type=int, default=ServerConfig.max_body_bytes)
    g.add_argument("--shutdown-grace", type=float, default=ServerConfig.shutdown_grace_s,
                   help="seconds in-flight requests get to finish on SIGTERM")
    g.add_argument("--batch-dir", default=None,
                   help="where /v1/files and /v1/batches persist (default <cache>/batches)")
    g.add_argument("--batch-max-in-flight", type=int, default=None,
                   help="batch requests in the engine at once (default max-num-seqs / 2)")
    g.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    g.add_argument("--no-access-log", action="store_true")
    g.add_argument("--trusted-proxies", default=None, metavar="ADDRS",
                   help="comma-separated proxy addresses/networks whose X-Forwarded-For sets "
                        "the client address (rate limits); default: none")
    g.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="comma-separated Host header names to answer ('*': any); default: "
                        "localhost,127.0.0.1,::1 when bound to loopback, else any")
    g.add_argument("--step-deadline", type=float, default=ServingGuards.step_deadline_s,
                   help="seconds an engine step may run before the engine is restarted")
    g.add_argument("--stream-read-timeout", type=float,
                   default=ServingGuards.stream_read_timeout_s,
                   help="abort a stream whose client reads nothing for this long (s)")
    g.add_argument("--frontend-threads", type=_frontend_threads, default="auto",
                   help="kernel threads left to the HTTP front end on small steps (1-4 "
                        "tokens); 0 uses every thread; auto (default): time both every "
                        "thread and one fewer, keep the faster")
    g.add_argument("--step-handoff-ms", type=float,
                   default=ServingGuards.step_handoff_timeout_s * 1e3,
                   help="after a small step on every kernel thread, wait up to this long for "
                        "the front end to send its outputs before the next step (0: off)")
    g.add_argument("--stream-interval-ms", type=float,
                   default=ServingGuards.stream_interval_s * 1e3,
                   help="hold streamed tokens back until this long since the last hand-off to "
                        "the front end, then send them together (first and last tokens go "
                        "out at once; 0: every step)")
    g.add_argument("--send-buffer-bytes", type=int, default=ServingGuards.send_buffer_bytes,
                   help="socket send buffer of each connection (bounds unread output before "
                        "--stream-read-timeout applies; 0: the kernel's autotuning)")
    g.add_argument("--omp-spin-count", type=_spin_count, default=ServingGuards.omp_spin_count,
                   help="GOMP_SPINCOUNT of the server (busy-wait iterations of a waiting "
                        "kernel thread before it sleeps; ~54 ns each on Zen 3); 'libgomp' keeps "
                        "libgomp's 300000; an environment GOMP_SPINCOUNT/OMP_WAIT_POLICY wins "
                        f"(default: {ServingGuards.omp_spin_count or 'libgomp'})")
    add_ray_args(p)
    p.set_defaults(func=cmd_serve)


def _spin_count(value: str) -> int | None:
    """--omp-spin-count: 'libgomp' (None: libgomp's own default) or an integer >= 0."""
    if value == "libgomp":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'libgomp' or an integer, got {value!r}")


def _frontend_threads(value: str) -> int | None:
    """--frontend-threads: 'auto' (None) or an integer >= 0."""
    if value == "auto":
        return None
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0, got {value!r}")
    return count
