"""Sleeps for as many seconds as the first input value says: a model that can exceed responseTimeout."""

import time

import torch


class Slow(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delay = float(x[0, 0])
        if delay > 0:
            time.sleep(delay)
        return self.scale(x)
