"""Two inputs (floats and token ids), a tuple output."""

import torch


class TwoInputs(torch.nn.Module):
    def __init__(self, features: int = 16, vocab: int = 100, out: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, features)
        self.proj = torch.nn.Linear(features, out)

    def forward(self, x: torch.Tensor, ids: torch.Tensor):
        h = x + self.embed(ids).mean(dim=1)
        return self.proj(h), h.norm(dim=-1)
