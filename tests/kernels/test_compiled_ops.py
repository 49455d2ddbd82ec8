"""The kernels that compiled graphs launch themselves (``triton_op`` operators, ``common.kernel_op``): Inductor's
analysis of their Triton code must find only their outputs written. Where it cannot tell, it assumes every input
is written and copies each one before the launch (every weight of every layer, for the expansion), which until
now only a GPU run showed. The analysis compiles a kernel to Triton IR for a target that the active driver names;
here a stand-in driver names Hopper, in a subprocess (Triton's driver is process-wide). Each kernel's arguments
are the ones its launch function passes, captured at a small size."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from torch._higher_order_ops import triton_kernel_wrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r"""
import json, torch, triton
from triton.backends.compiler import GPUTarget
from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors
from quantduo.formats import quantizers as qz
from quantduo.kernels import fp8_linear, head_quant_fp8, layer_norm_fp8, qk_norm_rope


class HopperDriver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


class Capture:
    # stands in for torch.library.wrap_triton inside a launch function: records each kernel and its arguments
    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        launches = self.launches

        class Wrapped:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append((kernel, dict(zip(kernel.arg_names, args)) | kwargs))
                return launch
        return Wrapped()


def writes(launch):
    # the arguments each launch writes, in launch order
    capture = Capture()
    launch(capture)  # the outputs stay unwritten: only the arguments are wanted
    found = []
    for kernel, kwargs in capture.launches:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
        found.append(sorted(dep.name for dep in identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes))
    return found


triton.runtime.driver.set_active(HopperDriver())
bf16 = torch.bfloat16
q, scales = qz.quantize_int4(torch.randn(64, 128), 64, bf16)
x0, x1 = torch.randn(1, 3, 2, 128, dtype=bf16), torch.randn(1, 4, 2, 128, dtype=bf16)
w, cos = torch.ones(128, dtype=bf16), torch.rand(7, 128)
print(json.dumps({
    "token_quant_gelu": writes(lambda wrap: fp8_linear._launch_token_quant(
        torch.randn(4, 96, dtype=bf16), torch.randn(4, 192, dtype=bf16), wrap)),
    "expansion": writes(lambda wrap: fp8_linear._launch_expansion(
        qz.pack_int4(q), scales, torch.randn(128, 32, dtype=bf16), torch.randn(64, 32, dtype=bf16),
        torch.rand(128) + 0.5, torch.rand(64) + 1, 64, wrap)),
    "qk_norm_rope": writes(lambda wrap: qk_norm_rope._launch(
        x0, w, x1, w, cos, cos, 1e-6, 20.0, False, wrap)),
    "layer_norm_fp8": writes(lambda wrap: layer_norm_fp8._launch(
        x0.flatten(2), x1.flatten(2), w.repeat(2)[None], w.repeat(2)[None], 1e-6, wrap=wrap)),
    "head_quant_fp8": writes(lambda wrap: head_quant_fp8._launch(x0, x1, wrap)),
    "gated_residual_layer_norm_fp8": writes(lambda wrap: layer_norm_fp8._launch(
        x0.flatten(2), None, w.repeat(2)[None], w.repeat(2)[None], 1e-6, x0.flatten(2), w.repeat(2)[None], wrap=wrap)),
}))
"""


@pytest.mark.skipif(not hasattr(triton_kernel_wrap, "identify_accessed_tensors"),
                    reason="this torch names Inductor's kernel analysis differently")
def test_inductor_finds_only_the_outputs_written():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not interpreted
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "assuming every input is mutated" not in out.stderr, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "token_quant_gelu": [["Q", "SCALE"]], "expansion": [["OUT"]], "qk_norm_rope": [["OUT"]],
        "layer_norm_fp8": [["Q", "QSCALE"]], "head_quant_fp8": [["PART"], ["OUT", "SCALE"]],
        "gated_residual_layer_norm_fp8": [["Q", "QSCALE", "X_OUT"]]}
