"""A small MLP: the example model for the archive-and-serve path."""

import torch


class MLP(torch.nn.Module):
    """in_features -> hidden -> out_features with a GELU in between."""

    def __init__(self, in_features: int = 64, hidden: int = 256, out_features: int = 16) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(in_features, hidden)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
