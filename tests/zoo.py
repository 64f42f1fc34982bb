"""A small model zoo built from torch.nn: the model families that ``torch.func.vmap`` cannot
run (recurrent nets, packed sequences, masked attention) beside ones it can, each with a
per-example loss so that data-parallel results must equal one device's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn


class Case(NamedTuple):
    name: str
    module: nn.Module
    batch: dict[str, torch.Tensor]
    forward: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]  # -> [B, ...]


class _Recurrent(nn.Module):
    def __init__(self, kind: type[nn.Module], bidirectional: bool, packed: bool) -> None:
        super().__init__()
        self.rnn = kind(3, 4, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(8 if bidirectional else 4, 2)
        self.packed = packed

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.packed:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                       enforce_sorted=False)
            out, _ = self.rnn(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True,
                                                      total_length=x.shape[1])
            mask = (torch.arange(x.shape[1]) < lengths.unsqueeze(1)).unsqueeze(-1)
            return self.head((out * mask).sum(1) / lengths.unsqueeze(1))
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class _Encoder(nn.Module):
    """A transformer encoder with a key-padding mask (data-dependent paths in torch)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.embed = nn.Linear(3, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        pad = torch.arange(x.shape[1]) >= lengths.unsqueeze(1)
        h = self.encoder(self.embed(x), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


class _Branchy(nn.Module):
    """Python control flow on tensor values, per example (a host read under vmap)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        rows = [self.a(r) if r.sum().item() > 0 else self.b(r) for r in x.mean(1)]
        return torch.stack(rows)


def _sequences(rows: int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(rows, 5, 3, generator=g, dtype=dtype),
            "lengths": torch.randint(1, 6, (rows,), generator=g),
            "y": torch.randn(rows, 2, generator=g, dtype=dtype)}


def _seq_forward(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return module(batch["x"], batch["lengths"])


SEQUENCE_MODELS: dict[str, Callable[[], nn.Module]] = {
    "lstm": lambda: _Recurrent(nn.LSTM, False, False),
    "gru-bidirectional": lambda: _Recurrent(nn.GRU, True, False),
    "rnn": lambda: _Recurrent(nn.RNN, False, False),
    "lstm-packed-bidirectional": lambda: _Recurrent(nn.LSTM, True, True),
    "masked-encoder": _Encoder,
    "branchy": _Branchy,
}


def sequence_case(name: str, rows: int = 7, seed: int = 0,
                  dtype: torch.dtype = torch.float64) -> Case:
    torch.manual_seed(seed)
    module = SEQUENCE_MODELS[name]().to(dtype)
    return Case(name, module, _sequences(rows, seed, dtype), _seq_forward)


def mse(out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (out - batch["y"]).square().mean()


def functional_loss(case: Case) -> tuple[Any, Callable[..., torch.Tensor]]:
    """``(model, loss_fn(params, batch))`` through :func:`fdp.functionalize`."""
    import fdp

    model = fdp.functionalize(case.module)

    def loss_fn(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out, _ = model.apply(params, model.buffers, batch["x"], batch["lengths"])
        return mse(out, batch)

    return model, loss_fn
