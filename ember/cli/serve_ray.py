"""`ember serve --ray`: the server as N engine replicas on Ray Serve (ember.distributed).

Ray is imported only when --ray is given; without it installed this fails in one line that
says `pip install 'ember[ray]'`.
"""

from __future__ import annotations

import argparse
import signal
import threading

from rich.console import Console

from ember.config import EngineConfig
from ember.distributed import require_ray


def add_ray_args(p: argparse.ArgumentParser) -> None:
    """The --ray option group of `ember serve`."""
    g = p.add_argument_group("ray (pip install 'ember[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="serve N engine replicas on Ray Serve behind one OpenAI endpoint")
    g.add_argument("--ray-address", default=None,
                   help="existing Ray cluster (e.g. auto or ray://head:10001); default: start "
                        "a local Ray")
    g.add_argument("--num-replicas", type=int, default=1, help="engine replicas")
    g.add_argument("--threads-per-replica", type=int, default=1,
                   help="engine threads (= CPUs reserved) per replica")
    g.add_argument("--min-replicas", type=int, default=None,
                   help="autoscaling lower bound (turns autoscaling on)")
    g.add_argument("--max-replicas", type=int, default=None,
                   help="autoscaling upper bound (turns autoscaling on)")
    g.add_argument("--ingress-replicas", type=int, default=1,
                   help="HTTP ingress replicas forwarding to the engine replicas")
    g.add_argument("--prefix-affinity-chars", type=int, default=256,
                   help="prompt-prefix characters hashed to pick a request's replica")
    g.add_argument("--affinity-load-bound", type=int, default=4,
                   help="extra ongoing requests a preferred replica may have before "
                        "requests go to the least loaded one")


def run_ray_serve(config: EngineConfig, args: argparse.Namespace) -> int:
    """Deploy on Ray Serve and block until SIGINT/SIGTERM; then tear the app down."""
    require_ray("ember serve --ray")
    import ray
    from ray import serve

    from ember.distributed.ray_serve import RayServeOptions, build_app

    options = RayServeOptions(
        num_replicas=args.num_replicas, threads_per_replica=args.threads_per_replica,
        min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        ingress_replicas=args.ingress_replicas, prefix_chars=args.prefix_affinity_chars, load_bound=args.affinity_load_bound)
    options.validate()
    console = Console(stderr=True)
    stop = threading.Event()
    server = config.server
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    # NOTE: after ray.init, which installs its own SIGTERM handler (it aborts the driver)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": server.host, "port": server.port})
        console.print(f"ember serve --ray: deploying {options.num_replicas} replica(s) of "
                      f"{config.model.model}, {options.threads_per_replica} thread(s) each",
                      highlight=False)
        serve.run(build_app(config, options), name="ember", route_prefix="/")
        console.print(f"[green]ready[/]: http://{server.host}:{server.port}/v1", highlight=False)
        stop.wait()
        console.print("shutting down the Serve application", highlight=False)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
