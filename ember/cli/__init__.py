"""The `ember` command. Each subcommand group lives in its own module with `register()`."""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.markup import escape

from ember.cli import bench, build_kernels, compress, generate, run_batch, serve
from ember.config import EnvSettings
from ember.loading.errors import ModelLoadError
from ember.types import InvalidRequestError

COMMAND_MODULES = (generate, serve, bench, compress, run_batch, build_kernels)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="Ember inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = EnvSettings.from_env()
    logging.basicConfig(level=env.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ModelLoadError, InvalidRequestError, ValueError, FileNotFoundError) as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(exc))}",
                                                   highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
