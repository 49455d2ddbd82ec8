"""Block-by-block SVDQuant of the shipped tiny DiT: same quality as whole-model quantization, chain checks, and a
SIGKILL mid-run followed by ``resume`` gives byte-identical output.

Run as a script (``python -m tests.svdquant.test_blockwise WORK_DIR OUT_FILE [--resume]``) it quantizes the tiny DiT's
transformer block by block and writes its state dict to ``OUT_FILE``: the kill test runs it in a subprocess.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from quantduo.integrations.diffusers import block_names, quantization_config, quantize_transformer_blockwise
from quantduo.models.tiny_dit import load_tiny_dit, sample_digits
from quantduo.svdquant import SVDQuantLinear
from quantduo.svdquant.blockwise import LazyWeights, activations_fit, chain_plan, finished_blocks
from quantduo.integrations.diffusers import CalibrationSample

SETTINGS = dict(rank=16, search_tokens=256, lowrank_iters=8)
LABELS = torch.arange(10)


def calibration_samples(model, steps: int = 4) -> list[CalibrationSample]:
    """The transformer's calls while sampling one image per class (``steps`` Euler steps, CFG: batch
    ``2 * model.num_classes``, 20 for the digits DiT)."""
    samples = []

    def hook(module, args, kwargs):
        samples.append(CalibrationSample(args, {k: v.clone() if isinstance(v, torch.Tensor) else v
                                                for k, v in kwargs.items()}, 0, len(samples)))

    handle = model.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        sample_digits(model, torch.arange(model.num_classes), steps=steps, seed=1)
    finally:
        handle.remove()
    return samples


def run_blockwise(work_dir: str, out_file: str | None = None, resume: bool = False, sequential: bool = False,
                  activations: str = "auto", device: str | None = None):
    torch.set_num_threads(1)
    model = load_tiny_dit()
    config = quantization_config(model.transformer, **SETTINGS)
    report = quantize_transformer_blockwise(model.transformer, calibration_samples(model), work_dir, config,
                                            resume=resume, sequential=sequential, activations=activations,
                                            device=device, progress=False)
    if out_file:
        save_file({k: v.contiguous() for k, v in model.transformer.state_dict().items()}, out_file)
    return model, report


def test_chain_plan_and_blockwise_quality(tmp_path, single_thread):
    """Every DiT block is fed by the previous one; the block-wise result draws the same digits as full precision
    (PSNR checked in test_quality_at_scale)."""
    model = load_tiny_dit()
    names = block_names(model.transformer)
    assert names == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                     "single_transformer_blocks.1"]
    quantized, report = run_blockwise(str(tmp_path / "work"))
    assert finished_blocks(tmp_path / "work") == 4
    assert all(r.name.split(".")[0] in ("transformer_blocks", "single_transformer_blocks") for r in report.layers)
    ref = sample_digits(model, LABELS, steps=10, seed=3)
    out = sample_digits(quantized, LABELS, steps=10, seed=3)
    assert float((out - ref).abs().mean()) < 0.05
    with pytest.raises(ValueError, match="holds a blockwise run already"):
        run_blockwise(str(tmp_path / "work"))


def test_activation_placements_give_identical_bytes(tmp_path, single_thread):
    """Where the activations live between blocks (memory on the device, host memory, disk) changes no byte of the
    result; full-precision block inputs (the calibration pass also yields the next block's calls) differ from the
    quantized blocks' outputs of the sequential setting; an unknown placement is refused."""
    states = {}
    for activations in ("device", "host", "disk"):
        model, _ = run_blockwise(str(tmp_path / activations), activations=activations)
        states[activations] = model.transformer.state_dict()
        assert not (tmp_path / activations / "activations").exists()
    for name, tensor in states["host"].items():
        assert torch.equal(states["device"][name], tensor) and torch.equal(states["disk"][name], tensor), name
    sequential = run_blockwise(str(tmp_path / "sequential"), sequential=True)[0].transformer.state_dict()
    last = [n for n in tensor_names(states["host"]) if n.startswith("single_transformer_blocks.1.")]
    assert any(not torch.equal(sequential[n], states["host"][n]) for n in last)
    with pytest.raises(ValueError, match="activations must be one of"):
        run_blockwise(str(tmp_path / "bad"), activations="gpu")


@pytest.mark.gpu
def test_gpu_activations_on_the_device_give_the_host_bytes(tmp_path):
    """On a GPU the blocks run there; calls kept in GPU memory (``device``; ``auto`` picks it for the tiny DiT) or
    moved from host memory per call give the same bytes."""
    model = load_tiny_dit()
    assert activations_fit(10 << 20, model.transformer.transformer_blocks[0], torch.device("cuda"))
    states = {a: run_blockwise(str(tmp_path / a), activations=a, device="cuda")[0].transformer.state_dict()
              for a in ("auto", "host")}
    for name, tensor in states["host"].items():
        assert torch.equal(states["auto"][name], tensor), name


def test_lazy_weights_hold_one_full_precision_block_and_give_the_same_bytes(tmp_path, single_thread):
    """A meta-device skeleton whose tensors are read from a safetensors file block by block (LazyWeights) gives the
    bytes of the in-memory run, and at no block's start is more than that one full-precision block materialized
    (the others are still on the meta device or already quantized)."""
    expected, _ = run_blockwise(str(tmp_path / "in_memory"))
    model = load_tiny_dit()
    transformer = model.transformer
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, tmp_path / "weights.safetensors")
    samples = calibration_samples(model)  # captured with the full model before it is emptied
    names = block_names(transformer)
    skeleton = transformer.to("meta")
    real_full_precision = []

    def probe(module, args, kwargs):
        blocks = {n: skeleton.get_submodule(n) for n in names}
        real_full_precision.append([n for n, b in blocks.items() if not any(isinstance(m, SVDQuantLinear)
                                    for m in b.modules()) and any(p.device.type != "meta" for p in b.parameters())])

    for name in names:
        skeleton.get_submodule(name).register_forward_pre_hook(probe, with_kwargs=True)
    weights = LazyWeights([tmp_path / "weights.safetensors"])
    config = quantization_config(skeleton, **SETTINGS)
    quantize_transformer_blockwise(skeleton, samples, str(tmp_path / "lazy"), config, weights=weights,
                                   progress=False)
    assert all(len(real) <= 1 for real in real_full_precision), real_full_precision
    assert any(len(real) == 1 for real in real_full_precision)  # the probe sees the materialized block
    assert all(p.device.type == "cpu" for p in skeleton.parameters())
    maps = Path("/proc/self/maps")  # the tensors own their memory: no view keeps the file mapped (and resident)
    assert not maps.exists() or str(tmp_path / "weights.safetensors") not in maps.read_text()
    got = skeleton.state_dict()
    for name, tensor in expected.transformer.state_dict().items():
        assert torch.equal(got[name], tensor), name
    with pytest.raises(ValueError, match="not in the model's safetensors files"):
        LazyWeights([tmp_path / "weights.safetensors"]).load(nn.Linear(2, 2), "missing", "cpu")


def tensor_names(state: dict) -> list[str]:
    return [n for n, t in state.items() if t.is_floating_point()]


def test_glue_between_blocks_is_rejected():
    class Glued(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

        def forward(self, x):
            return self.blocks[1](self.blocks[0](x) * 2)

    model = Glued()
    blocks = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    with pytest.raises(ValueError, match="'blocks.1'.*computed between"):
        chain_plan(model, blocks, ((torch.randn(2, 8),), {}), torch.device("cpu"), torch.device("cpu"))


def test_a_failed_block_write_is_raised_and_the_blocks_before_it_are_on_disk(tmp_path, single_thread):
    """Blocks are written from a background thread: its error (here a file where block 1's folder goes, which the
    atomic writer refuses to replace) must stop the run, and block 0, written before, must be complete."""
    work = tmp_path / "work"
    (work / "blocks").mkdir(parents=True)
    (work / "blocks" / "0001").write_text("not a quantduo folder")
    with pytest.raises(FileExistsError, match="0001"):
        run_blockwise(str(work))
    assert finished_blocks(work) == 1


def _script(*args: str) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[2]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tests.svdquant.test_blockwise", *args], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_then_resume_is_byte_identical(tmp_path):
    """Kill a CPU run once its first block is finished (SIGKILL: no clean-up), resume it, compare the bytes of the
    saved transformer with an uninterrupted run's."""
    killed = _script(str(tmp_path / "killed"), str(tmp_path / "killed.safetensors"))
    while finished_blocks(tmp_path / "killed") < 1:
        assert killed.poll() is None, killed.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = finished_blocks(tmp_path / "killed")
    assert killed.returncode == -signal.SIGKILL and 1 <= done < 4, done
    resumed = _script(str(tmp_path / "killed"), str(tmp_path / "resumed.safetensors"), "--resume")
    clean = _script(str(tmp_path / "clean"), str(tmp_path / "clean.safetensors"))
    for proc in (resumed, clean):
        assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
    assert (tmp_path / "resumed.safetensors").read_bytes() == (tmp_path / "clean.safetensors").read_bytes()


if __name__ == "__main__":
    run_blockwise(sys.argv[1], sys.argv[2], resume="--resume" in sys.argv)
