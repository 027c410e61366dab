"""One input, a dict output, and a keyword input with a default."""

import torch


class DictOutput(torch.nn.Module):
    def __init__(self, features: int = 12) -> None:
        super().__init__()
        self.head = torch.nn.Linear(features, 3)

    def forward(self, x: torch.Tensor, temperature: float = 1.0):
        logits = self.head(x) / temperature
        return {"logits": logits, "probs": torch.softmax(logits, dim=-1)}
