"""Command-line entry point: ``quantduo <command> ...``.

Each area registers its own sub-commands through a ``register(subparsers)`` function,
so this file only wires them together.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that expose ``register(subparsers)``.
_COMMAND_MODULES = (
    "quantduo.cli.diffusion",
    "quantduo.cli.duo",
    "quantduo.cli.export",
    "quantduo.demo",
    "quantduo.ui",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantduo", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
