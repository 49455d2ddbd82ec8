"""The published-checkpoint rows of ``benchmarks/flux.py``: a full-size FLUX.1 file in the Nunchaku single-file layout
(the layout of ``svdq-int4_r32-flux.1-dev.safetensors``) with random quantized weights, written to a temporary file,
loaded through :func:`quantduo.integrations.published.load_published_transformer`, and run by an execution.

Variants ``nunchaku-<execution>`` (``exact``, ``a16``, ``fp8``; ``+compile`` and ``--cuda-graph`` as for the other
rows). Besides the step time the row reports ``rel_err_vs_exact``: the output error against the same loaded model
run by the ``reference`` execution (Nunchaku's exact arithmetic: shifted unsigned post-GELU layers, AWQ modulation).

Random weights: INT4 codes uniform in [-7, 7] with scales giving each layer the weight scale of the BF16 model's
linear, smoothing factors in [0.5, 1.5], rank-32 low-rank factors of a tenth of the weight scale, the BF16 model's
biases; AWQ modulation codes in [0, 14] with ``zeros = -7 * scales``. Unquantized tensors are the BF16 model's.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from quantduo.formats import nunchaku as nk
from quantduo.integrations.diffusers import enable_fusions
from quantduo.integrations.published import load_published_transformer
from quantduo.integrations.published.layouts import block_roles
from quantduo.svdquant import set_execution

RANK = 32


def _shape(model: nn.Module, scope: str, target: str) -> tuple[int, int, torch.Tensor | None, torch.Tensor]:
    """(in, out, bias, weight) of a role target (split proj_out halves: the columns of the block's proj_out)."""
    parent, _, leaf = f"{scope}{target}".rpartition(".")
    if leaf in ("out_proj", "mlp_fc2") and parent.endswith("proj_out"):
        linear, mlp = model.get_submodule(parent), model.get_submodule(scope.rstrip(".")).mlp_hidden_dim
        attn = linear.in_features - mlp
        cols = slice(0, attn) if leaf == "out_proj" else slice(attn, None)
        bias = linear.bias if leaf == "out_proj" else torch.zeros_like(linear.bias)
        return (attn if leaf == "out_proj" else mlp), linear.out_features, bias, linear.weight[:, cols]
    linear = model.get_submodule(f"{scope}{target}")
    return linear.in_features, linear.out_features, linear.bias, linear.weight


def _random_w4a4(k: int, n: int, bias: torch.Tensor, std: float, g: torch.Generator) -> dict[str, torch.Tensor]:
    bf = dict(dtype=torch.bfloat16)
    parts = nk.W4A4Parts(
        codes=torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8),
        wscales=(torch.rand(n, k // 64, generator=g) * std / 2 + std / 4).to(**bf),
        smooth=(torch.rand(k, generator=g) + 0.5).to(**bf),
        lora_down=(torch.randn(k, RANK, generator=g) / k ** 0.5).to(**bf),
        lora_up=(torch.randn(n, RANK, generator=g) * std * 0.1 * k ** 0.5 / RANK ** 0.5).to(**bf),
        bias=bias.detach().cpu().to(**bf))
    return nk.encode_w4a4(parts)


def _random_awq(k: int, n: int, bias: torch.Tensor, std: float, g: torch.Generator) -> dict[str, torch.Tensor]:
    scales = (torch.rand(n, k // 64, generator=g) * std / 2 + std / 4).to(torch.bfloat16)
    codes = torch.randint(0, 15, (n, k), generator=g, dtype=torch.uint8)
    return nk.encode_awq(nk.AwqParts(codes, scales, -7 * scales, bias.detach().cpu().to(torch.bfloat16)))


def nunchaku_tensors(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Nunchaku single file's tensors for ``model`` (a diffusers FLUX), random quantized weights (see module)."""
    g = torch.Generator().manual_seed(seed)
    tensors, owned = {}, set()
    for block_list, roles in block_roles("nunchaku").items():
        for i in range(len(getattr(model, block_list))):
            scope = f"{block_list}.{i}."
            for stored, role in roles.items():
                owned.update(f"{scope}{t}".removesuffix(".out_proj").removesuffix(".mlp_fc2") for t in role.targets)
                if role.kind == "plain":
                    tensors[f"{scope}{stored}.weight"] = model.get_submodule(f"{scope}{role.targets[0]}").weight.detach().cpu()
                    continue
                shapes = [_shape(model, scope, t) for t in role.targets]
                k, n = shapes[0][0], sum(s[1] for s in shapes)
                bias = torch.cat([s[2] for s in shapes])
                std = float(torch.cat([s[3] for s in shapes]).float().std())
                make = _random_w4a4 if role.kind == "w4a4" else _random_awq
                tensors.update({f"{scope}{stored}.{name}": t for name, t in make(k, n, bias, std, g).items()})
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] not in owned:
            tensors[key] = value.detach().cpu()
    return tensors


_LOADED: dict[int, tuple[nn.Module, torch.Tensor | None]] = {}


def loaded_checkpoint(model: nn.Module, inputs: dict) -> tuple[nn.Module, torch.Tensor]:
    """``(loaded model, its exact output)`` for ``model``, built once per benchmark run and shared by the
    ``nunchaku-*`` variants (each sets its own execution)."""
    if id(model) not in _LOADED:
        loaded = load_random_checkpoint(model, inputs["hidden_states"].device.type)
        _LOADED[id(model)] = loaded, exact_output(loaded, inputs)
    return _LOADED[id(model)]


def load_random_checkpoint(model: nn.Module, device: str) -> nn.Module:
    """Write :func:`nunchaku_tensors` to a temporary file and load it through the published-checkpoint reader."""
    config = {"_class_name": "FluxTransformer2DModel", **{k: v for k, v in model.config.items() if not k.startswith("_")}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "svdq-int4_r32-random.safetensors"
        save_file({k: v.contiguous() for k, v in nunchaku_tensors(model).items()}, str(path),
                  metadata={"config": json.dumps(config)})
        loaded, report = load_published_transformer(path, dtype=torch.bfloat16, device=device)
    print(report.summary(), flush=True)
    return loaded


def prepare(loaded: nn.Module, execution: str) -> nn.Module:
    """Run the loaded model by ``execution`` with the fused GELU / single-block paths, as ``generate`` does."""
    set_execution(loaded, execution)
    enable_fusions(loaded)
    return loaded


def exact_output(loaded: nn.Module, inputs: dict) -> torch.Tensor:
    """The loaded model's output by the ``reference`` execution (Nunchaku's arithmetic), float32."""
    set_execution(loaded, "reference")
    with torch.no_grad():
        return loaded(**inputs)[0].float()
