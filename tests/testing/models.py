"""Models that break data-parallel equivalence, with known culprits (shared by the tests)."""

from __future__ import annotations

import torch
from torch import nn


class Encoder(nn.Module):
    def __init__(self, d: int = 4, h: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(d, h)
        self.bn = nn.BatchNorm1d(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.bn(self.fc(x)))


class BNNet(nn.Module):
    """A BatchNorm1d at ``encoder.bn``."""

    def __init__(self, d: int = 4, h: int = 5, c: int = 2) -> None:
        super().__init__()
        self.encoder = Encoder(d, h)
        self.head = nn.Linear(h, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class BatchMeanCenter(nn.Module):
    """Subtracts the batch mean: each output row depends on every row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


class CenterNet(nn.Module):
    """A BatchMeanCenter at ``center``."""

    def __init__(self, d: int = 4, h: int = 5, c: int = 2) -> None:
        super().__init__()
        self.fc = nn.Linear(d, h)
        self.center = BatchMeanCenter()
        self.head = nn.Linear(h, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.center(self.fc(x))))


class InlineCenterNet(nn.Module):
    """Mixes rows in its own forward, between ``fc1`` and ``fc2``."""

    def __init__(self, d: int = 4, h: int = 5, c: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h - h.mean(0))


class RunningMax(nn.Module):
    """Per-example output, but a buffer updated from the whole batch (a running max)."""

    def __init__(self, h: int = 5) -> None:
        super().__init__()
        self.register_buffer("peak", torch.zeros(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.peak = torch.maximum(self.peak, x.detach().amax(0))
        return x


def mse(outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
    return ((outputs - batch[1]) ** 2).mean()


def regression_batch(b: int, d: int = 4, c: int = 2, dtype: torch.dtype = torch.float64,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, dtype=dtype, generator=g),
            torch.randn(b, c, dtype=dtype, generator=g))
