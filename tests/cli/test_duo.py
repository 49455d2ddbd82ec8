"""``quantduo duo identify`` / ``duo eval`` on the tiny LM, and interrupt safety of identification."""
import argparse
import warnings

import numpy as np
import pytest
import torch

from quantduo.cli import CliError, main
from quantduo.cli import duo as commands
from quantduo.duo import demo
from quantduo.duo.data import (ReferencePasskeyTask, make_bos_sample, make_sample, reference_context_lengths,
                               reference_haystack)
from quantduo.duo.identify import IdentifyConfig, identify
from quantduo.duo.patterns import load_pattern
from quantduo.duo.score import score_heads
from quantduo.models import tiny_lm

warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


pytestmark = pytest.mark.usefixtures("single_thread")


def run_cli(argv):
    return main(argv)


def test_cli_identify_then_eval(tmp_path, capsys):
    hay = tmp_path / "hay.txt"
    hay.write_text(tiny_lm.haystack_text(5000, seed=3))
    out = tmp_path / "pattern"
    common = ["--model", str(tiny_lm.ASSET_DIR), "--haystack", str(hay), "--context-min", "200",
              "--context-max", "256", "--sink", str(tiny_lm.SINK), "--recent", str(tiny_lm.RECENT)]
    assert run_cli(["duo", "identify", *common, "--out", str(out), "--steps", "3", "--lr", "0.05"]) == 0
    p = load_pattern(out)
    assert p.shape == (4, 4) and (p.sink_size, p.recent_size) == (tiny_lm.SINK, tiny_lm.RECENT)
    assert p.gates.mean() < 0.99  # the gates moved
    assert p.extra["streaming_attn_implementation"] == "sdpa"  # a 32-token window: token level by default
    blocks = tmp_path / "pattern_blocks"
    assert run_cli(["duo", "identify", *common, "--out", str(blocks), "--steps", "1", "--block", "128"]) == 0
    assert load_pattern(blocks).extra["streaming_attn_implementation"] == "blocksparse"  # the reference's name
    plot = tmp_path / "curve.png"
    assert run_cli(["duo", "eval", *common, "--pattern", str(demo.SHIPPED_PATTERN), "-n", "3", "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "full      accuracy" in text and "streaming" in text
    assert all(f"duo@{s:.2f}" in text for s in (0.25, 0.5, 0.75))
    assert all(f"{w} window)" in text for w in ("chunk", "token")) and "answer log-prob" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_identify_by_scoring_matches_the_library_scores(tmp_path):
    """``--method score`` writes score_heads' pattern of the CLI's own passkey samples (rebuilt here from the seed:
    the same rng draws), not gate training's."""
    hay = tmp_path / "hay.txt"
    hay.write_text(tiny_lm.haystack_text(5000, seed=3))
    out = tmp_path / "scored"
    argv = ["duo", "identify", "--model", str(tiny_lm.ASSET_DIR), "--haystack", str(hay), "--context-min", "200",
            "--context-max", "256", "--sink", str(tiny_lm.SINK), "--recent", str(tiny_lm.RECENT), "--out", str(out),
            "--method", "score", "--samples", "3", "--seed", "5", "--chunk", "64"]
    assert run_cli(argv) == 0
    got = load_pattern(out)

    model = commands._load(str(tiny_lm.ASSET_DIR), "cpu", "float32")
    codec = commands._codec(str(tiny_lm.ASSET_DIR))
    ids = commands._haystack(argparse.Namespace(haystack=str(hay), model=str(tiny_lm.ASSET_DIR)), codec)
    rng = np.random.default_rng(5)
    samples = []
    for _ in range(3):
        n = int(rng.integers(200, 257))
        s = make_sample(ids, codec.encode, n, 4, rng, min_distance=tiny_lm.SINK + tiny_lm.RECENT)
        samples.append((s.input_ids[None], s.target_mask[None]))
    expected = score_heads(model, samples, tiny_lm.SINK, tiny_lm.RECENT, chunk=64)
    np.testing.assert_allclose(got.gates, expected.gates, rtol=1e-5, atol=1e-6)
    assert got.extra["identification"] == "streaming-delta score"


def test_cli_defaults_come_from_the_model(tmp_path):
    args = argparse.Namespace(context_max=None, context_min=None, sink=None, recent=None)
    config = tiny_lm.load().config.to_dict()
    commands._context_defaults(args, config)
    commands._window_defaults(args, config)
    assert (args.context_max, args.context_min) == (512, 256)  # max_position_embeddings 1024
    assert (args.sink, args.recent) == (tiny_lm.SINK, tiny_lm.RECENT)
    with pytest.raises(CliError, match="haystack"):
        commands._haystack(argparse.Namespace(haystack=None, model=str(tmp_path), seed=0, context_max=8), None)


@pytest.mark.parametrize("extra", [
    [], ["--kv-bits", "4", "--weights", "w4a16"],
    pytest.param(["--device", "cuda", "--dtype", "bfloat16", "--kv-bits", "4", "--weights", "w4a16"],
                 marks=pytest.mark.gpu)])
def test_cli_generate_answers_the_passkey(tmp_path, capsys, extra):
    """``duo generate`` on a passkey prompt (chunked prefill in 3 chunks; on CUDA, graph-captured decode steps):
    the continuation is the passkey, and the cache holds less than a full one."""
    hay = tiny_lm.haystack_ids(seed=5, n_words=5000)
    sample = make_bos_sample(hay, tiny_lm.encode, tiny_lm.BOS_ID, 400, 2, np.random.default_rng(2),
                             min_distance=80)
    prompt_len, answer = sample.questions[0]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(tiny_lm.decode(sample.input_ids[1:prompt_len]))  # the command adds <bos>
    argv = ["duo", "generate", "--model", str(tiny_lm.ASSET_DIR), "--pattern", str(demo.SHIPPED_PATTERN),
            "--prompt-file", str(prompt), "--max-new-tokens", str(len(answer)), "--chunk", "150", *extra]
    assert run_cli(argv) == 0
    text, stats = capsys.readouterr().out.strip().split("\n")[-2:]
    assert text.split() == tiny_lm.decode(answer).split()
    ratio = float(stats.split("KV cache")[1].split("(")[1].split("x")[0])
    assert ratio < (0.25 if extra else 0.7)


def test_cli_generate_rejects_bad_prompts(tmp_path, capsys):
    common = ["duo", "generate", "--model", str(tiny_lm.ASSET_DIR), "--pattern", str(demo.SHIPPED_PATTERN)]
    for extra, message in [([], "exactly one"), (["--prompt", ""], "empty"),
                           (["--prompt", "hello world"], "not in the tiny LM vocabulary")]:
        assert run_cli([*common, *extra]) == 2
        assert message in capsys.readouterr().err


def test_cli_rejects_missing_model(tmp_path, capsys):
    assert run_cli(["duo", "eval", "--model", str(tmp_path), "--pattern", str(demo.SHIPPED_PATTERN)]) == 2
    assert "not a transformers model folder" in capsys.readouterr().err


def test_interrupted_identification_returns_nothing():
    model = tiny_lm.load()
    hay = tiny_lm.haystack_ids(seed=1, n_words=5000)
    rng = np.random.default_rng(0)

    def batches(step):
        if step == 2:
            raise KeyboardInterrupt
        s = make_bos_sample(hay, tiny_lm.encode, tiny_lm.BOS_ID, 128, 2, rng, min_distance=40)
        return s.input_ids[None], s.target_mask[None]

    with pytest.raises(KeyboardInterrupt):
        identify(model, batches, IdentifyConfig(steps=5, sink=4, recent=32), progress=False)
    assert model.config._attn_implementation == "sdpa"  # model restored
    assert not hasattr(model.model.layers[0].self_attn, "duo_gate")


def test_identify_reference_data_cycles_the_reference_lengths():
    """--data reference: every pass of 20 steps uses each of the reference's 20 haystack lengths once (its shuffled
    loader), in a new order each pass, from the reference's haystack: the lengths above the constructor's cut (here
    ~1465 of the 2400 tokens kept) hold the cut haystack."""
    codec = commands.TextCodec(lambda text: [ord(c) for c in text], None, 1, None)
    args = argparse.Namespace(passkeys=1, context_min=1000, context_max=2400, seed=3)
    hay = list(range(10_000, 13_000))
    cut = len(reference_haystack(hay, codec.encode, 1, 2400, torch.Generator().manual_seed(3),
                                 ReferencePasskeyTask(num_passkeys=1)))
    assert 1000 < cut < 2400
    samples = commands._reference_samples(args, hay, codec)
    used = []
    for step in range(40):
        s = samples(step)
        assert s.input_ids.numel() % 16 == 0 and len(s.questions) == 1
        # the haystack prefix is ids 10000.. up to the cut; the padding comes from the cut haystack's end
        used.append(int(((s.input_ids >= 10_000) & (s.input_ids < 10_000 + cut - 16)).sum()))
    lengths = sorted(min(n, cut - 16) for n in reference_context_lengths(1000, 2400))
    assert sorted(used[:20]) == lengths and sorted(used[20:]) == lengths
    assert used[:20] != used[20:]
    with pytest.raises(CliError, match="haystack has 2000 tokens, need at least 2400"):
        commands._reference_samples(args, hay[:2000], codec)


def test_identify_reference_data_needs_the_words(tmp_path, capsys):
    argv = ["duo", "identify", "--model", str(tiny_lm.ASSET_DIR), "--out", str(tmp_path / "p"), "--data", "reference",
            "--context-min", "64", "--context-max", "128"]
    assert run_cli(argv) == 2
    assert "argument --data" in capsys.readouterr().err
