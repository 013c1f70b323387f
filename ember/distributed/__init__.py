"""Scale-out on Ray (the optional extra `ember[ray]`).

- `ember.distributed.ray_data`: `EmberGenerator` / `EmberEmbedder`, class UDFs for
  `ds.map_batches(...)` that run an actor pool of Ember engines over a Ray Dataset.
- `ember.distributed.ray_serve`: N engine replicas behind one OpenAI-compatible ingress, with
  least-loaded routing and prefix affinity (`ember serve --ray`).

NOTE: importing this package (or `ember`) never imports Ray; the submodules do, and
`require_ray()` turns a missing Ray into one line telling how to install it.
"""

from __future__ import annotations

import dataclasses
import importlib.util

from ember.config import EngineConfig, EnvSettings

INSTALL_HINT = "pip install 'ember[ray]'"


class RayNotInstalledError(ValueError):
    """Ray (with its data/serve extras) is missing; the message says how to install it."""


def require_ray(feature: str = "this feature") -> None:
    """Raise RayNotInstalledError (one line) when `ray` cannot be imported."""
    if importlib.util.find_spec("ray") is None:
        raise RayNotInstalledError(f"{feature} needs Ray, which is not installed: {INSTALL_HINT}")


def with_threads(config: EngineConfig, threads: int | None) -> EngineConfig:
    """`config` whose engine runs `threads` intra-op threads (None keeps EMBER_NUM_THREADS).

    NOTE: Ray sets OMP_NUM_THREADS=num_cpus in its workers; the engine's explicit
    torch.set_num_threads (from EnvSettings.num_threads) is what decides, so every actor or
    replica gets its thread count explicitly from here rather than from its environment.
    """
    if threads is None:
        return config
    if threads < 1:
        raise ValueError(f"threads per actor/replica must be >= 1, got {threads}")
    env = dataclasses.replace(config.env or EnvSettings.from_env(), num_threads=threads)
    return dataclasses.replace(config, env=env)
