"""Files for aitune-archive made in the test: seeded weights and samples for the test models."""

from pathlib import Path

import torch

MODELS = Path(__file__).parent


def write_inputs(directory: Path, model, *samples) -> tuple[Path, list[Path]]:
    """Save ``model``'s state_dict and each sample; return (weights path, sample paths)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "weights.pt")
    paths = []
    for index, sample in enumerate(samples):
        paths.append(directory / f"sample{index}.pt")
        torch.save(sample, paths[-1])
    return directory / "weights.pt", paths


def mlp_inputs(directory: Path):
    from models.small import seeded_mlp

    return write_inputs(directory, seeded_mlp(), torch.randn(4, 32, generator=torch.Generator().manual_seed(1)))


def two_inputs_inputs(directory: Path):
    from models.two_inputs import TwoInputs

    torch.manual_seed(0)
    # Two sequence lengths, so dim 1 of the ids is dynamic when served.
    return write_inputs(directory, TwoInputs(), (torch.randn(2, 16), torch.randint(0, 100, (2, 5))),
                        (torch.randn(1, 16), torch.randint(0, 100, (1, 7))))


def dict_output_inputs(directory: Path):
    from models.dict_output import DictOutput

    torch.manual_seed(0)
    return write_inputs(directory, DictOutput(), ((torch.randn(3, 12),), {"temperature": 2.0}))
