"""Command-line entry point: ``quantduo <command> ...``.

Each area registers its own sub-commands through a ``register(subparsers)`` function,
so this file only wires them together.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that expose ``register(subparsers)``; a module missing an optional extra is skipped.
_COMMAND_MODULES = (
    "quantduo.svdquant.commands",
    "quantduo.integrations.diffusers_commands",
    "quantduo.duo.commands",
    "quantduo.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantduo", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("quantduo"):
                continue  # area not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
