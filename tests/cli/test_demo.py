"""The demo's headline numbers stay in their measured bounds."""
import pytest

from quantduo.cli import main


@pytest.fixture(scope="module")
def svdquant_summary(tmp_path_factory):
    pytest.importorskip("diffusers")
    from quantduo.demo import svdquant_demo

    out = tmp_path_factory.mktemp("demo")
    return svdquant_demo(out, "cpu"), out


def test_svdquant_digits_beat_naive(svdquant_summary):
    summary, out = svdquant_summary
    psnr = summary["psnr_db"]
    # measured on CPU: naive W4A4 29.6 dB, SVDQuant W4A4 36.2 dB
    assert psnr["SVDQuant W4A4"] > 33.0
    assert psnr["SVDQuant W4A4"] > psnr["naive W4A4"] + 4.0
    for name in ("digits_bf16_naive_svdquant.png", "svdquant_quality_report.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    for curve in summary["error_vs_rank"].values():
        errors = list(curve.values())
        assert errors[-1] < errors[0] / 4  # rank 64 vs rank 0


def test_cli_lists_demo(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--skip-duo" in capsys.readouterr().out
