"""Gate training as the reference trains it (mit-han-lab/duo-attention ``train.py`` and ``patch/llama.py``), restated
here from the documented rules, independent of quantduo.duo's code:

* two-way batch: the input duplicated, rows ``[:B]`` the unchanged model (teacher), rows ``[B:]`` the gated one;
* in every layer the gated rows' attention output is ``a * full(teacher's q, k, v) + (1 - a) * streaming(own q, k,
  v)``, ``a`` the layer's gates clamped to [0, 1], repeated over each KV head's query heads;
* loss: mean over label tokens of the mean over hidden units of the squared difference of the final (normed) hidden
  states, + reg * sum |gates| / numel;
* learning-rate multiplier ``min(1, max((s + 1) / (N // 5), 0.1), max((N - s) / (N // 5), 0.1))``;
* gates are parameters in the model's dtype.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface

from quantduo.duo.identify import IdentifyConfig, distill_loss, gated_model, identify, lr_factor
from quantduo.duo.patterns import load_pattern, save_pattern

SINK, RECENT = 2, 4


def _streaming_mask(t: int) -> torch.Tensor:
    """[T, T] bool: query p sees key kp <= p with kp < SINK or p - kp < RECENT (token level), position by position."""
    m = torch.zeros(t, t, dtype=torch.bool)
    for p in range(t):
        for kp in range(p + 1):
            m[p, kp] = kp < SINK or p - kp < RECENT
    return m


def _reference_two_way(module, query, key, value, attention_mask=None, scaling=None, **kwargs):
    half, t, rep = query.shape[0] // 2, query.shape[2], query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    with torch.no_grad():
        full = F.scaled_dot_product_attention(query[:half], k[:half], v[:half], is_causal=True, scale=scaling)
    stream = F.scaled_dot_product_attention(query[half:], k[half:], v[half:], attn_mask=_streaming_mask(t),
                                            scale=scaling)
    a = module.reference_gate.clamp(0, 1).repeat_interleave(rep).view(1, -1, 1, 1)
    return torch.cat([full, a * full + (1 - a) * stream]).transpose(1, 2).contiguous(), None


AttentionInterface.register("test_reference_two_way", _reference_two_way)
AttentionMaskInterface.register("test_reference_two_way", lambda *args, **kwargs: None)


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=8, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).double().eval()


def test_distill_loss_and_gate_gradients_are_the_reference_two_way():
    """The gated half mixes the *teacher's* full attention (not its own): with gates between 0 and 1 the loss and
    every gate's gradient equal the reference's (a self-mixing model differs by ~30 % in the loss and flips signs)."""
    model = _tiny_llama()
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    target = torch.zeros(1, 24, dtype=torch.bool)
    target[:, 16:] = True
    gates = torch.tensor([[0.3, 1.0, 0.0, 0.7], [1.0, 0.2, 0.9, 0.5], [0.0, 1.0, 1.0, 0.4]], dtype=torch.double,
                         requires_grad=True)
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "test_reference_two_way"
    for layer, g in zip(reference.model.layers, gates):
        layer.self_attn.reference_gate = g
    hidden = reference.model(input_ids=torch.cat([ids, ids])).last_hidden_state
    diff = hidden[:1][target].float() - hidden[1:][target].float()
    ref_loss = diff.pow(2).mean(-1).sum() / target.sum() + 0.05 * gates.float().abs().sum() / gates.numel()
    ref_grad, = torch.autograd.grad(ref_loss, gates)

    cfg = IdentifyConfig(sink=SINK, recent=RECENT, block=None, reg_weight=0.05)
    with gated_model(model, gates, SINK, RECENT, chunk=7, block=None):
        loss = distill_loss(model, gates, (ids, target), cfg)
        grad, = torch.autograd.grad(loss, gates)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-9)
    assert (grad.sign() == ref_grad.sign()).all()


@pytest.mark.parametrize("steps", [1, 4, 5, 12, 2000])
def test_learning_rate_factor_is_the_reference_schedule(steps):
    ramp = max(1, steps // 5)
    for s in range(steps):
        expected = min(1, max((s + 1) / ramp, 0.1), max((steps - s) / ramp, 0.1))
        assert lr_factor(s, steps) == pytest.approx(expected)
    if steps == 2000:  # a fifth rising from 0.1 of the peak, a fifth falling to 0.1
        assert [lr_factor(s, steps) for s in (0, 399, 1000, 1999)] == pytest.approx([0.1, 1.0, 1.0, 0.1])


def test_identify_defaults_and_gates_in_the_model_dtype():
    """The reference's defaults (block-sparse 128-token streaming mask) and bfloat16 gates for a bfloat16 model: every
    trained gate is a bfloat16 number (float32 gates would leave values between them after AdamW steps)."""
    assert IdentifyConfig().block == 128 and IdentifyConfig().lr == 0.02 and IdentifyConfig().reg_weight == 0.05
    model = _tiny_llama().to(torch.bfloat16)
    gen = torch.Generator().manual_seed(2)

    def batches(step):
        target = torch.zeros(1, 20, dtype=torch.bool)
        target[:, 12:] = True
        return torch.randint(0, 97, (1, 20), generator=gen), target

    pattern = identify(model, batches, IdentifyConfig(steps=6, sink=SINK, recent=RECENT, block=None, lr=0.05),
                       progress=False)
    g = torch.from_numpy(pattern.gates)
    assert (g < 1).any()  # the gates moved
    torch.testing.assert_close(g, g.to(torch.bfloat16).double(), rtol=0, atol=0)
    assert pattern.extra["streaming_attn_implementation"] == "sdpa"


def test_identify_returns_the_gates_of_the_last_step_unclamped(tmp_path):
    """The reference clamps the gates to [0, 1] before each step and saves them as the last step left them: one
    AdamW step of lr 2 from gates 1 moves each gate by 2 (Adam's first step is lr * sign(gradient); the L1 term
    makes the gradient positive where the distillation term vanishes), so the saved gates are 1 - 2 = -1 or 3, and
    loading clips them to [0, 1] as the reference's loader."""
    model = _tiny_llama()
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    target = torch.zeros(1, 20, dtype=torch.bool)
    target[:, 12:] = True
    pattern = identify(model, lambda step: (ids, target),
                       IdentifyConfig(steps=1, sink=SINK, recent=RECENT, block=None, lr=2.0), progress=False)
    g = pattern.gates
    assert (np.minimum(np.abs(g + 1), np.abs(g - 3)) < 1e-4).all() and (g < 0).any()  # (Adam's eps: 1 - 2 * 0.999995)
    save_pattern(pattern, tmp_path / "p")
    np.testing.assert_array_equal(np.loadtxt(tmp_path / "p" / "full_attention_heads.tsv", delimiter="\t"),
                                  pattern.gates)
    loaded = load_pattern(tmp_path / "p")
    np.testing.assert_array_equal(loaded.gates, np.clip(pattern.gates, 0, 1))
    for sparsity in (0.25, 0.5, 0.75):
        np.testing.assert_array_equal(loaded.binarize(sparsity), pattern.binarize(sparsity))
