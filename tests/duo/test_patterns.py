"""Pattern I/O, validation, binarization and passkey data."""
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, MistralConfig

from quantduo.duo.data import PasskeyFormat, make_sample
from quantduo.duo.patterns import DuoPattern, binarize, load_pattern, save_pattern

# the reference's published patterns: in the checkout's shared/ folder, or beside the checkout
PUBLISHED = next((p for p in (Path(__file__).resolve().parents[k] / "shared" / "data" / "duo_patterns" for k in (2, 3))
                  if p.exists()), Path("shared/data/duo_patterns"))
SHAPES = {  # (layers, kv heads) of the published models
    "Llama-2-7B-32K-Instruct": (LlamaConfig, 32, 32),
    "Llama-3-8B-Instruct-Gradient-1048k": (LlamaConfig, 32, 8),
    "Llama-3-8B-Instruct-Gradient-4194k": (LlamaConfig, 32, 8),
    "Meta-Llama-3.1-8B-Instruct": (LlamaConfig, 32, 8),
    "Mistral-7B-Instruct-v0.2": (MistralConfig, 32, 8),
    "Mistral-7B-Instruct-v0.3": (MistralConfig, 32, 8),
}


@pytest.mark.skipif(not PUBLISHED.exists(), reason="published patterns not available")
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_published_patterns_load_for_their_model_shape(name):
    cls, layers, kv = SHAPES[name]
    p = load_pattern(PUBLISHED / name)
    cfg = cls(num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=kv, hidden_size=4096)
    p.validate_for(cfg)
    assert (p.sink_size, p.recent_size) == (128, 256)
    assert p.gates.min() >= 0 and p.gates.max() <= 1
    mask = p.binarize(0.5)
    assert mask.sum() == layers * kv // 2
    wrong = cls(num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=kv * 2 if kv < 32 else 8)
    with pytest.raises(ValueError, match="shape"):
        p.validate_for(wrong)


def test_roundtrip_and_atomic_write(tmp_path):
    g = np.random.default_rng(0).random((3, 4))
    save_pattern(DuoPattern(g, 4, 32, {"note": "x"}), tmp_path / "p")
    q = load_pattern(tmp_path / "p")
    np.testing.assert_array_equal(q.gates, g)  # float64, written with 18 digits
    assert (q.sink_size, q.recent_size, q.extra["note"]) == (4, 32, "x")
    assert sorted(f.name for f in (tmp_path / "p").iterdir()) == ["config.json", "full_attention_heads.tsv",
                                                                  "quantduo_manifest.json"]


def test_gates_outside_unit_interval_are_clipped_as_the_reference(tmp_path):
    """The reference saves gates as trained after the last optimizer step (published files hold e.g. -0.0014) and
    its ``load_attn_pattern`` reads them as float64 and clips to [0, 1]; the binarization then sees the clipped
    values."""
    (tmp_path / "full_attention_heads.tsv").write_text("-1.388549804687500000e-03\t1.0\n"
                                                       "5.000000000000000000e-01\t1.003906250000000000e+00\n")
    (tmp_path / "config.json").write_text('{"sink_size": 128, "recent_size": 256, "lr": 0.02}')
    p = load_pattern(tmp_path)
    assert p.gates.dtype == np.float64
    np.testing.assert_array_equal(p.gates, [[0.0, 1.0], [0.5, 1.0]])
    np.random.seed(42)  # the reference's rule on the clipped gates
    noisy = np.array([[0.0, 1.0], [0.5, 1.0]]) + np.random.uniform(0, 1e-6, (2, 2))
    np.testing.assert_array_equal(p.binarize(0.5), noisy >= np.quantile(noisy, 0.5))


@pytest.mark.parametrize("text, match", [("1\t2\n3\n", "different numbers"), ("1\tx\n", "non-numeric"),
                                         ("nan\t1\n", "NaN")])
def test_bad_files_give_clear_errors(tmp_path, text, match):
    (tmp_path / "full_attention_heads.tsv").write_text(text)
    (tmp_path / "config.json").write_text('{"sink_size": 4, "recent_size": 32}')
    with pytest.raises(ValueError, match=match):
        load_pattern(tmp_path)


def test_missing_pattern_and_bad_sparsity(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pattern(tmp_path)
    with pytest.raises(ValueError, match="sparsity"):
        binarize(np.ones((2, 2)), 1.5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_binarize_is_the_reference_quantile_rule(layers, heads, sparsity, seed):
    g = np.random.default_rng(seed).random((layers, heads)).round(1)  # rounding makes ties
    mask = binarize(g, sparsity, seed=7)
    # the reference: np.random.seed(s); gates += U(0, 1e-6); keep gates >= np.quantile(gates, sparsity)
    np.random.seed(7)
    noisy = g + np.random.uniform(0, 1e-6, g.shape)
    expected = noisy >= (np.quantile(noisy, sparsity) if 0 < sparsity < 1 else (2 if sparsity >= 1 else -1))
    np.testing.assert_array_equal(mask, expected)
    if mask.any() and (~mask).any():
        assert g[~mask].max() <= g[mask].min()


def test_binarize_breaks_ties_at_random_but_seeded():
    g = np.full((4, 8), 0.5)
    masks = [binarize(g, 0.5, seed) for seed in range(4)]
    assert all(m.sum() == 16 for m in masks)
    np.testing.assert_array_equal(binarize(g, 0.5, 0), masks[0])
    assert len({m.tobytes() for m in masks}) > 1
    assert not (masks[0].ravel()[:16].all() and not masks[0].ravel()[16:].any())  # not by position


def test_pattern_without_config_json_is_an_error(tmp_path):
    save_pattern(DuoPattern(np.ones((2, 2)), 4, 32), tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pattern(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pattern(tmp_path / "full_attention_heads.tsv")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="sink_size"):
        load_pattern(tmp_path)


def test_passkey_sample_layout():
    vocab = {w: i for i, w in enumerate(["pass", "key", "is", "."] + list("ABCDEFGHIJKLMNOP") + list("0123456789")
                                         + [f"h{i}" for i in range(10)])}
    encode = lambda t: [vocab[w] for w in t.split()]  # noqa: E731
    hay = encode(" ".join(f"h{i % 10}" for i in range(2000)))
    s = make_sample(hay, encode, 300, 3, np.random.default_rng(1), PasskeyFormat(), min_distance=80)
    assert s.input_ids.shape == s.target_mask.shape == (300,)
    first_q = s.questions[0][0] - 4  # "pass key X is"
    # supervision over every token of the question / answer section, as the reference's labels
    assert s.target_mask.sum() == 3 * 9 and s.target_mask[first_q:].all() and not s.target_mask[:first_q].any()
    assert s.answer_mask().sum() == 3 * 4
    for prompt_len, answer in s.questions:
        name = s.input_ids[prompt_len - 2]
        where = [i for i in range(first_q) if s.input_ids[i] == name]
        assert len(where) == 1 and s.input_ids[where[0] + 2:where[0] + 6].tolist() == answer
        assert first_q - (where[0] + 7) >= 80
        assert s.answer_mask()[prompt_len - 1:prompt_len + 3].all()
    with pytest.raises(ValueError, match="too short"):
        make_sample(hay, encode, 30, 3, np.random.default_rng(1))
    assert torch.is_tensor(s.input_ids)


def _write(folder: Path, tsv: str, config: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "full_attention_heads.tsv").write_text(tsv)
    (folder / "config.json").write_text(config)
    return folder


@pytest.mark.parametrize("config", ['{"sink_size": 64}', '{"recent_size": 256}', '{}'])
def test_missing_window_sizes_raise_a_key_error_as_the_reference(tmp_path, config):
    """The reference reads ``config["sink_size"]`` / ``config["recent_size"]``: a KeyError; quantduo's error is also
    a ValueError (a malformed pattern) and names the file and the keys."""
    folder = _write(tmp_path / "p", "0.5\t0.2\n", config)
    with pytest.raises(KeyError) as err:
        load_pattern(folder)
    assert isinstance(err.value, ValueError)
    assert str(err.value) == f"{folder / 'config.json'} lacks sink_size / recent_size"


def test_comment_lines_are_skipped_as_by_loadtxt(tmp_path):
    """The reference reads the TSV with ``np.loadtxt(delimiter="\\t")``: '#' lines (and blank lines) are skipped."""
    folder = _write(tmp_path / "p", "# gates of layer 0 and 1\n0.5\t0.25\n\n# layer 1\n0.125\t0.75\n",
                    '{"sink_size": 64, "recent_size": 256}')
    np.testing.assert_array_equal(load_pattern(folder).gates, [[0.5, 0.25], [0.125, 0.75]])


@pytest.mark.parametrize("tsv, shape", [("0.5\t0.2\t0.3\n", (1, 3)), ("0.5\n0.2\n", (2, 1))])
def test_one_row_or_one_column_stays_two_dimensional(tmp_path, tsv, shape):
    folder = _write(tmp_path / "p", tsv, '{"sink_size": 64, "recent_size": 256}')
    assert load_pattern(folder).shape == shape


@pytest.mark.parametrize("sizes, want", [("64, 256", (64, 256)), ("64.0, 256.0", (64, 256)), ("64, 256.5", None),
                                         ("64.5, 256", None), ('"64", 256', None), ("true, 256", None)])
def test_window_sizes_must_be_whole_numbers(tmp_path, sizes, want):
    """A window is a whole number of tokens: 64.0 reads as 64; 256.5, strings or booleans are errors (not
    truncated)."""
    sink, recent = sizes.split(", ")
    folder = _write(tmp_path / "p", "0.5\t0.2\n", f'{{"sink_size": {sink}, "recent_size": {recent}}}')
    if want is None:
        with pytest.raises(ValueError, match="whole number"):
            load_pattern(folder)
    else:
        p = load_pattern(folder)
        assert (p.sink_size, p.recent_size) == want and all(type(x) is int for x in want)


def test_unclamped_gates_are_saved_as_they_are_and_load_clipped(tmp_path):
    """Gates as trained (outside [0, 1]) are written unchanged, as the reference saves them; loading clips them
    (the reference's ``load_attn_pattern``) and the binarization is the reference's rule on the clipped gates,
    the same for the in-memory and the loaded pattern."""
    raw = np.array([[-1.388549804687500000e-03, 1.003906250000000000e+00, 0.5], [0.25, -0.5, 1.5]])
    save_pattern(DuoPattern(raw, 4, 32), tmp_path / "p")
    np.testing.assert_array_equal(np.loadtxt(tmp_path / "p" / "full_attention_heads.tsv", delimiter="\t"), raw)
    loaded = load_pattern(tmp_path / "p")
    clipped = np.array([[0.0, 1.0, 0.5], [0.25, 0.0, 1.0]])
    np.testing.assert_array_equal(loaded.gates, clipped)
    for sparsity in (0.0, 1 / 3, 0.5, 2 / 3, 1.0):
        np.random.seed(42)
        noisy = clipped + np.random.uniform(0, 1e-6, clipped.shape)
        want = noisy >= (np.quantile(noisy, sparsity) if 0 < sparsity < 1 else (2 if sparsity >= 1 else -1))
        np.testing.assert_array_equal(loaded.binarize(sparsity), want)
        np.testing.assert_array_equal(DuoPattern(raw, 4, 32).binarize(sparsity), want)
