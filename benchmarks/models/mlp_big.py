"""The 1024-4096-1024 MLP of the size and start-up figures (defaults, so BaseHandler can make it)."""

import torch


class BigMLP(torch.nn.Module):
    def __init__(self, in_features: int = 1024, hidden: int = 4096, out_features: int = 1024) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(in_features, hidden)
        self.fc2 = torch.nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))
