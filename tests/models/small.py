"""Small models made for the tests. Each file under tests/models can be archived on its own."""

import torch


class MLP(torch.nn.Module):
    """in -> hidden -> out with a ReLU; 1024-4096-1024 is the size the README's figures use."""

    def __init__(self, in_features: int = 32, hidden: int = 64, out_features: int = 8) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(in_features, hidden)
        self.fc2 = torch.nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def seeded_mlp(in_features: int = 32, hidden: int = 64, out_features: int = 8, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(in_features, hidden, out_features).eval()
