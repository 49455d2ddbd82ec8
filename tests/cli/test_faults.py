"""Fault injection on every CLI flow (CPU, bundled tiny models): bad arguments and input files fail before any work
with one exact line on stderr and exit 2; kill -9, Ctrl-C, full and read-only disks never damage a previous output;
corrupt or edited checkpoints are refused at load; saved checkpoints load bit-identically (hypothesis)."""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from quantduo.cli import diffusion as diffusion_commands
from quantduo.cli import duo as duo_commands
from quantduo.cli import CliError, main
from quantduo.duo import demo as duo_demo
from quantduo.formats.registry import get_format
from quantduo.models import tiny_lm
from quantduo.svdquant import SVDQuantConfig, load_quantized, quantize_model, save_quantized
from quantduo.utils import MANIFEST_NAME, verify_manifest

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[2]
LM = str(tiny_lm.ASSET_DIR)
PATTERN = str(duo_demo.SHIPPED_PATTERN)
SIZE = ["--height", "32", "--width", "32", "--max-sequence-length", "16", "--dtype", "float32"]
QUANTIZE = ["--calib-samples", "4", "--calib-steps", "2", "--search-tokens", "64", "--rank", "8", "--prompt", "a cat"]
SMALL_DUO = ["--context-min", "160", "--context-max", "200"]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``quantduo ARGV`` in-process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` with its bytes (to show a previous output is untouched)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder: Path) -> list[str]:
    """Temporary folders left next to ``folder``."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def cli_process(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "quantduo.cli", *map(str, args)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_until_working(proc: subprocess.Popen, weights: str, timeout: float = 120.0) -> None:
    """Wait until ``proc`` has mapped a weights file named ``weights`` (its model is loaded, imports are over), so a
    signal lands in the work rather than in Python's start-up; returns early if it ended."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if weights in Path(f"/proc/{proc.pid}/maps").read_text():
                return
        except OSError:
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny pipeline (``example-pipeline``), its int4 quantization and an identified Duo pattern, made once."""
    tmp = tmp_path_factory.mktemp("faults")
    base, quant, pattern = tmp / "base", tmp / "int4", tmp / "pattern"
    assert main(["example-pipeline", str(base)]) == 0
    assert main(["quantize", "--model", str(base), "--out", str(quant), *SIZE, *QUANTIZE]) == 0
    assert main(["duo", "identify", "--model", LM, "--out", str(pattern), "--steps", "1", *SMALL_DUO]) == 0
    return {"base": base, "quant": quant, "pattern": pattern, "tmp": tmp}


# ---------------------------------------------------------------------------------------------- numbers
BAD_NUMBERS = [
    # quantize
    (["quantize", "--model", "{base}", "--out", "{new}", "--rank", "-1"], "argument --rank: -1 is out of range (valid: >= 0)"),
    (["quantize", "--model", "{base}", "--out", "{new}", "--rank", "100000"],
     "argument --rank: 100000 is out of range for format int4 (valid: 0 to 128, the smallest dimension of a layer that "
     "gets a low-rank branch)"),
    (["quantize", "--model", "{base}", "--out", "{new}", "--format", "w4a16", "--rank", "8"],
     "argument --rank: 8 is out of range for format w4a16 (valid: 0)"),
    (["quantize", "--model", "{base}", "--out", "{new}", "--height", "0"], "argument --height: 0 is out of range (valid: >= 1)"),
    (["quantize", "--model", "{base}", "--out", "{new}", "--height", "30"],
     "argument --height: 30 is not valid for this pipeline (valid: a multiple of 4 from 4 to 4096: the VAE and the "
     "denoiser's patches divide it by 4)"),
    (["quantize", "--model", "{base}", "--out", "{new}", "--width", "8192"],
     "argument --width: 8192 is not valid for this pipeline (valid: a multiple of 4 from 4 to 4096: the VAE and the "
     "denoiser's patches divide it by 4)"),
    (["quantize", "--model", "{base}", "--out", "{new}", "--calib-samples", "0"],
     "argument --calib-samples: 0 is out of range (valid: >= 1)"),
    (["quantize", "--model", "{base}", "--out", "{new}", "--calib-steps", "0"],
     "argument --calib-steps: 0 is out of range (valid: >= 1)"),
    (["quantize", "--model", "{base}", "--out", "{new}", "--search-tokens", "0"],
     "argument --search-tokens: 0 is out of range (valid: >= 1)"),
    (["quantize", "--model", "{base}", "--out", "{new}", "--seed", "-1"],
     "argument --seed: -1 is out of range (valid: 0 to 4294967295)"),
    (["quantize", "--model", "{base}", "--out", "{new}", "--guidance", "-1"],
     "argument --guidance: -1 is out of range (valid: >= 0.0)"),
    (["quantize", "--model", "{base}", "--out", "{new}", "--guidance", "nan"],
     "argument --guidance: nan is out of range (valid: >= 0.0)"),
    (["quantize", "--model", "{base}", "--out", "{new}", "--max-sequence-length", "0"],
     "argument --max-sequence-length: 0 is out of range (valid: >= 1)"),
    (["quantize", "--model", "{base}", "--out", "{new}", "--max-sequence-length", "1000"],
     "argument --max-sequence-length: 1000 is out of range (valid: 1 to 16, the T5 tokenizer's limit)"),
    (["quantize", "--model", "{base}", "--out", "{new}", "--rank", "x"],
     "argument --rank: 'x' is not an integer (valid: >= 0)"),
    # generate
    (["generate", "--model", "{quant}", "--out", "{png}", "--prompt", "a cat", "--steps", "0"],
     "argument --steps: 0 is out of range (valid: >= 1)"),
    (["generate", "--model", "{quant}", "--out", "{png}", "--prompt", "a cat", "--height", "-32"],
     "argument --height: -32 is out of range (valid: >= 1)"),
    (["generate", "--model", "{quant}", "--out", "{png}", "--prompt", "a cat", "--device", "cuda"],
     "argument --device: 'cuda': CUDA is not available on this machine (valid: cpu)"),
    (["generate", "--model", "{quant}", "--out", "{png}", "--prompt", "a cat", "--device", "tpu"],
     "argument --device: 'tpu' is not a device (valid: cpu, cuda, cuda:N)"),
    (["generate", "--model", "{quant}", "--out", "{png}", "--prompt", "a cat", "--cuda-graph"],
     "argument --cuda-graph: needs a CUDA device (valid with --device cuda); leave it out on the CPU"),
    (["generate", "--model", "{base}", "--out", "{png}", "--prompt", "a cat", "--fp8"],
     "argument --execution: fp8 applies to quantized pipelines only; {base} is not quantized (valid: auto)"),
    (["generate", "--model", "{quant}", "--out", "{png}", "--prompt", " "],
     "argument --prompt: the prompt is empty; give some text"),
    # duo identify
    (["duo", "identify", "--model", LM, "--out", "{new}", "--steps", "0"], "argument --steps: 0 is out of range (valid: >= 1)"),
    (["duo", "identify", "--model", LM, "--out", "{new}", "--lr", "0"], "argument --lr: 0 is out of range (valid: > 0.0)"),
    (["duo", "identify", "--model", LM, "--out", "{new}", "--reg", "-0.1"],
     "argument --reg: -0.1 is out of range (valid: >= 0.0)"),
    (["duo", "identify", "--model", LM, "--out", "{new}", "--sink", "-1"], "argument --sink: -1 is out of range (valid: >= 0)"),
    (["duo", "identify", "--model", LM, "--out", "{new}", "--recent", "0"],
     "argument --recent: 0 is out of range (valid: >= 1)"),
    (["duo", "identify", "--model", LM, "--out", "{new}", "--chunk", "0"], "argument --chunk: 0 is out of range (valid: >= 1)"),
    (["duo", "identify", "--model", LM, "--out", "{new}", "--passkeys", "0"],
     "argument --passkeys: 0 is out of range (valid: 1 to 16)"),
    (["duo", "identify", "--model", LM, "--out", "{new}", "--context-max", "5000"],
     "argument --context-max: 5000 exceeds the model's 1024 positions (valid: 1 to 1024)"),
    (["duo", "identify", "--model", LM, "--out", "{new}", "--context-min", "300", "--context-max", "200"],
     "argument --context-min: 300 is above --context-max 200 (valid: 1 to 200)"),
    (["duo", "identify", "--model", LM, "--out", "{new}", "--context-min", "20", "--context-max", "40"],
     "argument --context-min: a 20-token context with 4 passkey(s) at least 36 tokens (sink + recent) before the "
     "questions cannot be built: context_len 20 too short for 4 passkeys"),
    # duo eval / generate
    (["duo", "eval", "--model", LM, "--pattern", PATTERN, "--sparsities", "0.5", "1.5"],
     "argument --sparsities: 1.5 is out of range (valid: 0.0 to 1.0)"),
    (["duo", "eval", "--model", LM, "--pattern", PATTERN, "-n", "0"], "argument -n: 0 is out of range (valid: >= 1)"),
    (["duo", "generate", "--model", LM, "--pattern", PATTERN, "--prompt", "pass key", "--sparsity", "-0.1"],
     "argument --sparsity: -0.1 is out of range (valid: 0.0 to 1.0)"),
    (["duo", "generate", "--model", LM, "--pattern", PATTERN, "--prompt", "pass key", "--max-new-tokens", "0"],
     "argument --max-new-tokens: 0 is out of range (valid: >= 1)"),
    (["duo", "generate", "--model", LM, "--pattern", PATTERN, "--prompt", "pass key", "--max-new-tokens", "2000"],
     "argument --max-new-tokens: the prompt's 3 tokens + 2000 new tokens exceed the model's 1024 positions (valid: at "
     "most 1019 new tokens for this prompt)"),
    (["duo", "generate", "--model", LM, "--pattern", PATTERN, "--prompt", "pass key", "--chunk", "0"],
     "argument --chunk: 0 is out of range (valid: >= 1)"),
    (["duo", "generate", "--model", LM, "--pattern", PATTERN, "--prompt", "pass key", "--kv-bits", "3"],
     "argument --kv-bits: invalid choice: 3 (choose from 8, 4)"),
    (["demo", "--out", "{new}", "--device", "cuda:0"], "argument --device: 'cuda:0': CUDA is not available on this "
                                                      "machine (valid: cpu)"),
]


def fill(items, dirs, tmp_path):
    names = {k: v for k, v in dirs.items()} | {"new": tmp_path / "new", "png": tmp_path / "x.png"}
    return [str(i).format(**names) for i in items]


@pytest.mark.parametrize("argv, line", BAD_NUMBERS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_NUMBERS])
def test_out_of_range_numbers(dirs, tmp_path, capsys, argv, line):
    """Every numeric option out of range: one exact line naming it and the valid range, exit 2, nothing written."""
    before = {k: snapshot(dirs[k]) for k in ("quant", "pattern")}
    code, out, err = run(fill(argv, dirs, tmp_path), capsys)
    assert (code, err) == (2, f"quantduo: error: {fill([line], dirs, tmp_path)[0]}\n")
    assert not (tmp_path / "new").exists() and not (tmp_path / "x.png").exists()
    assert {k: snapshot(dirs[k]) for k in before} == before


# ---------------------------------------------------------------------------------------------- input files
def test_bad_input_files_and_folders(dirs, tmp_path, capsys):
    """Empty / binary / missing prompt files, wrong model folders, bad output paths: one exact line each, exit 2."""
    empty, binary, blank = tmp_path / "empty.txt", tmp_path / "binary.txt", tmp_path / "blank.txt"
    empty.write_text("")
    blank.write_text("\n  \n")
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    base, quant, new = dirs["base"], dirs["quant"], tmp_path / "new"
    quantize = ["quantize", "--model", base, "--out", new]
    cases = [
        ([*quantize, "--prompts", empty], f"argument --prompts: {empty} is empty; give a text file with at least one "
                                          f"line of text"),
        ([*quantize, "--prompts", blank], f"argument --prompts: {blank} is empty; give a text file with at least one "
                                          f"line of text"),
        ([*quantize, "--prompts", binary], f"argument --prompts: {binary} is not a text file (binary or not UTF-8); "
                                           f"give a UTF-8 text file"),
        ([*quantize, "--prompts", tmp_path / "none.txt"], f"argument --prompts: {tmp_path / 'none.txt'} is not a file"),
        ([*quantize, "--prompt", ""], "argument --prompt: a calibration prompt is empty; give some text"),
        (["quantize", "--model", LM, "--out", new],
         f"argument --model: {LM}/model_index.json not found: not a diffusers pipeline folder; give a diffusers "
         f"pipeline folder (model_index.json + component folders)"),
        (["quantize", "--model", tmp_path / "nowhere", "--out", new],
         f"argument --model: {tmp_path / 'nowhere'} is not a folder; give a diffusers pipeline folder (e.g. from "
         f"`quantduo example-pipeline`)"),
        (["quantize", "--model", quant, "--out", new],
         f"argument --model: {quant} is already quantized (format 'int4'); give the full-precision pipeline"),
        (["quantize", "--model", base, "--out", a_file],
         f"argument --out: {a_file} is an existing file; give a folder path (new, empty, or written by quantduo)"),
        (["quantize", "--model", base, "--out", occupied],
         f"argument --out: {occupied} is a non-empty folder quantduo did not write (no {MANIFEST_NAME}); give a new "
         f"or empty folder, or remove it"),
        (["quantize", "--model", base, "--out", base],
         f"argument --out: {base} is the input folder {base} or inside it; give a separate output folder"),
        (["quantize", "--model", base, "--out", base / "q"],
         f"argument --out: {base / 'q'} is the input folder {base} or inside it; give a separate output folder"),
        (["quantize", "--model", base, "--out", a_file / "q"],
         f"argument --out: {a_file} is not a folder, so {a_file / 'q'} cannot be created"),
        (["generate", "--model", quant / "transformer", "--out", tmp_path / "x.png", "--prompt", "a cat"],
         f"argument --model: {quant / 'transformer'}/model_index.json not found: not a diffusers pipeline folder; "
         f"give a diffusers pipeline folder (model_index.json + component folders)"),
        (["generate", "--model", quant, "--out", tmp_path / "x.jpg", "--prompt", "a cat"],
         "argument --out: x.jpg does not end in .png; give a .png file path"),
        (["duo", "identify", "--model", base, "--out", new],
         f"argument --model: {base} is not a transformers model folder (no config.json)"),
        (["duo", "identify", "--model", base / "transformer", "--out", new],
         f"argument --model: {base / 'transformer'}/config.json does not describe a causal LM (architectures None); "
         f"give a transformers *ForCausalLM model folder"),
        (["duo", "identify", "--model", LM, "--out", new, "--haystack", binary],
         f"argument --haystack: {binary} is not a text file (binary or not UTF-8); give a UTF-8 text file"),
        (["duo", "identify", "--model", LM, "--out", new, "--haystack", empty],
         f"argument --haystack: {empty} is empty; give a text file with at least one line of text"),
        (["duo", "generate", "--model", LM, "--pattern", PATTERN, "--prompt-file", binary],
         f"argument --prompt-file: {binary} is not a text file (binary or not UTF-8); give a UTF-8 text file"),
        (["duo", "generate", "--model", LM, "--pattern", PATTERN, "--prompt-file", empty],
         f"argument --prompt-file: {empty} is empty; give a text file with at least one line of text"),
        (["duo", "generate", "--model", LM, "--pattern", PATTERN, "--prompt", "the quick brown fox"],
         "argument --prompt: word 'the' is not in the tiny LM vocabulary; give text in the model's vocabulary"),
        (["duo", "eval", "--model", LM, "--pattern", PATTERN, "--plot", tmp_path],
         f"argument --plot: {tmp_path.name} does not end in .png; give a .png file path"),
    ]
    english = tmp_path / "english.txt"
    english.write_text("It was the best of times, it was the worst of times.\n")
    cases.append((["duo", "identify", "--model", LM, "--out", new, "--haystack", english],
                  "argument --haystack: word 'It' is not in the tiny LM vocabulary; give text in the model's "
                  "vocabulary"))
    for argv, line in cases:
        code, _, err = run(argv, capsys)
        assert (code, err) == (2, f"quantduo: error: {line}\n"), argv
    assert not new.exists() and (occupied / "notes.txt").read_text() == "mine"


def test_pattern_faults(dirs, tmp_path, capsys):
    """Pattern folders: no config.json (no silent 128/256 default), gates outside [0, 1], wrong shape, edited after
    saving: refused before the model is loaded."""
    def pattern_copy(name):
        folder = tmp_path / name
        shutil.copytree(dirs["pattern"], folder)
        return folder

    no_config = pattern_copy("no_config")
    (no_config / "config.json").unlink()
    not_finite = pattern_copy("not_finite")  # (values outside [0, 1] are clipped, as the reference's loader does)
    tsv = not_finite / "full_attention_heads.tsv"
    rows = tsv.read_text().splitlines()
    tsv.write_text("\n".join(["\t".join(["nan", *rows[0].split("\t")[1:]]), *rows[1:]]) + "\n")
    (not_finite / MANIFEST_NAME).unlink()
    wrong_shape = tmp_path / "wrong_shape"
    wrong_shape.mkdir()
    (wrong_shape / "full_attention_heads.tsv").write_text("1\t0\n0\t1\n")
    (wrong_shape / "config.json").write_text('{"sink_size": 4, "recent_size": 32}')
    edited = pattern_copy("edited")
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "recent_size": 64}))
    cases = [
        (no_config, f"pattern {no_config} has no config.json (it gives sink_size and recent_size)"),
        (not_finite, f"{not_finite / 'full_attention_heads.tsv'}: gates contain NaN or infinite values"),
        (wrong_shape, "pattern has shape (2, 2) (layers, kv_heads) but the model has (4, 4)"),
        (edited, f"{edited / 'config.json'} is corrupt or was edited: its SHA-256 does not match "
                 f"{edited / MANIFEST_NAME}"),
    ]
    for folder, message in cases:
        for argv in (["duo", "eval", "--model", LM, "--pattern", folder, "-n", "1"],
                     ["duo", "generate", "--model", LM, "--pattern", folder, "--prompt", "pass key"]):
            code, _, err = run(argv, capsys)
            assert code == 2 and err.startswith(f"quantduo: error: argument --pattern: {message}"), (argv, err)
            assert err.count("\n") == 1


# ---------------------------------------------------------------------------------------------- checkpoints
def _edit_act_format(folder: Path) -> None:
    path = folder / "transformer" / "config.json"
    config = json.loads(path.read_text())
    for spec in config["quantization_config"]["layers"].values():
        spec["act_format"] = "none"
    path.write_text(json.dumps(config))


def _flip(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
CHECKPOINT_FAULTS = {
    "truncated weights": (lambda f: _truncate(f / WEIGHTS),
                          "{f}/" + WEIGHTS + " is corrupt or was edited: its SHA-256 does not match {f}/" + MANIFEST_NAME),
    "bit-flipped weights": (lambda f: _flip(f / WEIGHTS),
                            "{f}/" + WEIGHTS + " is corrupt or was edited: its SHA-256 does not match {f}/" + MANIFEST_NAME),
    "act_format int4 -> none": (_edit_act_format, "{f}/transformer/config.json is corrupt or was edited: its SHA-256 "
                                                  "does not match {f}/" + MANIFEST_NAME),
    "bit-flipped VAE": (lambda f: _flip(f / "vae" / "diffusion_pytorch_model.safetensors"),
                        "{f}/vae/diffusion_pytorch_model.safetensors is corrupt or was edited: its SHA-256 does not "
                        "match {f}/" + MANIFEST_NAME),
    "edited scheduler": (lambda f: (f / "scheduler" / "scheduler_config.json").write_text("{}"),
                         "{f}/scheduler/scheduler_config.json is corrupt or was edited: its SHA-256 does not match "
                         "{f}/" + MANIFEST_NAME),
    "deleted weights": (lambda f: (f / WEIGHTS).unlink(),
                        "{f}/" + WEIGHTS + " is missing (listed in {f}/" + MANIFEST_NAME + ")"),
    "extra file": (lambda f: (f / "transformer" / "extra.safetensors").write_bytes(b"x"),
                   "{f}/transformer/extra.safetensors is not listed in {f}/" + MANIFEST_NAME + ": the folder was "
                   "changed after it was saved"),
    "no manifest": (lambda f: (f / MANIFEST_NAME).unlink(),
                    "{f} has no " + MANIFEST_NAME + ": not a complete folder written by quantduo"),
    "truncated manifest": (lambda f: _truncate(f / MANIFEST_NAME), "{f}/" + MANIFEST_NAME + " is unreadable or not "
                                                                   "valid JSON ("),
    "truncated model_index.json": (lambda f: _truncate(f / "model_index.json"),
                                   "argument --model: {f}/model_index.json is unreadable or not valid JSON ("),
    "truncated denoiser config": (lambda f: _truncate(f / "transformer" / "config.json"),
                                  "argument --model: {f}/transformer/config.json is unreadable or not valid JSON ("),
}


@pytest.mark.parametrize("fault", list(CHECKPOINT_FAULTS))
def test_corrupt_checkpoints_are_refused(dirs, tmp_path, capsys, fault):
    """Truncated / bit-flipped / edited / incomplete copies of a quantized pipeline: one line naming the file, exit
    2, no image written (the manifest covers every file, configs included)."""
    edit, message = CHECKPOINT_FAULTS[fault]
    folder = tmp_path / "ckpt"
    shutil.copytree(dirs["quant"], folder)
    edit(folder)
    png = tmp_path / "x.png"
    code, _, err = run(["generate", "--model", folder, "--out", png, "--prompt", "a cat", *SIZE, "--steps", "1"],
                       capsys)
    assert code == 2 and err.startswith(f"quantduo: error: {message.format(f=folder)}") and err.count("\n") == 1, err
    assert not png.exists()


def test_fp8_on_an_nvfp4_checkpoint_is_an_error(dirs, tmp_path, capsys):
    """--fp8 on a checkpoint whose layers cannot run fp8: refused from the config, before loading (it used to convert
    nothing and exit 0)."""
    folder = tmp_path / "nvfp4"
    shutil.copytree(dirs["quant"], folder)
    path = folder / "transformer" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["format"] = "nvfp4"
    for spec in config["quantization_config"]["layers"].values():
        spec.update(weight_format="nvfp4", act_format="nvfp4")
    path.write_text(json.dumps(config))
    code, _, err = run(["generate", "--model", folder, "--out", tmp_path / "x.png", "--prompt", "a cat", "--fp8"],
                       capsys)
    assert (code, err) == (2, "quantduo: error: argument --execution: fp8 cannot run this checkpoint's format 'nvfp4' "
                              "(valid: auto, reference, exact, a16)\n")


def test_generate_with_fp8_attention(dirs, tmp_path, capsys, monkeypatch):
    """--fp8-attention runs the denoiser's attention through the backend's fp8 semantics (its reference on the CPU):
    an image, not the 16-bit attention's; fa3 on a GPU without FlashAttention-3 is refused before loading."""
    images = {}
    for backend in (None, "triton", "fa3"):
        png = tmp_path / f"{backend}.png"
        extra = [] if backend is None else ["--fp8-attention", backend]
        code, _, err = run(["generate", "--model", dirs["quant"], "--out", png, "--prompt", "a cat", "--steps", "2",
                            *SIZE[:4], *extra], capsys)
        assert code == 0, err
        images[backend] = png.read_bytes()
    assert images["triton"] != images[None] and images["fa3"] != images[None]
    monkeypatch.setattr(diffusion_commands, "FA3_AVAILABLE", False)
    args = argparse.Namespace(fp8_attention="fa3", device="cuda")
    with pytest.raises(CliError, match="--fp8-attention: fa3 needs FlashAttention-3"):
        diffusion_commands._check_fp8_attention(args)
    diffusion_commands._check_fp8_attention(argparse.Namespace(fp8_attention="fa3", device="cpu"))


def test_quantized_folder_is_self_contained_and_says_how_it_was_made(dirs, tmp_path, capsys):
    """No absolute path in any JSON; the manifest records format, rank, version and command; the folder still loads
    and generates after the base pipeline is moved away."""
    moved = tmp_path / "moved"
    shutil.copytree(dirs["quant"], moved)
    text = "".join(p.read_text() for p in moved.rglob("*.json") if p.name != MANIFEST_NAME)
    assert str(dirs["base"]) not in text and str(dirs["tmp"]) not in text
    made_by = verify_manifest(moved)["made_by"]
    assert made_by["format"] == "int4" and made_by["rank"] == 8
    assert made_by["command"].startswith("quantduo quantize --model ")
    png = tmp_path / "x.png"
    code, out, err = run(["generate", "--model", moved, "--out", png, "--prompt", "a cat", *SIZE, "--steps", "1"],
                         capsys)
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG", err


# ---------------------------------------------------------------------------------------------- interruptions
@pytest.mark.parametrize("target, n", [("os.fsync", 1), ("os.fsync", 7), ("quantduo.utils._exchange", 1),
                                       ("shutil.rmtree", 1)])
def test_kill_9_while_overwriting(tmp_path, target, n):
    """kill -9 at points of an overwrite (first / a middle fsync of the new files, just before the swap, just after
    it): the folder is the old one byte for byte, or the complete new one; the next write removes the leftovers."""
    out = tmp_path / "pipe"
    assert main(["example-pipeline", str(out), "--seed", "1"]) == 0
    old = snapshot(out)
    proc = subprocess.run([sys.executable, "-m", "tests.cli.fault_driver", target, str(n), "example-pipeline",
                           str(out), "--seed", "2"], env=subprocess_env(), cwd=ROOT, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    if target == "shutil.rmtree":  # killed after the swap: the new folder is complete
        verify_manifest(out)
        assert snapshot(out) != old and "--seed 2" in json.loads((out / MANIFEST_NAME).read_text())["made_by"]["command"]
    else:
        assert snapshot(out) == old
    assert siblings(out)  # the killed writer's temporary folder
    assert main(["example-pipeline", str(out), "--seed", "3"]) == 0
    assert siblings(out) == [] and verify_manifest(out)


@pytest.mark.parametrize("command", ["quantize", "identify"])
def test_kill_9_at_a_random_time(dirs, tmp_path, command):
    """kill -9 of quantize / duo identify at a random moment while they overwrite an earlier output: that output is
    intact or replaced by a complete new one, never a mix."""
    out = tmp_path / command
    shutil.copytree(dirs["quant" if command == "quantize" else "pattern"], out)
    old = snapshot(out)
    args = (["quantize", "--model", dirs["base"], "--out", out, *SIZE, *QUANTIZE] if command == "quantize" else
            ["duo", "identify", "--model", LM, "--out", out, "--steps", "2", *SMALL_DUO])
    proc = cli_process(args)
    wait_until_working(proc, "diffusion_pytorch_model.safetensors" if command == "quantize" else "model.safetensors")
    time.sleep(random.Random(command).uniform(0.0, 3.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert snapshot(out) == old or verify_manifest(out)


def test_ctrl_c_in_quantize_keeps_the_old_output(dirs, tmp_path):
    """SIGINT during quantize: one line, exit 130, the earlier output untouched, no temporary folder left."""
    out = tmp_path / "int4"
    shutil.copytree(dirs["quant"], out)
    old = snapshot(out)
    # more calibration work than QUANTIZE (later options win), so that the signal lands in the work, not in the
    # interpreter's shutdown after it (which restores the default SIGINT action)
    longer = ["--calib-samples", "16", "--calib-steps", "6", "--search-tokens", "512"]
    proc = cli_process(["quantize", "--model", dirs["base"], "--out", out, *SIZE, *QUANTIZE, *longer])
    wait_until_working(proc, "diffusion_pytorch_model.safetensors")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("quantduo")]
    if proc.returncode == 0:  # finished before the signal on a fast machine: the new folder is complete
        verify_manifest(out)
        return
    assert proc.returncode == 130 and lines == ["quantduo: interrupted (Ctrl-C); output files and folders are left as "
                                                "they were"], err
    assert "Traceback" not in err
    assert snapshot(out) == old and siblings(out) == []


def test_ctrl_c_in_duo_generate_prints_the_tokens_so_far(capsys, monkeypatch):
    """Ctrl-C after three decoded tokens: those tokens on stdout, one line on stderr, exit 130."""
    real = duo_commands.GraphedDecoder

    class Interrupted(real):
        calls = 0

        def __call__(self, *args, **kwargs):
            Interrupted.calls += 1
            if Interrupted.calls == 3:
                raise KeyboardInterrupt
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(duo_commands, "GraphedDecoder", Interrupted)
    code, out, err = run(["duo", "generate", "--model", LM, "--pattern", PATTERN, "--prompt",
                          tiny_lm.haystack_text(60, seed=1), "--max-new-tokens", "10"], capsys)
    assert code == 130 and err == "quantduo: interrupted (Ctrl-C); output files and folders are left as they were\n"
    assert len(out.split()) == 3


# ---------------------------------------------------------------------------------------------- disks
def test_full_disk_keeps_the_old_output(tmp_path):
    """A file-size limit (``ulimit -f``: writes fail with EFBIG, as on a full disk) while overwriting: one line,
    exit 1, the old folder intact and no temporary folder left."""
    out = tmp_path / "pipe"
    assert main(["example-pipeline", str(out), "--seed", "1"]) == 0
    old = snapshot(out)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = cli_process(["example-pipeline", out, "--seed", "2"], preexec_fn=limit)
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.startswith("quantduo")]
    assert proc.returncode == 1 and len(lines) == 1 and "File too large" in lines[0], err
    assert snapshot(out) == old and siblings(out) == []


def test_write_failure_keeps_the_old_output(tmp_path, capsys, monkeypatch):
    """A write that fails at the last file (monkeypatched ENOSPC in the manifest): old folder intact, no leftovers."""
    out = tmp_path / "pipe"
    assert main(["example-pipeline", str(out), "--seed", "1"]) == 0
    old = snapshot(out)
    capsys.readouterr()

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out))

    monkeypatch.setattr("quantduo.integrations.diffusers.pipeline.write_manifest", no_space)
    code, _, err = run(["example-pipeline", out, "--seed", "2"], capsys)
    assert (code, err) == (1, f"quantduo: error: {out}: No space left on device\n")
    assert snapshot(out) == old and siblings(out) == []


def test_read_only_output_folder(tmp_path, capsys):
    """An output path in a read-only folder: refused before any work. Root ignores permission bits, so as root the
    folder is /proc/sys (read-only even for root)."""
    if os.geteuid() == 0:
        locked = Path("/proc/sys")
        if os.access(locked, os.W_OK):
            pytest.skip("no folder here is read-only for root")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
    problem = f"{locked} is not writable; choose an output path in a writable folder"
    code, _, err = run(["example-pipeline", locked / "pipe"], capsys)
    assert (code, err) == (2, f"quantduo: error: argument DIR: {problem}\n")
    code, _, err = run(["duo", "identify", "--model", LM, "--out", locked / "pattern"], capsys)
    assert (code, err) == (2, f"quantduo: error: argument --out: {problem}\n")
    assert not (locked / "pipe").exists() and not (locked / "pattern").exists()


# ---------------------------------------------------------------------------------------------- round trip
class _Mlp(nn.Module):
    def __init__(self, k: int, n: int):
        super().__init__()
        self.up, self.down = nn.Linear(k, n), nn.Linear(n, k)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


@settings(max_examples=6, deadline=None)
@given(fmt=st.sampled_from(["int4", "w4a16", "svdq-w4a16", "nvfp4"]), rank=st.integers(0, 16),
       k=st.sampled_from([64, 128]), n=st.sampled_from([64, 192]), seed=st.integers(0, 2**16))
def test_saved_checkpoints_load_bit_identically(tmp_path_factory, fmt, rank, k, n, seed):
    """Property: any quantized model, saved and loaded into a fresh skeleton, gives bit-identical outputs."""
    torch.manual_seed(seed)
    model = _Mlp(k, n)
    x = torch.randn(2, 16, k)
    config = SVDQuantConfig(**get_format(fmt).config_fields(), rank=rank, dtype="float32", search_tokens=64,
                            lowrank_iters=2)
    quantize_model(model, lambda m: m(x), config, progress=False)
    folder = tmp_path_factory.mktemp("ckpt") / "ckpt"
    save_quantized(model, folder, config)
    fresh = _Mlp(k, n)
    load_quantized(fresh, folder)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    np.testing.assert_array_equal(sorted(p.name for p in folder.iterdir()),
                                  ["model.safetensors", "quantduo_config.json", MANIFEST_NAME])
