"""context_parallel_config: the config diffusers' enable_parallelism leaves on models and processors."""
from types import SimpleNamespace

from diffusers import ContextParallelConfig

from quantduo.integrations.parallel import context_parallel_config


def test_reads_the_config_diffusers_sets():
    config = ContextParallelConfig(ulysses_degree=2)
    model = SimpleNamespace(_parallel_config=SimpleNamespace(context_parallel_config=config))
    assert context_parallel_config(model) is config


def test_none_without_parallelism():
    assert context_parallel_config(SimpleNamespace()) is None
    assert context_parallel_config(SimpleNamespace(_parallel_config=None)) is None
