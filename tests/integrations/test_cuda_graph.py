"""Whole-forward CUDA graphs (quantduo.integrations.cuda_graph)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from quantduo.formats import quantizers as qz
from quantduo.integrations.cuda_graph import GraphedForward, disable_cuda_graph, enable_cuda_graph
from quantduo.svdquant import SVDQuantLinear
from quantduo.utils import relative_error


def _int4_layer(k, n, rank=32, dtype=torch.bfloat16, device="cuda", seed=0):
    """A random W4A4 INT4 SVDQuantLinear with smoothing, low-rank branch and bias."""
    g = torch.Generator().manual_seed(seed)
    m = SVDQuantLinear(k, n, rank=rank, dtype=dtype, device=device)
    with torch.no_grad():
        q, sc = qz.quantize_int4(torch.randn(n, k, generator=g).to(device), 64, dtype)
        m.qweight.copy_(qz.pack_int4(q)); m.wscales.copy_(sc)
        m.smooth_factor.copy_(torch.rand(k, generator=g) + 0.5)
        m.proj_down.copy_(torch.randn(k, rank, generator=g) * 0.1)
        m.proj_up.copy_(torch.randn(n, rank, generator=g) * 0.3)
        m.bias.copy_(torch.randn(n, generator=g))
    return m


class TwoInputs(nn.Module):
    def __init__(self, device="cpu"):
        super().__init__()
        self.lin = nn.Linear(64, 32, device=device)

    def forward(self, x, scale=None, mode="plain", return_dict=False):
        y = self.lin(x)
        if scale is not None:
            y = y * scale[:, None, None]
        y = torch.relu(y) if mode == "relu" else y
        return (y,) if not return_dict else {"sample": y}


def test_cpu_and_ungraphable_calls_run_eagerly():
    """On the CPU, with gradients, or with unhashable arguments the wrapper is the module's own forward."""
    model = enable_cuda_graph(TwoInputs())
    assert isinstance(model.forward, GraphedForward)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(model(x, torch.ones(2))[0], TwoInputs.forward(model, x, torch.ones(2))[0])
        assert model(x, mode={"unhashable": 1}) is not None
    assert model(x)[0].requires_grad  # grad enabled: eager, autograd intact
    assert not model.forward.graphs
    assert "forward" not in disable_cuda_graph(model).__dict__


def test_cpu_quantized_layers_run_eagerly():
    """Quantized layers on the CPU under the wrapper: the layer's own (reference) result, each execution."""
    layers = nn.Sequential(_int4_layer(128, 32, dtype=torch.float32, device="cpu"))
    expected = {e: layers[0].set_execution(e)(torch.ones(3, 128)) for e in ("reference", "a16", "fp8")}
    enable_cuda_graph(layers)
    with torch.no_grad():
        for execution, y in expected.items():
            layers[0].set_execution(execution)
            assert torch.equal(layers(torch.ones(3, 128)), y)
    assert not layers.forward.graphs


@pytest.mark.gpu
def test_gpu_graph_replays_track_inputs():
    """Replays equal eager calls for new input values, non-tensor arguments select their own graph, and each
    output is a fresh tensor (a later replay does not overwrite it)."""
    model = TwoInputs("cuda").requires_grad_(False)
    graphed = enable_cuda_graph(TwoInputs("cuda").requires_grad_(False))
    graphed.load_state_dict(model.state_dict())
    outs = []
    with torch.no_grad():
        for seed, mode in [(0, "plain"), (1, "plain"), (2, "relu"), (3, "plain")]:
            torch.manual_seed(seed)
            x, s = torch.randn(2, 7, 64, device="cuda"), torch.rand(2, device="cuda")
            y = graphed(x, s, mode=mode)[0]
            torch.testing.assert_close(y, model(x, s, mode=mode)[0])
            outs.append((y, model(x, s, mode=mode)[0]))
        assert len(graphed.forward.graphs) == 2
        assert all(torch.equal(y, e) for y, e in outs)
        z = graphed(torch.randn(3, 7, 64, device="cuda"), torch.rand(3, device="cuda"), return_dict=True)
        assert z["sample"].shape == (3, 7, 32) and len(graphed.forward.graphs) == 3
        enable_cuda_graph(graphed, compile=True)  # the graph wraps the compiled forward
        x, s = torch.randn(2, 7, 64, device="cuda"), torch.rand(2, device="cuda")
        torch.testing.assert_close(graphed(x, s, mode="relu")[0], model(x, s, mode="relu")[0])


@pytest.mark.gpu
def test_gpu_graph_of_fp8_layers():
    """A stack of fp8-execution layers captured and replayed gives the eager result."""
    layers = nn.Sequential(*(_int4_layer(1024, 1024, seed=i).set_execution("fp8") for i in range(3)))
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = layers(x)
        enable_cuda_graph(layers)
        layers(x)
        assert relative_error(layers(x), eager) < 1e-6


@pytest.mark.gpu
def test_gpu_compiled_fp8_layers_take_the_gluon_expansion_only_in_graphs(monkeypatch):
    """``auto``: the compiled forward called plainly expands the weights with the Triton kernel Inductor launches;
    warmed up and captured by the graph wrapper it runs the Gluon expansion (an opaque operator, called from
    Python at each warm-up and capture) and replays the eager result."""
    from quantduo.kernels import expand_w4_mma, fp8_linear
    monkeypatch.setattr(fp8_linear, "EXPANSION", "auto")
    calls = []
    gluon = expand_w4_mma.expand_w4_fp8_mma
    monkeypatch.setattr(expand_w4_mma, "expand_w4_fp8_mma", lambda *a: calls.append(1) or gluon(*a))
    layers = nn.Sequential(*(_int4_layer(1024, 1024, seed=i).set_execution("fp8") for i in range(2)))
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = layers(x)
        calls.clear()
        compiled = torch.compile(layers)
        plain = compiled(x)
        assert not calls  # Inductor launched the Triton expansion
        graphed = GraphedForward(compiled, warmup=1)
        replayed = graphed(x)
        assert len(calls) == 2 * 2  # two layers, in the warm-up and in the capture
        replayed = graphed(x)
    assert relative_error(plain, eager) < 1e-2 and relative_error(replayed, eager) < 1e-2
    torch._dynamo.reset()


def test_disabling_puts_back_a_hooked_forward():
    """diffusers' hooks (``enable_parallelism``'s context-parallel split / gather) replace ``module.forward`` by an
    instance attribute: the graphs wrap it, and disabling must restore it, not the class's bare forward."""
    module = nn.Linear(4, 4)
    hooked = lambda x: module.__class__.forward(module, x) * 2  # noqa: E731  (a hook doubling the output)
    module.forward = hooked
    x = torch.randn(3, 4)
    enable_cuda_graph(module)
    assert torch.equal(module(x), 2 * nn.functional.linear(x, module.weight, module.bias))
    disable_cuda_graph(module)
    assert module.forward is hooked
    plain = nn.Linear(4, 4)
    disable_cuda_graph(enable_cuda_graph(plain))
    assert "forward" not in plain.__dict__
