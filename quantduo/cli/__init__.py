"""Command-line entry point: ``quantduo <command> ...``.

Each area registers its own sub-commands through a ``register(subparsers)`` function, so this file only wires them
together and handles errors in one place: a bad argument or input file (:class:`CliError`, found before any work
starts, or a corrupt input found while loading, :class:`~quantduo.utils.InputError`) prints one line on stderr and
exits 2; Ctrl-C prints one line and exits 130; a file-system error (disk full, read-only) or any other failure prints
one line and exits 1. ``--debug`` (anywhere
on the command line) adds the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import traceback

import diffusers
import transformers

from quantduo.utils import InputError, show_progress

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

# Modules that expose ``register(subparsers)``.
_COMMAND_MODULES = (
    "quantduo.cli.diffusion",
    "quantduo.cli.duo",
    "quantduo.cli.export",
    "quantduo.demo",
    "quantduo.ui",
)


class CliError(Exception):
    """A command-line argument or input file that cannot work; the message names it and says what would be valid."""


class Parser(argparse.ArgumentParser):
    """argparse's errors as :class:`CliError` (one line, no usage block)."""

    def error(self, message: str):
        raise CliError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="quantduo", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    _add_debug_flag(parser)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on ``parser`` and every sub-command parser below it (so it may come anywhere)."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an error")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_debug_flag(sub)


def _quiet_libraries() -> None:
    """No progress bars from diffusers / transformers when stderr is not a terminal (they print lines in logs)."""
    if not show_progress():
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"quantduo: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 1, 2 or 130)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        args.command_line = shlex.join(["quantduo", *argv])
        _quiet_libraries()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return _fail("interrupted (Ctrl-C); output files and folders are left as they were", EXIT_INTERRUPTED, debug)
    except (CliError, InputError) as err:
        return _fail(f"error: {_one_line(err)}", EXIT_USAGE, debug)
    except OSError as err:  # the disk or the file system (full, read-only, gone): what the outputs' atomicity is for
        where = f"{err.filename}: " if err.filename else ""
        return _fail(f"error: {where}{err.strerror or _one_line(err)}", EXIT_FAILED, debug)
    except Exception as err:  # noqa: BLE001  (every other failure: one line, the traceback with --debug)
        hint = "" if debug else " (run with --debug for the traceback)"
        return _fail(f"failed: {type(err).__name__}: {_one_line(err)}{hint}", EXIT_FAILED, debug)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__

