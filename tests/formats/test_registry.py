"""The registry of storage formats and executions (quantduo.formats.registry)."""
from __future__ import annotations

import pytest
import torch

from quantduo.formats import registry as reg
from quantduo.svdquant import SVDQuantLinear


def test_names_and_executions():
    """The four built-in formats in registration order; INT4 weights run every execution, NVFP4 no fp8."""
    assert reg.EXECUTIONS == ("auto", "reference", "exact", "a16", "fp8")
    assert reg.format_names()[:4] == ("int4", "nvfp4", "w4a16", "svdq-w4a16")
    expected = {"int4": ("int4", "int4", 64, True), "nvfp4": ("nvfp4", "nvfp4", 16, True),
                "w4a16": ("int4", "none", 64, False), "svdq-w4a16": ("int4", "none", 64, True)}
    for name, (weight, act, group, low_rank) in expected.items():
        fmt = reg.get_format(name)
        assert (fmt.name, fmt.weight_format, fmt.act_format, fmt.group_size, fmt.low_rank) == (name, weight, act,
                                                                                               group, low_rank)
        assert fmt.executions == reg.executions_for(weight, act)
        assert set(fmt.executions) <= set(reg.EXECUTIONS) and "auto" in fmt.executions and fmt.description
    assert reg.executions_for("int4", "uint4") == reg.EXECUTIONS
    nvfp4 = ("auto", "reference", "exact", "a16")
    assert reg.executions_for("nvfp4", "nvfp4") == reg.executions_for("int4", "nvfp4") == nvfp4
    assert reg.executions_for("nvfp4", "int4") == reg.executions_for("nvfp4", "nvfp4_nunchaku") == nvfp4
    assert reg.executions_for("int4", "nvfp4_nunchaku") == nvfp4


def test_config_fields():
    assert reg.get_format("int4").config_fields() == dict(weight_format="int4", act_format="int4",
                                                          w4a16_svdquant=False)
    assert reg.get_format("svdq-w4a16").config_fields()["w4a16_svdquant"]
    assert not reg.get_format("w4a16").config_fields()["w4a16_svdquant"]


def test_find_format():
    """By (weight packing, activation format, low-rank); shifted UINT4 (post-GELU) layers belong to W4A4 INT4."""
    assert reg.find_format("int4", "int4", True).name == "int4"
    assert reg.find_format("int4", "uint4", True).name == "int4"
    assert reg.find_format("nvfp4", "nvfp4", True).name == "nvfp4"
    assert reg.find_format("nvfp4", "nvfp4_nunchaku", True).name == "nvfp4"  # layers loaded from Nunchaku files
    assert [reg.act_family(a) for a in ("uint4", "nvfp4_nunchaku", "int4", "none")] == ["int4", "nvfp4", "int4", "none"]
    assert reg.find_format("int4", "none", False).name == "w4a16"
    assert reg.find_format("int4", "none", True).name == "svdq-w4a16"
    with pytest.raises(ValueError, match="no registered format stores nvfp4 weights with none activations with"):
        reg.find_format("nvfp4", "none", True)
    with pytest.raises(ValueError, match="without a low-rank branch"):
        reg.find_format("int4", "int4", False)


@pytest.mark.parametrize("name,n,k,rank", [("int4", 3072, 3072, 32), ("int4", 3072, 12288, 32),
                                           ("svdq-w4a16", 48, 128, 16), ("w4a16", 3072, 3072, 0),
                                           ("nvfp4", 3072, 3072, 32), ("nvfp4", 96, 64, 8)])
def test_bits_per_weight(name, n, k, rank):
    """The formula, and what an SVDQuantLinear of that format stores (16-bit scales and low-rank factors; NVFP4:
    fp8 scales, plus the float32 tensor and channel scales the layer's count leaves out)."""
    fmt = reg.get_format(name)
    bits = fmt.bits_per_weight(k, n, rank)
    scale_bits = 8 if fmt.weight_format == "nvfp4" else 16
    lowrank = 16 * rank * (n + k) / (n * k) if fmt.low_rank else 0.0
    tensor_scale = 32 * (1 + n) / (n * k) if fmt.weight_format == "nvfp4" else 0.0
    assert bits == pytest.approx(4 + scale_bits / fmt.group_size + lowrank + tensor_scale, rel=1e-12)
    layer = SVDQuantLinear(k, n, rank=rank if fmt.low_rank else 0, weight_format=fmt.weight_format,
                           act_format=fmt.act_format, group_size=fmt.group_size, dtype=torch.bfloat16, device="meta")
    assert layer.storage_bits_per_weight() + tensor_scale == pytest.approx(bits, rel=1e-12)
    if fmt.low_rank:
        assert fmt.bits_per_weight(k, n, rank, lowrank_bits=8) < bits
    if name == "int4" and (n, k) == (3072, 3072):
        assert bits == pytest.approx(4.25 + 1 / 3)


def test_errors():
    with pytest.raises(ValueError, match="unknown storage format 'int3'; known formats: int4, nvfp4, w4a16"):
        reg.get_format("int3")
    with pytest.raises(ValueError, match="unknown weight format 'int8'"):
        reg.executions_for("int8", "none")
    with pytest.raises(ValueError, match="execution 'fp8' cannot run nvfp4 weights with nvfp4 activations; "
                                         "choose one of auto, reference, exact"):
        reg.check_execution("fp8", "nvfp4", "nvfp4")
    with pytest.raises(ValueError, match="execution 'w4a8'"):
        reg.check_execution("w4a8")
    assert reg.check_execution("a16", "int4", "uint4") == "a16"
    assert reg.check_execution("auto", "nvfp4", "nvfp4") == "auto"
    fmt = reg.get_format("int4")
    with pytest.raises(ValueError, match="'int4' is already registered"):
        reg.register_format(fmt)
    before = reg.format_names()
    with pytest.raises(ValueError, match=r"names unknown executions \['w4a8'\]"):
        reg.register_format(reg.StorageFormat("test-w4a8", "int4", "int8", 64, True, ("auto", "w4a8"), "test"))
    assert reg.format_names() == before


def test_register_format():
    """A registered format is found by name and by its fields (registration order decides ties)."""
    fmt = reg.StorageFormat("test-int4-g128", "int4", "int4", 128, False, ("auto", "reference"), "test")
    try:
        assert reg.register_format(fmt) is fmt
        assert reg.get_format("test-int4-g128") is fmt and reg.format_names()[-1] == "test-int4-g128"
        assert reg.find_format("int4", "int4", False) is fmt
        assert reg.find_format("int4", "int4", True).name == "int4"
    finally:
        reg._REGISTRY.pop("test-int4-g128", None)
    assert "test-int4-g128" not in reg.format_names()


def test_frozen():
    with pytest.raises(AttributeError):
        reg.get_format("int4").group_size = 128
