"""handler.torch_threads: how many threads a worker's torch uses, read from the model-config."""

import pytest
import torch

from aitune_core.errors import ConfigError
from aitune_core.worker_threads import set_worker_threads, threads_from_config


@pytest.mark.parametrize("config, threads", [
    (None, None), ({}, None), ({"batchSize": 4}, None), ({"handler": {"other": 1}}, None),
    ({"handler": {"torch_threads": 1}}, 1), ({"handler": {"torch_threads": 16}}, 16),
])
def test_threads_from_config(config, threads):
    assert threads_from_config(config) == threads


@pytest.mark.parametrize("config, message", [
    ({"handler": {"torch_threads": 0}}, "handler.torch_threads must be a whole number of threads >= 1, got 0"),
    ({"handler": {"torch_threads": -2}}, "got -2"),
    ({"handler": {"torch_threads": 2.5}}, "got 2.5"),
    ({"handler": {"torch_threads": "2"}}, "got '2'"),
    ({"handler": {"torch_threads": True}}, "got True"),
    ({"handler": "torch_threads"}, "handler must be a mapping .* got str"),
])
def test_bad_threads_say_what_came(config, message):
    with pytest.raises(ConfigError, match=message):
        threads_from_config(config)


def test_set_worker_threads():
    before = torch.get_num_threads()
    try:
        assert set_worker_threads(1) == "1 torch threads (handler.torch_threads)"
        assert torch.get_num_threads() == 1
        assert set_worker_threads(None) == "1 torch threads (torch's default; handler.torch_threads sets it)"
    finally:
        torch.set_num_threads(before)
