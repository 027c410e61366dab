"""A 1x1024 request answered with 64x1024 floats: what TorchServe itself costs to carry a large answer."""

import torch


class Expand(torch.nn.Module):
    def __init__(self, features: int = 1024, rows: int = 64) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, features))
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weight).repeat(self.rows, 1)
