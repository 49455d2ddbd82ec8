"""Test-side writer of published SVDQuant files and a plain re-statement of Nunchaku's arithmetic.

Written from the documented layouts (deepcompressor's ``NunchakuWeightPacker`` / TinyChat's ``pack_w4`` comments
and shapes) as explicit index arithmetic — deliberately not the reshape / permute formulation of
:mod:`quantduo.formats.nunchaku` — so the reader is checked against an independent encoding.

Nunchaku's semantics re-stated (float32): a W4A4 layer computes
``Q((x [+ 0.171875]) / smooth) @ (codes * wscales)^T + x @ lora_down @ lora_up^T + bias`` where ``Q`` is signed
INT4 (amax / 7 per 64 inputs) or, for post-GELU layers, unsigned INT4 (amax / 15), round-half-even; an NVFP4
layer (:class:`Nvfp4Layer`) computes ``Q4(x / smooth) @ (e2m1(codes) * wscales * wcscales * wtscale)^T + x @
lora_down @ lora_up^T + bias`` with ``Q4`` per 16 inputs: ``s = min(amax * float32(1/6), 448)``, values
``x / s`` rounded to the nearest E2M1 value (ties to the even code, saturating at 6), times ``s`` rounded to fp8
E4M3 — never shifted; an AWQ layer
computes ``x @ (codes * scales + zeros)^T + bias`` and, for the FLUX modulation, returns its outputs interleaved
over the chunks with the ``+1`` of the scale chunks already in the bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SHIFT = 0.171875
BF16 = torch.bfloat16


# ---------------------------------------------------------------------------------------------
# index arithmetic of the stored orders
# ---------------------------------------------------------------------------------------------
def _nibbles_to_bytes(flat_codes: torch.Tensor) -> torch.Tensor:
    """Flat 4-bit values (stored order) -> bytes, element 2i in the low nibble of byte i."""
    v = flat_codes.to(torch.int32) & 0xF
    return (v[0::2] | (v[1::2] << 4)).to(torch.uint8)


def mma_weight_positions(n: int, k: int) -> torch.Tensor:
    """Stored flat position of each logical weight element ``[n, k]``: rows ``n = tile*128 + pack*16 + half*8 +
    lane`` and inputs ``k = ktile*64 + khalf*32 + klane*8 + reg``, stored in the order
    ``(tile, ktile, pack, lane, klane, half, khalf, reg)``."""
    rows, cols = torch.arange(n)[:, None], torch.arange(k)[None, :]
    tile, pack, half, lane = rows // 128, rows % 128 // 16, rows % 16 // 8, rows % 8
    ktile, khalf, klane, reg = cols // 64, cols % 64 // 32, cols % 32 // 8, cols % 8
    pos = tile * (k // 64) + ktile
    for digit, size in ((pack, 8), (lane, 8), (klane, 4), (half, 2), (khalf, 2), (reg, 8)):
        pos = pos * size + digit
    return pos


def vector_positions(n: int, columns: int) -> torch.Tensor:
    """Stored flat position of each logical per-channel value ``[n, columns]`` (``columns`` groups): channel
    ``n = tile*128 + lane8*16 + pair*8 + quad*2 + elem``, stored ``(tile, column, lane8, quad, pair, elem)`` —
    the documented order 0 1 8 9 | 2 3 10 11 | ... of each 128 channels."""
    rows, cols = torch.arange(n)[:, None], torch.arange(columns)[None, :]
    tile, lane8, pair, quad, elem = rows // 128, rows % 128 // 16, rows % 16 // 8, rows % 8 // 2, rows % 2
    pos = tile * columns + cols
    for digit, size in ((lane8, 8), (quad, 4), (pair, 2), (elem, 2)):
        pos = pos * size + digit
    return pos


def lowrank_positions(rows: int, rank: int, down: bool) -> torch.Tensor:
    """Stored flat position of each element of a stored ``[rows, rank]`` low-rank factor (rows: K inputs for the
    down factor, N outputs for the up factor): 16x16 tiles ``(row // 16, col // 16)``; in a tile the MMA operand
    ``[16 n, 16 k]`` — the up factor's ``(row, rank)``, the down factor's ``(rank, row)`` (it is the transposed
    ``[r, K]`` operand) — with ``n = half*8 + lane``, ``k = khalf*8 + klane*2 + reg``, stored
    ``(lane, klane, half, khalf, reg)``."""
    r_idx, c_idx = torch.arange(rows)[:, None], torch.arange(rank)[None, :]
    pos = (r_idx // 16) * (rank // 16) + c_idx // 16
    pn, pk = (c_idx % 16, r_idx % 16) if down else (r_idx % 16, c_idx % 16)
    for digit, size in ((pn % 8, 8), (pk % 8 // 2, 4), (pn // 8, 2), (pk // 8, 2), (pk % 2, 2)):
        pos = pos * size + digit
    return pos


def micro_scale_positions(n: int, k: int) -> torch.Tensor:
    """Stored flat position of each logical NVFP4 weight scale ``[n, k / 16]``: channel ``n = tile*128 + p*32 +
    a*8 + b``, group ``c = ktile*4 + j`` (16 inputs each), stored ``(tile, ktile, b, a, p, j)`` — lane ``b*4 + a``
    holds channels ``a*8 + b + {0, 32, 64, 96}``, each with the 4 scales of 64 inputs (deepcompressor's
    ``pack_micro_scale`` comment: lane 0 -> 0 32 64 96, lane 1 -> 8 40 72 104, lane 4 -> 1 33 65 97)."""
    rows, cols = torch.arange(n)[:, None], torch.arange(k // 16)[None, :]
    tile, p, a, b = rows // 128, rows % 128 // 32, rows % 32 // 8, rows % 8
    pos = tile * (k // 64) + cols // 4
    for digit, size in ((b, 8), (a, 4), (p, 4), (cols % 4, 4)):
        pos = pos * size + digit
    return pos


def _scatter(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    out = torch.empty(values.numel(), dtype=values.dtype)
    out[positions.reshape(-1)] = values.reshape(-1)
    return out


# ---------------------------------------------------------------------------------------------
# one layer
# ---------------------------------------------------------------------------------------------
@dataclass
class W4A4Layer:
    """Logical W4A4 layer: codes int8 ``[N, K]``, wscales ``[N, K/64]``, smooth ``[K]``, lora_down ``[K, r]`` (on
    the raw input), lora_up ``[N, r]`` (``r`` may be 0: no low-rank pair in the file), bias ``[N]``; ``shifted``
    post-GELU input; ``smooth_orig`` ``[K]`` or None (= smooth): the calibration's smoothing, which the file keeps
    as a record and the kernels never read (deepcompressor's ``out_proj``: smoothing fused into the layer before,
    ``smooth`` = 1, ``smooth_orig`` the factors). N, K multiples of 128."""

    codes: torch.Tensor
    wscales: torch.Tensor
    smooth: torch.Tensor
    lora_down: torch.Tensor
    lora_up: torch.Tensor
    bias: torch.Tensor
    shifted: bool = False
    smooth_orig: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Nunchaku's output in float32."""
        xs = ((x.float() + SHIFT) if self.shifted else x.float()) / self.smooth.float()
        return self.act(xs) @ self.weight().T + (x.float() @ self.lora_down.float()) @ self.lora_up.float().T \
            + self.bias.float()

    def act(self, xs: torch.Tensor) -> torch.Tensor:
        return fake_quant(xs, unsigned=self.shifted)

    def weight(self) -> torch.Tensor:
        return self.codes.float() * self.wscales.float().repeat_interleave(64, dim=1)

    def stored_scales(self) -> dict[str, torch.Tensor]:
        n, k = self.codes.shape
        return {"wscales": _scatter(self.wscales, vector_positions(n, k // 64)).reshape(k // 64, n)}

    def stored(self, names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
        """The stored tensors (single-file names; ``names`` renames them); rank 0: no lora_down / lora_up, as
        deepcompressor writes a layer without a low-rank branch."""
        n, k = self.codes.shape
        r = self.lora_up.shape[1]
        out = {
            "qweight": _nibbles_to_bytes(_scatter(self.codes, mma_weight_positions(n, k))).view(torch.int8).reshape(n, k // 2),
            **self.stored_scales(),
            "smooth": _scatter(self.smooth, vector_positions(k, 1)),
            "smooth_orig": _scatter(self.smooth if self.smooth_orig is None else self.smooth_orig, vector_positions(k, 1)),
            "bias": _scatter(self.bias, vector_positions(n, 1)),
        }
        if r:
            out["lora_down"] = _scatter(self.lora_down, lowrank_positions(k, r, down=True)).reshape(k, r)
            out["lora_up"] = _scatter(self.lora_up, lowrank_positions(n, r, down=False)).reshape(n, r)
        return {(names or {}).get(key, key): value for key, value in out.items()}


def fake_quant(x: torch.Tensor, unsigned: bool) -> torch.Tensor:
    """Per-64 INT4 quantize-dequantize of the last dim, round-half-even: signed amax / 7 or unsigned amax / 15."""
    g = x.reshape(*x.shape[:-1], -1, 64)
    qmax = 15 if unsigned else 7
    amax = g.clamp(min=0).amax(-1, keepdim=True) if unsigned else g.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.round(g / scale).clamp(0 if unsigned else -qmax, qmax)
    return (q * scale).reshape(x.shape)


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1_value(codes: torch.Tensor) -> torch.Tensor:
    """Value of E2M1 codes (bit 3 sign, bits 0-2 index of :data:`E2M1`), float32."""
    mag = E2M1[(codes.long() & 7)]
    return torch.where(codes.long() & 8 > 0, -mag, mag)


def e2m1_nearest(y: torch.Tensor) -> torch.Tensor:
    """Code of the E2M1 value nearest to ``y`` (saturating at +-6; a tie goes to the even index, the even
    mantissa), by brute force over the 8 magnitudes."""
    mag = y.abs().clamp(max=6.0)
    dist = (mag[..., None] - E2M1).abs()
    best = dist.min(-1, keepdim=True).values
    odd_penalty = (torch.arange(8) % 2) * 0.5  # among equally near magnitudes prefer the even index
    idx = torch.where(dist == best, odd_penalty, torch.full_like(dist, 9.0)).argmin(-1)
    return (idx | ((y < 0) & (idx > 0)).long() << 3).to(torch.uint8)


def fake_quant_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """Nunchaku's NVFP4 activation quantize-dequantize of the last dim (see the module docstring)."""
    g = x.float().reshape(*x.shape[:-1], -1, 16)
    s = (g.abs().amax(-1, keepdim=True) * torch.tensor(1 / 6, dtype=torch.float32)).clamp(max=448.0)
    codes = e2m1_nearest(torch.where(s > 0, g / s, torch.zeros_like(g)))
    return (e2m1_value(codes) * s.to(torch.float8_e4m3fn).float()).reshape(x.shape)


@dataclass
class Nvfp4Layer(W4A4Layer):
    """Logical NVFP4 W4A4 layer: codes uint8 E2M1 ``[N, K]``, wscales float8_e4m3fn ``[N, K/16]``, wcscales ``[N]``
    or None, wtscale float or None (the rest as :class:`W4A4Layer`; never shifted)."""

    wcscales: torch.Tensor | None = None
    wtscale: float | None = None

    def act(self, xs: torch.Tensor) -> torch.Tensor:
        return fake_quant_nvfp4(xs)

    def weight(self) -> torch.Tensor:
        w = e2m1_value(self.codes) * self.wscales.float().repeat_interleave(16, dim=1)
        if self.wcscales is not None:
            w = w * self.wcscales.float()[:, None]
        return w * (1.0 if self.wtscale is None else self.wtscale)

    def stored_scales(self) -> dict[str, torch.Tensor]:
        n, k = self.codes.shape
        scale_bytes = _scatter(self.wscales.view(torch.uint8), micro_scale_positions(n, k))
        out = {"wscales": scale_bytes.view(torch.float8_e4m3fn).reshape(k // 16, n)}
        if self.wcscales is not None:
            out["wcscales"] = _scatter(self.wcscales, vector_positions(n, 1))
        if self.wtscale is not None:
            out["wtscale"] = torch.tensor([self.wtscale])
        return out


@dataclass
class AwqLayer:
    """Logical AWQ layer: codes uint8 ``[N, K]`` in [0, 15], scales / zeros ``[N, K/64]``, bias ``[N]``."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor

    def weight(self) -> torch.Tensor:
        rep = lambda t: t.float().repeat_interleave(64, dim=1)  # noqa: E731
        return self.codes.float() * rep(self.scales) + rep(self.zeros)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.weight().T + self.bias.float()

    def stored(self, padded_groups: int | None = None) -> dict[str, torch.Tensor]:
        """TinyChat packing: per row, 32 inputs -> 8 int16 words (word j: inputs j, j+8, j+16, j+24 at bits
        0/4/8/12); words of 4 rows interleaved per 64 inputs; int16 pairs little-endian into int32. Scale groups
        zero-padded to ``padded_groups``."""
        n, k = self.codes.shape
        words = torch.zeros(n // 4, k, dtype=torch.int32)
        rows, cols = torch.arange(n)[:, None], torch.arange(k)[None, :]
        word = cols // 32 * 8 + cols % 8  # int16 word of the row
        bit = cols % 32 // 8 * 4
        stored_col = (word // 16 * 4 + rows % 4) * 16 + word % 16
        contrib = (self.codes.to(torch.int64) << bit).to(torch.int32)
        words.index_put_((rows.expand(n, k) // 4, stored_col.expand(n, k)), contrib, accumulate=True)
        groups = padded_groups or k // 64
        pad = lambda t: torch.cat([t.T, torch.zeros(groups - k // 64, n, dtype=t.dtype)])  # noqa: E731
        return {"qweight": words.to(torch.int16).view(torch.int32), "wscales": pad(self.scales),
                "wzeros": pad(self.zeros), "bias": self.bias}


# ---------------------------------------------------------------------------------------------
# random layers with Nunchaku's calibration-time arithmetic
# ---------------------------------------------------------------------------------------------
def bf16(t: torch.Tensor) -> torch.Tensor:
    """Rounded to bfloat16, kept float32 (what a bf16 file stores, exactly)."""
    return t.to(BF16).float()


def _smoothing(k: int, g: torch.Generator, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(smooth, smooth_orig)``: random smoothing factors ``[K]``; ``fused`` (deepcompressor's ``out_proj``,
    ``smooth_fused``): the file's ``smooth`` is 1 and the factors stay in ``smooth_orig`` only — here the layer is
    quantized unsmoothed, the file being self-consistent either way (the kernels divide by ``smooth``)."""
    factors = bf16(torch.rand(k, generator=g) + 0.5)
    return (torch.ones(k), factors) if fused else (factors, factors)


def w4a4_from_weight(weight: torch.Tensor, bias: torch.Tensor | None, rank: int, g: torch.Generator,
                     shifted: bool = False, smooth_fused: bool = False) -> W4A4Layer:
    """SVDQuant a float weight ``[N, K]`` the way deepcompressor + its converter do: random smoothing
    (:func:`_smoothing`), SVD branch, INT4 residual (amax / 7), low-rank down-projection unsmoothed (``/ smooth``);
    for post-GELU layers the bias is ``b - W @ shift + lora_up @ lora_down @ shift`` (the shifted execution's
    bias)."""
    n, k = weight.shape
    smooth, smooth_orig = _smoothing(k, g, smooth_fused)
    ws = weight.float() * smooth
    u, s, vh = torch.linalg.svd(ws, full_matrices=False)
    up, down = bf16(u[:, :rank] * s[:rank]), vh[:rank]  # down [r, K] on the smoothed input
    residual = ws - up @ down
    groups = residual.reshape(n, k // 64, 64)
    wscales = bf16(groups.abs().amax(-1) / 7).clamp(min=2 ** -20)
    codes = torch.round(groups / wscales[..., None]).clamp(-8, 7).to(torch.int8).reshape(n, k)
    lora_down = bf16((down / smooth).T)  # [K, r] applied to the raw input
    b = torch.zeros(n) if bias is None else bias.float()
    if shifted:  # calibration folded -W @ shift into the bias, the converter added the branch's shift term back
        shift = torch.full((k,), SHIFT)
        b = b - weight.float() @ shift + up @ (lora_down.T @ shift)
    return W4A4Layer(codes, wscales, smooth, lora_down, up, bf16(b), shifted, smooth_orig)


def nvfp4_from_weight(weight: torch.Tensor, bias: torch.Tensor | None, rank: int, g: torch.Generator,
                      per_channel: bool = False, smooth_fused: bool = False) -> Nvfp4Layer:
    """SVDQuant a float weight ``[N, K]`` to NVFP4 as deepcompressor's converter stores it: random smoothing
    (:func:`_smoothing`), SVD branch, residual scaled by a bf16 per-tensor scale ``wtscale`` (or, ``per_channel`` — fused q/k/v — bf16
    per-row ``wcscales``) and fp8 scales per 16 (amax / 6), E2M1 codes; no shift (Nunchaku's NVFP4 has none)."""
    n, k = weight.shape
    smooth, smooth_orig = _smoothing(k, g, smooth_fused)
    ws = weight.float() * smooth
    u, s, vh = torch.linalg.svd(ws, full_matrices=False)
    up, down = bf16(u[:, :rank] * s[:rank]), vh[:rank]
    residual = ws - up @ down
    outer = bf16(residual.abs().amax(-1, keepdim=True) / (6 * 448)) if per_channel \
        else bf16(residual.abs().amax() / (6 * 448)).expand(n, 1)
    groups = (residual / outer).reshape(n, k // 16, 16)
    wscales = (groups.abs().amax(-1) / 6).clamp(min=2 ** -9).to(torch.float8_e4m3fn)
    codes = e2m1_nearest(groups / wscales.float()[..., None]).reshape(n, k)
    return Nvfp4Layer(codes, wscales, smooth, bf16((down / smooth).T), up,
                      bf16(torch.zeros(n) if bias is None else bias.float()),
                      smooth_orig=smooth_orig, wcscales=outer[:, 0] if per_channel else None,
                      wtscale=None if per_channel else float(outer[0, 0]))


def quantized_from_weight(precision: str, weight: torch.Tensor, bias: torch.Tensor | None, rank: int,
                          g: torch.Generator, shifted: bool = False, fused: bool = False,
                          smooth_fused: bool = False) -> W4A4Layer:
    """:func:`w4a4_from_weight` (``"int4"``) or :func:`nvfp4_from_weight` (``"nvfp4"``: per-channel scales for
    fused layers, never shifted)."""
    if precision == "nvfp4":
        return nvfp4_from_weight(weight, bias, rank, g, per_channel=fused, smooth_fused=smooth_fused)
    return w4a4_from_weight(weight, bias, rank, g, shifted, smooth_fused)


def awq_from_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> AwqLayer:
    """deepcompressor's W4A16 modulation quantization: signed amax / 7 per 64, stored unsigned with zero 7
    (``zeros = -7 * scales``)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // 64, 64)
    scales = bf16(groups.abs().amax(-1) / 7).clamp(min=2 ** -20)
    codes = (torch.round(groups / scales[..., None]).clamp(-7, 7) + 7).to(torch.uint8).reshape(n, k)
    return AwqLayer(codes, scales, bf16(-7 * scales), bf16(torch.zeros(n) if bias is None else bias.float()))


def interleave_modulation(layer: AwqLayer, splits: int) -> AwqLayer:
    """A diffusers-order modulation layer in Nunchaku's layout: row ``s * N/splits + i`` -> ``i * splits + s``,
    ``+1`` on the bias of chunks 1 and ``splits - 2``."""
    n = layer.codes.shape[0]
    perm = torch.arange(n).reshape(splits, n // splits).T.reshape(-1)  # new row j takes old row perm[j]
    delta = torch.zeros(splits, n // splits)
    delta[1] = delta[splits - 2] = 1
    return AwqLayer(layer.codes[perm], layer.scales[perm], layer.zeros[perm], bf16((layer.bias + delta.reshape(-1))[perm]))
