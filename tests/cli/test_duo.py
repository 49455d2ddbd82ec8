"""``quantduo duo identify`` / ``duo eval`` on the tiny LM, and interrupt safety of identification."""
import argparse
import json
import re
import types
import warnings

import numpy as np
import pytest
import torch

from quantduo.cli import CliError, build_parser, main
from quantduo.cli import duo as commands
from quantduo.duo import demo
from quantduo.duo.data import ReferencePasskeyTask, make_bos_sample, make_sample, reference_haystack
from quantduo.duo.identify import IdentifyConfig, identify
from quantduo.duo.patterns import DuoPattern, load_pattern
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
    """--data reference: every pass of 50 steps uses each of the reference's 50 haystack lengths (scripts/train.sh's
    --context_lengths_num_intervals 50) once (its shuffled loader), in a new order each pass, from the reference's
    haystack: the lengths above the constructor's cut (here ~1465 of the 2400 tokens kept) hold the cut haystack."""
    codec = commands.TextCodec(lambda text: [ord(c) for c in text], None, 1, None)
    args = argparse.Namespace(passkeys=1, context_min=1000, context_max=2400, seed=3)
    hay = list(range(10_000, 13_000))
    cut = len(reference_haystack(hay, codec.encode, 1, 2400, torch.Generator().manual_seed(3),
                                 ReferencePasskeyTask(num_passkeys=1)))
    assert 1000 < cut < 2400
    samples = commands._reference_samples(args, hay, codec)
    used = []
    for step in range(100):
        s = samples(step)
        assert s.input_ids.numel() % 16 == 0 and len(s.questions) == 1
        # the haystack prefix is ids 10000.. up to the cut; the padding comes from the cut haystack's end
        used.append(int(((s.input_ids >= 10_000) & (s.input_ids < 10_000 + cut - 16)).sum()))
    lengths = sorted(min(n, cut - 16) for n in torch.linspace(1000, 2400, 50, dtype=torch.int).tolist())
    assert sorted(used[:50]) == lengths and sorted(used[50:]) == lengths
    assert used[:50] != used[50:]
    with pytest.raises(CliError, match="haystack has 2000 tokens, need at least 2400"):
        commands._reference_samples(args, hay[:2000], codec)


def test_identify_reference_data_needs_the_words(tmp_path, capsys):
    argv = ["duo", "identify", "--model", str(tiny_lm.ASSET_DIR), "--out", str(tmp_path / "p"), "--data", "reference",
            "--context-min", "64", "--context-max", "128"]
    assert run_cli(argv) == 2
    assert "argument --data" in capsys.readouterr().err


# mit-han-lab/duo-attention scripts/train.sh: --sink_size 128 --recent_size 256 (no --streaming_attn_implementation:
# utils.py's "blocksparse", 128-token blocks in duo_attn/patch/llama.py), --min_needle_depth_ratio 0.05
# --max_needle_depth_ratio 0.95 --depth_ratio_num_intervals 1000 --context_lengths_num_intervals 50; the published
# patterns' runs pass 10 passkeys (attn_patterns/*/config.json)
TRAIN_SH = dict(sink=128, recent=256, block=128, min_depth=0.05, max_depth=0.95, depths=1000, lengths=50, passkeys=10)


def identify_window(argv, max_pos):
    """(sink, recent, streaming block) that ``duo identify ARGV`` trains with on a model of ``max_pos`` positions."""
    args = build_parser().parse_args(["duo", "identify", "--model", "m", "--out", "o", *argv])
    config = {"max_position_embeddings": max_pos}
    commands._context_defaults(args, config)
    commands._window_defaults(args, config)
    return args.sink, args.recent, commands._streaming_block(args.block, args.recent)


@pytest.mark.parametrize("max_pos", [2048, 8192, 131072])
def test_reference_data_defaults_to_the_train_sh_window(max_pos, capsys):
    """--data reference: scripts/train.sh's sink 128, recent 256 and 128-token block-sparse mask whatever the model's
    positions (no longer scaled to them: 8 / 64 token-level at 2048, sink 32 at 8192); --data quantduo keeps its
    scaled defaults; explicit values win."""
    train_sh = (TRAIN_SH["sink"], TRAIN_SH["recent"], TRAIN_SH["block"])
    assert identify_window(["--data", "reference"], max_pos) == train_sh
    assert capsys.readouterr().err == ""
    assert identify_window([], max_pos) == (min(128, max_pos // 256), min(256, max_pos // 32),
                                            128 if max_pos // 32 >= 128 else None)
    assert identify_window(["--data", "reference", "--sink", "64", "--recent", "512", "--block", "0"], max_pos) == (
        64, 512, None)
    assert identify_window(["--data", "reference", "--sink", "4"], max_pos) == (4, *train_sh[1:])
    assert identify_window(["--data", "reference", "--recent", "32"], max_pos) == (train_sh[0], 32, train_sh[2])


def test_reference_data_window_falls_back_on_short_contexts(capsys):
    """A --context-max (given, or half the model's positions) not longer than train.sh's 128 + 256 tokens gets sink /
    recent of 1/128 and 1/16 of it and a token-level mask, with a one-line note; 385 tokens get train.sh's."""
    for argv, max_pos, expected in [(["--context-max", "256"], 8192, (2, 16, None)), ([], 768, (3, 24, None)),
                                    ([], 770, (128, 256, 128)), (["--context-max", "385"], 8192, (128, 256, 128))]:
        assert identify_window(["--data", "reference", *argv], max_pos) == expected
        err = capsys.readouterr().err
        if expected[0] == 128:
            assert err == ""
        else:
            assert err.count("\n") == 1 and err.startswith("note: ") and "scripts/train.sh" in err
    assert identify_window(["--data", "reference", "--context-max", "256", "--sink", "2", "--recent", "8", "--block",
                            "16"], 8192) == (2, 8, 16)
    assert capsys.readouterr().err == ""  # nothing defaulted: no note


def test_reference_data_runs_with_the_train_sh_settings(tmp_path, monkeypatch, capsys):
    """``duo identify --data reference`` on a model of 8192 positions (defaults: contexts 2048..4096) trains with
    train.sh's window and mask, and samples with its grids: each pass over 50 steps takes the 50 lengths of
    ``torch.linspace(min, max, 50, dtype=int)``, 10 needles at depths within 0.05..0.95; the pattern's config.json
    records them under the reference's names."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    config = json.loads((tiny_lm.ASSET_DIR / "config.json").read_text()) | {"max_position_embeddings": 8192}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "model.safetensors").write_bytes(b"")  # never loaded here
    hay_file = tmp_path / "hay.txt"
    hay_file.write_text(" ".join(f"w{i}" for i in range(6000)))
    vocab: dict[str, int] = {}

    def encode(text):  # a word-level tokenizer: every haystack word is its own token
        return [vocab.setdefault(t, len(vocab) + 2) for t in re.findall(r"\S+|\n", text)]

    monkeypatch.setattr(commands, "_codec", lambda model: commands.TextCodec(encode, None, 1, None))
    monkeypatch.setattr(commands, "_load", lambda *a: types.SimpleNamespace(device=torch.device("cpu")))
    tasks, batches_seen, seen = [], [], {}
    real_sample = commands.make_reference_sample

    def spy_sample(hay, enc, bos, length, gen, task):
        tasks.append((length, task))
        return real_sample(hay, enc, bos, length, gen, task)

    def fake_identify(model, batches, cfg, progress=True):
        seen["cfg"] = cfg
        batches_seen.extend(batches(step)[0][0] for step in range(100))
        return DuoPattern(np.ones((4, 4), np.float32), cfg.sink, cfg.recent, {})

    monkeypatch.setattr(commands, "make_reference_sample", spy_sample)
    monkeypatch.setattr(commands, "identify", fake_identify)
    out = tmp_path / "pattern"
    argv = ["duo", "identify", "--model", str(model_dir), "--haystack", str(hay_file), "--out", str(out), "--data",
            "reference"]
    assert run_cli(argv) == 0
    assert capsys.readouterr().err == ""
    cfg = seen["cfg"]
    assert (cfg.sink, cfg.recent, cfg.block) == (TRAIN_SH["sink"], TRAIN_SH["recent"], TRAIN_SH["block"])
    task = tasks[-1][1]
    assert (task.min_depth, task.max_depth, task.depth_intervals, task.context_intervals, task.num_passkeys) == (
        TRAIN_SH["min_depth"], TRAIN_SH["max_depth"], TRAIN_SH["depths"], TRAIN_SH["lengths"], TRAIN_SH["passkeys"])
    lengths = sorted(torch.linspace(2048, 4096, TRAIN_SH["lengths"], dtype=torch.int).tolist())
    used = [n for n, _ in tasks[-100:]]
    assert sorted(used[:50]) == lengths and sorted(used[50:]) == lengths
    hay_ids = set(encode(hay_file.read_text()))
    book_end = encode(" </book>.")[0]
    for ids in batches_seen[:10]:
        ids = ids.tolist()
        context = ids[:ids.index(book_end)]
        is_hay = [i in hay_ids for i in context]
        total = sum(is_hay)
        # the haystack tokens before each needle (a run of other tokens after the first haystack token) / all
        cuts = [sum(is_hay[:k]) for k in range(1, len(context)) if is_hay[k - 1] and not is_hay[k]]
        assert 1 <= len(cuts) <= TRAIN_SH["passkeys"]
        assert all(TRAIN_SH["min_depth"] - 0.01 <= c / total <= TRAIN_SH["max_depth"] + 0.001 for c in cuts), cuts
    written = json.loads((out / "config.json").read_text())
    assert {k: written[k] for k in ("sink_size", "recent_size", "num_passkeys", "min_needle_depth_ratio",
                                    "max_needle_depth_ratio", "depth_ratio_num_intervals",
                                    "context_lengths_num_intervals")} == dict(
        sink_size=128, recent_size=256, num_passkeys=10,
        min_needle_depth_ratio=0.05, max_needle_depth_ratio=0.95, depth_ratio_num_intervals=1000,
        context_lengths_num_intervals=50)


@pytest.mark.parametrize("flag", [[], ["--respect-sliding-window"]])
def test_respect_sliding_window_reaches_identify_and_eval(tmp_path, monkeypatch, flag):
    """--respect-sliding-window of ``duo identify`` goes into the IdentifyConfig (--method gates) and score_heads
    (--method score), that of ``duo eval`` into apply_duo; off by default."""
    seen = []
    for name in ("identify", "score_heads", "apply_duo"):
        real = getattr(commands, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            cfg = args[2] if _name == "identify" else None
            seen.append((_name, cfg.respect_sliding_window if cfg else kwargs["respect_sliding_window"]))
            return _real(*args, **kwargs)
        monkeypatch.setattr(commands, name, spy)
    common = ["--model", str(tiny_lm.ASSET_DIR), "--context-max", "256", *flag]
    assert run_cli(["duo", "identify", *common, "--out", str(tmp_path / "g"), "--steps", "1"]) == 0
    assert run_cli(["duo", "identify", *common, "--out", str(tmp_path / "s"), "--method", "score", "--samples",
                    "1"]) == 0
    assert run_cli(["duo", "eval", *common, "--pattern", str(demo.SHIPPED_PATTERN), "-n", "1", "--sparsities", "0.5",
                    "--windows", "chunk", "--plot", str(tmp_path / "p.png")]) == 0
    assert [name for name, _ in seen] == ["identify", "score_heads", "apply_duo", "apply_duo"]
    assert all(value is bool(flag) for _, value in seen)
