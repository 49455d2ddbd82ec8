"""Validators of the command line, run before any model is loaded or any work starts.

* argparse ``type=`` functions for numbers (:func:`int_in`, :func:`float_in`) and devices (:func:`device`): their
  messages become ``argument --rank: 100000 is out of range (valid: 0 to 64)``;
* checks of input files (:func:`read_text_file`), model folders (:func:`pipeline_folder`, :func:`lm_config`) and
  output paths (:func:`output_folder`, :func:`output_file`), raising :class:`~quantduo.cli.CliError` that name the
  argument and what would be valid.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable

import torch

from quantduo.cli import CliError
from quantduo.integrations.diffusers import read_denoiser_config
from quantduo.utils import InputError, MANIFEST_NAME, is_replaceable_folder

MAX_SEED = 2**32 - 1


def bad(arg: str, problem: str) -> CliError:
    """The error for argument (or file) ``arg``: ``argument --rank: <problem>``."""
    return CliError(f"argument {arg}: {problem}")


def _valid_range(lo: float, hi: float | None) -> str:
    return f">= {lo}" if hi is None else f"{lo} to {hi}"


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi] (no upper bound when ``hi`` is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer (valid: {_valid_range(lo, hi)})") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range (valid: {_valid_range(lo, hi)})")
        return value
    return parse


def float_in(lo: float, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in [lo, hi] (``(lo, hi]`` with ``lo_open``; no upper bound when ``hi`` is
    None)."""
    valid = ("> " + str(lo) if hi is None else f"({lo}, {hi}]") if lo_open else _valid_range(lo, hi)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number (valid: {valid})") from None
        if not math.isfinite(value) or value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{text} is out of range (valid: {valid})")
        return value
    return parse


def device(text: str) -> str:
    """argparse type: ``cpu``, or ``cuda`` / ``cuda:N`` where this machine has that GPU."""
    if text == "cpu":
        return text
    kind, _, index = text.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (valid: cpu, cuda, cuda:N)")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (valid: cpu)")
    if index and int(index) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return text


def read_text_file(path: str | Path, arg: str) -> str:
    """The text of a UTF-8 file holding something besides white space (``CliError`` naming ``arg`` otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise bad(arg, f"{path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise bad(arg, f"cannot read {path} ({err.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise bad(arg, f"{path} is not a text file (binary or not UTF-8); give a UTF-8 text file")
    if not text.strip():
        raise bad(arg, f"{path} is empty; give a text file with at least one line of text")
    return text


def _check_writable(path: Path, arg: str) -> None:
    """The nearest existing folder above ``path`` must be a writable folder."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise bad(arg, f"{parent} is not a folder, so {path} cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise bad(arg, f"{parent} is not writable; choose an output path in a writable folder")


def output_folder(path: str | Path, arg: str, inputs: Iterable[str | Path] = ()) -> Path:
    """An output folder path: new, an empty folder, or a folder quantduo wrote (replaced atomically once the new one
    is complete); writable; not one of ``inputs`` nor inside one."""
    out = Path(path).absolute()
    if out.exists() and not out.is_dir():
        raise bad(arg, f"{out} is an existing file; give a folder path (new, empty, or written by quantduo)")
    if not is_replaceable_folder(out):
        raise bad(arg, f"{out} is a non-empty folder quantduo did not write (no {MANIFEST_NAME}); give a new or "
                       f"empty folder, or remove it")
    for source in inputs:
        source = Path(source).absolute()
        if out == source or source in out.parents:
            raise bad(arg, f"{out} is the input folder {source} or inside it; give a separate output folder")
    _check_writable(out, arg)
    return out


def output_file(path: str | Path, arg: str, suffix: str) -> Path:
    """An output file path ending in ``suffix`` (written atomically): not a folder, in a writable folder."""
    out = Path(path).absolute()
    if out.suffix.lower() != suffix:
        raise bad(arg, f"{out.name} does not end in {suffix}; give a {suffix} file path")
    if out.is_dir():
        raise bad(arg, f"{out} is a folder; give a {suffix} file path")
    _check_writable(out, arg)
    return out


def pipeline_folder(path: str | Path, arg: str = "--model") -> tuple[str, dict]:
    """(denoiser component, its config) of a diffusers pipeline folder, read without loading anything."""
    if not Path(path).is_dir():
        raise bad(arg, f"{path} is not a folder; give a diffusers pipeline folder (e.g. from `quantduo "
                       f"example-pipeline`)")
    try:
        return read_denoiser_config(path)
    except InputError as err:
        raise bad(arg, f"{err}; give a diffusers pipeline folder (model_index.json + component folders)") from None


def lm_config(path: str | Path, arg: str = "--model") -> dict:
    """The ``config.json`` of a local transformers causal-LM folder with weights, read without loading anything."""
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise bad(arg, f"{folder} is not a transformers model folder (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(arg, f"{config_path} is unreadable or not valid JSON ({err})") from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not architectures or not all(str(a).endswith("ForCausalLM") for a in architectures):
        raise bad(arg, f"{config_path} does not describe a causal LM (architectures {architectures!r}); give a "
                       f"transformers *ForCausalLM model folder")
    if not isinstance(config.get("max_position_embeddings"), int):
        raise bad(arg, f"{config_path} has no max_position_embeddings")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise bad(arg, f"{folder} holds no weights (*.safetensors or pytorch_model*.bin)")
    return config
