"""The three published SVDQuant layouts: their module names, the role of each module, layout detection.

* ``"nunchaku"`` — the single file written by deepcompressor's converter and merged by Nunchaku's
  ``merge_safetensors`` (every published ``svdq-int4_r32-*.safetensors`` / ``svdq-fp4_r32-*``): fused ``qkv_proj``
  names, tensors ``qweight, wscales, bias, smooth, smooth_orig, lora_down, lora_up`` (+ ``wzeros`` for AWQ,
  ``wcscales``, ``wtscale`` for NVFP4);
* ``"nunchaku-v2"`` — the same tensors under the names Nunchaku V2 gives them in memory (``attn.to_qkv``,
  ``smooth_factor``, ``proj_down`` / ``proj_up``);
* ``"nunchaku-lite"`` — diffusers model folders whose ``config.json`` holds ``quant_method: "nunchaku_lite"``:
  diffusers module names listed as targets, tensors ``qweight, wscales, smooth_factor, proj_down, proj_up, bias``
  (+ ``wcscales, wtscale`` for NVFP4; AWQ: ``qweight, wscales, wzeros, bias``), signed activations everywhere,
  modulation rows in diffusers order.

All three load with INT4 (group 64) or NVFP4 (group 16) W4A4 layers and INT4 AWQ W4A16 layers (group 64).

A :class:`Role` says how a stored module maps onto diffusers modules (:mod:`.flux` builds them).
"""
from __future__ import annotations

from dataclasses import dataclass

from quantduo.formats.quantizers import GELU_SHIFT  # noqa: F401  (re-exported: the layouts' shift)
from quantduo.svdquant import CheckpointError

LAYOUTS = ("nunchaku", "nunchaku-v2", "nunchaku-lite")
# tensor names per layer kind, in the single file's spelling
W4A4_TENSORS = frozenset({"qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up", "wcscales",
                          "wtscale"})
AWQ_TENSORS = frozenset({"qweight", "wscales", "wzeros", "bias"})
# V2 / lite spelling -> single-file spelling
_TENSOR_RENAMES = {"smooth_factor": "smooth", "smooth_factor_orig": "smooth_orig", "proj_down": "lora_down",
                   "proj_up": "lora_up"}


@dataclass(frozen=True)
class Role:
    """How one stored module maps onto the diffusers model.

    kind: ``"w4a4"`` (SVDQuant), ``"awq"`` (W4A16 modulation) or ``"plain"`` (16-bit tensors renamed);
    targets: diffusers module names relative to the block (output rows split over them in order);
    shifted: post-GELU input, run as shifted unsigned INT4 (:data:`GELU_SHIFT`) in INT4 files (NVFP4 files run it
    signed and unshifted, as Nunchaku does);
    adanorm_splits: Nunchaku's modulation layout (rows interleaved over the ``splits`` chunks, ``+1`` folded into
    the bias of the scale chunks); 0 for diffusers order.
    """

    kind: str
    targets: tuple[str, ...]
    shifted: bool = False
    adanorm_splits: int = 0


def _w4a4(*targets: str, shifted: bool = False) -> Role:
    return Role("w4a4", targets, shifted)


_DOUBLE = {
    "qkv_proj": _w4a4("attn.to_q", "attn.to_k", "attn.to_v"),
    "qkv_proj_context": _w4a4("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "out_proj": _w4a4("attn.to_out.0"),
    "out_proj_context": _w4a4("attn.to_add_out"),
    "mlp_fc1": _w4a4("ff.net.0.proj"),
    "mlp_fc2": _w4a4("ff.net.2", shifted=True),
    "mlp_context_fc1": _w4a4("ff_context.net.0.proj"),
    "mlp_context_fc2": _w4a4("ff_context.net.2", shifted=True),
    "norm1.linear": Role("awq", ("norm1.linear",), adanorm_splits=6),
    "norm1_context.linear": Role("awq", ("norm1_context.linear",), adanorm_splits=6),
    "norm_q": Role("plain", ("attn.norm_q",)),
    "norm_k": Role("plain", ("attn.norm_k",)),
    "norm_added_q": Role("plain", ("attn.norm_added_q",)),
    "norm_added_k": Role("plain", ("attn.norm_added_k",)),
}
_SINGLE = {
    "qkv_proj": _w4a4("attn.to_q", "attn.to_k", "attn.to_v"),
    "mlp_fc1": _w4a4("proj_mlp"),
    "out_proj": _w4a4("proj_out.out_proj"),
    "mlp_fc2": _w4a4("proj_out.mlp_fc2", shifted=True),
    "norm.linear": Role("awq", ("norm.linear",), adanorm_splits=3),
    "norm_q": Role("plain", ("attn.norm_q",)),
    "norm_k": Role("plain", ("attn.norm_k",)),
}
# Nunchaku V2's renames (transformer_flux_v2.convert_flux_state_dict); unlisted names are kept
_V2_DOUBLE = {"qkv_proj": "attn.to_qkv", "qkv_proj_context": "attn.add_qkv_proj", "out_proj": "attn.to_out.0",
              "out_proj_context": "attn.to_add_out", "mlp_fc1": "ff.net.0.proj", "mlp_fc2": "ff.net.2",
              "mlp_context_fc1": "ff_context.net.0.proj", "mlp_context_fc2": "ff_context.net.2",
              "norm_q": "attn.norm_q", "norm_k": "attn.norm_k", "norm_added_q": "attn.norm_added_q",
              "norm_added_k": "attn.norm_added_k"}
_V2_SINGLE = {"qkv_proj": "attn.to_qkv", "out_proj": "attn.to_out", "norm_q": "attn.norm_q", "norm_k": "attn.norm_k"}
BLOCKS = ("transformer_blocks", "single_transformer_blocks")


def block_roles(layout: str) -> dict[str, dict[str, Role]]:
    """``{block list name: {stored module name: Role}}`` of a FLUX file in ``layout`` (``"nunchaku"`` or
    ``"nunchaku-v2"``)."""
    if layout == "nunchaku":
        return {"transformer_blocks": _DOUBLE, "single_transformer_blocks": _SINGLE}
    if layout == "nunchaku-v2":
        rename = lambda roles, table: {table.get(k, k): r for k, r in roles.items()}  # noqa: E731
        return {"transformer_blocks": rename(_DOUBLE, _V2_DOUBLE),
                "single_transformer_blocks": rename(_SINGLE, _V2_SINGLE)}
    raise CheckpointError(f"layout {layout!r} has no FLUX block table; known: {', '.join(LAYOUTS[:2])}")


def canonical_tensor(name: str) -> str:
    """A stored tensor name in the single file's spelling (``smooth_factor`` -> ``smooth``, ...)."""
    return _TENSOR_RENAMES.get(name, name)


_V1_MARKS = (".qkv_proj.", ".lora_down", ".smooth")
_V2_MARKS = (".attn.to_qkv.", ".proj_down", ".smooth_factor")


def detect_file_layout(keys) -> str:
    """``"nunchaku"`` or ``"nunchaku-v2"`` from the tensor names of a single file; :class:`CheckpointError` for
    anything else (the error lists a few keys)."""
    keys = list(keys)
    quantized = [k for k in keys if k.endswith(".qweight")]
    v2 = any(m in k for k in keys for m in _V2_MARKS)
    v1 = any(m in k and not any(x in k for x in _V2_MARKS) for k in keys for m in _V1_MARKS)
    if quantized and v1 and not v2:
        return "nunchaku"
    if quantized and v2 and not v1:
        return "nunchaku-v2"
    reason = "both Nunchaku and Nunchaku V2 names" if v1 and v2 else "no Nunchaku SVDQuant tensors"
    raise CheckpointError(f"unknown checkpoint layout ({reason}); known layouts: {', '.join(LAYOUTS)}; "
                          f"first keys: {sorted(keys)[:6]}")
