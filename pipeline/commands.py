"""Registry of `lst` subcommands defined outside cli.py (bench, train, sweep, ...).

Each entry is a function ``register(subparsers)`` that adds one subcommand; keeping them beside
their library code keeps cli.py small.
"""

from __future__ import annotations

from typing import Callable

REGISTRY: list[Callable] = []


def _load() -> None:
    from pipeline.bench import cli as bench_cli
    from pipeline.extract import fisher as fisher_cli
    from pipeline.side import params_cli
    from pipeline.train import cli as train_cli

    REGISTRY.extend([train_cli.register, bench_cli.register])
    REGISTRY.extend([params_cli.register, fisher_cli.register])
    from pipeline.search import cli as search_cli; REGISTRY.append(search_cli.register)  # noqa: E702


_load()
