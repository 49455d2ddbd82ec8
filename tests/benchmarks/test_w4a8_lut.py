"""The CUTLASS GEMM experiments (benchmarks/w4a8_lut.py): the lookup mode's weight encoding and tables checked against
the rules of CUTLASS's mixed-input mainloop written out here, and, on a GPU with the built library, both GEMMs."""
import os

import pytest
import torch

from benchmarks import w4a8_lut
from quantduo.formats import quantizers as qz
from quantduo.kernels import w4a16_cutlass

LIB = os.environ.get(w4a16_cutlass.LIBRARY_ENV, w4a8_lut.DEFAULT_LIB)


@pytest.fixture
def lib(monkeypatch):
    """The built library (LookupGemm names it in the environment: restored, and the loader's cache cleared, after)."""
    monkeypatch.setenv(w4a16_cutlass.LIBRARY_ENV, LIB)
    yield w4a8_lut.LookupGemm(LIB)
    monkeypatch.delenv(w4a16_cutlass.LIBRARY_ENV, raising=False)
    w4a16_cutlass._library.cache_clear()


def test_unified_encoding_by_hand():
    """Positive v -> 8 - v, zero and negatives two's complement; element 2j in the low nibble of byte j."""
    q = torch.tensor([[1, 7, 0, -1, -8, 3, 5, -3]], dtype=torch.int8)
    nibbles = [7, 1, 0, 15, 8, 5, 3, 13]
    expected = [nibbles[i] | (nibbles[i + 1] << 4) for i in range(0, 8, 2)]
    assert w4a8_lut.unified_codes(q).tolist() == [expected]


def test_tables_decode_to_the_rounded_products():
    """Every code -8..7 of every row and group decodes, by the mainloop's rule (bit 3: the negative table at the low
    three bits; else the negated table, zero at index 0), to e4m3(scale * q): one rounding per weight."""
    g = w4a8_lut.GROUP
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2 * g // 16)  # [3, 2 groups]
    scales = torch.tensor([[0.013, 0.5], [1.7, 0.0031], [0.25, 31.0]])
    tables = w4a8_lut.lookup_tables(scales)
    assert tables.shape == (3, 2, 8) and tables.dtype == torch.uint8
    assert tables[1, 0, 3].item() == (1.7 * -5.0 * torch.ones(1)).to(torch.float8_e4m3fn).view(torch.uint8).item()
    decoded = w4a8_lut.decoded_weight(w4a8_lut.unified_codes(q), tables)
    exact = (scales.repeat_interleave(g, dim=1) * q.float()).to(torch.float8_e4m3fn).float()
    assert torch.equal(decoded, exact)
    plain = qz.pack_int4(q)  # the plain two's-complement encoding decodes positives wrongly
    assert not torch.equal(w4a8_lut.decoded_weight(plain, tables), exact)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_main_needs_a_gpu(capsys):
    assert w4a8_lut.main(["--shapes", "256x256"]) == 1
    assert "CUDA" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not os.path.exists(LIB), reason="libqd_w4a8_lut.so not built (scripts/build_w4a8_lut.sh)")
def test_gpu_lookup_gemm_matches_its_exact_product(lib):
    x8, codes, tables, weight = w4a8_lut.random_operands(lib, 256, 512, 1024)
    out = lib.gemm(x8, codes, tables, alpha=0.5)()
    exact = 0.5 * (x8.float() @ weight.T)
    assert float((out.float() - exact).norm() / exact.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not os.path.exists(LIB), reason="libqd_w4a8_lut.so not built (scripts/build_w4a8_lut.sh)")
@pytest.mark.parametrize("shuffled", [True, False])
@pytest.mark.parametrize("tokens,tile", [(16, 64), (200, 64), (256, 128)])
def test_gpu_w4a16_gemm_matches_its_exact_product(lib, tokens, tile, shuffled):
    x, codes, scales, weight = w4a8_lut.w4a16_operands(lib, tokens, 384, 1024, shuffled)
    out = lib.gemm_w4a16(x, codes, scales, tile, shuffled)()
    exact = x.float() @ weight.T
    assert float((out.float() - exact).norm() / exact.norm()) < 1e-2
