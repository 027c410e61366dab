"""One multiply per number: a model whose compute is negligible, so a request's time is its wire format's."""

import torch


class Scale(torch.nn.Module):
    def __init__(self, features: int = 1024) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight
