"""Small models for property tests: an MLP, a CNN and a model with keyword arguments.

Every model is built from a seed (torch's global RNG is left as it was), so a failing
hypothesis example reproduces exactly and shrinks to small sizes. Optional BatchNorm and
Dropout layers sit at fixed qualified names (``"body.bn"``, ``"body.drop"``), so diagnostics
are predictable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from fdp._compat import BatchNormBase
from fdp.testing._spec import Args

__all__ = ["MLP", "KwargsNet", "ModelCase", "SmallCNN", "build_case"]


def _body(layers: list[tuple[str, nn.Module]]) -> nn.Sequential:
    body = nn.Sequential()
    for name, layer in layers:
        body.add_module(name, layer)
    return body


def _extras(width: int, batchnorm: type[nn.Module] | None,
            dropout: float) -> list[tuple[str, nn.Module]]:
    extras: list[tuple[str, nn.Module]] = []
    if batchnorm is not None:
        extras.append(("bn", batchnorm(width)))
    if dropout > 0:
        extras.append(("drop", nn.Dropout(dropout)))
    return extras


class MLP(nn.Module):
    """``x [B, d_in] -> [B, d_out]``: Linear, optional BatchNorm1d, Tanh, optional Dropout, Linear.

    Submodules: ``body.fc``, ``body.bn`` (with ``batchnorm``), ``body.act``, ``body.drop``
    (with ``dropout > 0``) and ``head``.
    """

    def __init__(self, d_in: int = 4, hidden: int = 5, d_out: int = 3, *,
                 batchnorm: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[tuple[str, nn.Module]] = [("fc", nn.Linear(d_in, hidden))]
        layers += _extras(hidden, nn.BatchNorm1d if batchnorm else None, 0.0)
        layers += [("act", nn.Tanh()), *_extras(hidden, None, dropout)]
        self.body = _body(layers)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    """``x [B, c_in, size, size] -> [B, d_out]`` (``size`` even): conv, optional BatchNorm2d, ReLU,
    optional Dropout, 2x2 average pooling, flatten, Linear.

    Submodules: ``body.conv``, ``body.bn``, ``body.act``, ``body.drop``, ``body.pool``,
    ``body.flat`` and ``head``.
    """

    def __init__(self, c_in: int = 1, channels: int = 2, size: int = 4, d_out: int = 3, *,
                 batchnorm: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[tuple[str, nn.Module]] = [("conv", nn.Conv2d(c_in, channels, 3, padding=1))]
        layers += _extras(channels, nn.BatchNorm2d if batchnorm else None, 0.0)
        layers += [("act", nn.ReLU()), *_extras(channels, None, dropout),
                   ("pool", nn.AvgPool2d(2)), ("flat", nn.Flatten())]
        self.body = _body(layers)
        self.head = nn.Linear(channels * (size // 2) ** 2, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class KwargsNet(MLP):
    """``forward(inputs, *, scale=1.0, mask=None) -> [B, d_out]`` with a nested input.

    ``inputs`` is ``{"x": [B, d_in], "aux": ([B, hidden],)}``; ``mask`` ``[B]`` multiplies the
    hidden rows. Submodules: ``body.fc``, ``body.bn``, ``body.act``, ``body.drop``, ``head``.
    """

    def forward(  # type: ignore[override]  # a nested input instead of MLP's tensor
            self, inputs: dict[str, Any], *, scale: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(inputs["x"] * scale)
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.head(h + inputs["aux"][0])


class ModelCase(NamedTuple):
    """Everything :func:`fdp.testing.assert_dp_equivalent` needs for one drawn model.

    Call ``assert_dp_equivalent(case.module, case.loss_fn, case.batch, inputs=case.inputs)``.

    Attributes:
        module: the model (train mode unless drawn with ``training=False``).
        batch: a batch for it (a tuple ``(x, y)`` or a dict with ``"x"``/``"y"``).
        loss_fn: ``loss_fn(outputs, batch) -> scalar``, a mean over the examples.
        inputs: ``inputs(batch)``: what the model is called with (see ``Args``).
        kind: ``"mlp"``, ``"cnn"`` or ``"kwargs"``.
    """

    module: nn.Module
    batch: Any
    loss_fn: Callable[[Any, Any], torch.Tensor]
    inputs: Callable[[Any], Any]
    kind: str


class CaseSpec(NamedTuple):
    """The drawn choices a :class:`ModelCase` is built from (all small ints, so they shrink)."""

    kind: str
    batch_size: int
    seed: int
    hidden: int
    dtype: torch.dtype
    batchnorm: bool
    dropout: float
    training: bool
    loss: str  # "mse" or "cross_entropy"
    container: str  # "tuple" or "dict" (mlp/cnn)


def build_case(spec: CaseSpec) -> ModelCase:
    """Builds the module and batch of ``spec`` deterministically from ``spec.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        module, x = _module_and_input(spec)
        _randomize_running_stats(module)
        d_out = 3
        y = (torch.randint(0, d_out, (spec.batch_size,)) if spec.loss == "cross_entropy"
             else torch.randn(spec.batch_size, d_out, dtype=spec.dtype))
    module.train(spec.training)
    loss_fn = _cross_entropy if spec.loss == "cross_entropy" else _mse
    if spec.kind == "kwargs":
        nested = {"x": x["x"], "aux": x["aux"][0], "mask": x["mask"], "y": y}

        def inputs(b: Any) -> Args:
            return Args({"x": b["x"], "aux": (b["aux"],)}, scale=0.5, mask=b["mask"])

        return ModelCase(module, nested, loss_fn, inputs, spec.kind)
    batch = (x, y) if spec.container == "tuple" else {"x": x, "y": y}
    return ModelCase(module, batch, loss_fn, _default_inputs, spec.kind)


def _module_and_input(spec: CaseSpec) -> tuple[nn.Module, Any]:
    b, dt = spec.batch_size, spec.dtype
    bn, p = spec.batchnorm, spec.dropout
    if spec.kind == "mlp":
        return MLP(4, spec.hidden, 3, batchnorm=bn, dropout=p).to(dt), torch.randn(b, 4, dtype=dt)
    if spec.kind == "cnn":
        return (SmallCNN(1, spec.hidden, 4, 3, batchnorm=bn, dropout=p).to(dt),
                torch.randn(b, 1, 4, 4, dtype=dt))
    module = KwargsNet(4, spec.hidden, 3, batchnorm=bn, dropout=p).to(dt)
    x = {"x": torch.randn(b, 4, dtype=dt), "aux": (torch.randn(b, spec.hidden, dtype=dt),),
         "mask": (torch.rand(b, dtype=dt) > 0.3).to(dt)}
    return module, x


def _randomize_running_stats(module: nn.Module) -> None:
    """Non-trivial running statistics, so eval-mode BatchNorm is not the identity."""
    for layer in module.modules():
        if isinstance(layer, BatchNormBase) and layer.running_mean is not None \
                and layer.running_var is not None:
            with torch.no_grad():
                layer.running_mean.normal_()
                layer.running_var.uniform_(0.5, 2.0)


def _default_inputs(batch: Any) -> Any:
    return batch[0] if isinstance(batch, tuple) else batch["x"]


def _mse(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
    y = batch[1] if isinstance(batch, tuple) else batch["y"]
    return ((outputs - y) ** 2).mean()


def _cross_entropy(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
    y = batch[1] if isinstance(batch, tuple) else batch["y"]
    return nn.functional.cross_entropy(outputs, y)
