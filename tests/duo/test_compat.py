"""The cache argument follows the installed transformers' forward signature."""
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quantduo.duo.compat import cache_argument, cache_kwargs, set_activation_checkpointing


class _Old(nn.Module):
    def forward(self, input_ids, past_key_values=None, **kwargs):
        return input_ids


class _New(nn.Module):
    def forward(self, input_ids, cache=None, **kwargs):
        return input_ids


def test_cache_argument_by_signature():
    assert cache_argument(_Old) == "past_key_values" and cache_argument(_New) == "cache"
    sentinel = object()
    assert cache_kwargs(_Old(), sentinel) == {"past_key_values": sentinel}
    assert cache_kwargs(_New(), sentinel) == {"cache": sentinel}


class _OlderRelease(torch.nn.Module):
    """transformers before the activation_checkpointing_* names: only gradient_checkpointing_* exist."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.calls.append(("enable", gradient_checkpointing_kwargs))

    def gradient_checkpointing_disable(self):
        self.calls.append(("disable", None))


def test_activation_checkpointing_under_the_older_method_names():
    model = _OlderRelease()
    set_activation_checkpointing(model, True)
    set_activation_checkpointing(model, False)
    assert model.calls == [("enable", {"use_reentrant": False}), ("disable", None)]


def test_activation_checkpointing_under_the_current_method_names():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    if not hasattr(model, "activation_checkpointing_enable"):
        pytest.skip("installed transformers predates activation_checkpointing_enable")
    set_activation_checkpointing(model, True)
    assert model.is_activation_checkpointing
    set_activation_checkpointing(model, False)
    assert not model.is_activation_checkpointing
