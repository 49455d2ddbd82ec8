"""The cache argument follows the installed transformers' forward signature."""
from torch import nn

from quantduo.duo.compat import cache_argument, cache_kwargs


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
