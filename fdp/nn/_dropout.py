"""Dropout from explicit keys: the same mask per example on one device and under DP.

The mask of row ``i`` is ``fdp.random.bernoulli(key, 1 - p, row_shape, counter=g)`` where
``g`` is the row's index in the full batch (:func:`fdp.random.row_index`), so a data-parallel
run draws exactly the masks of the single-device run, whatever the backend or the split.
"""

from __future__ import annotations

import torch
from torch import nn

from fdp import _check
from fdp import random as _random

__all__ = ["Dropout", "dropout"]


def _check_p(p: object, fn: str) -> float:
    if not _check.is_number(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"{fn}: p must be a probability in [0, 1), got {p!r} (p = 1 would "
                         f"drop everything; use a smaller p or remove the layer)")
    return float(p)


def dropout(
    x: torch.Tensor,
    p: float,
    key: torch.Tensor | None = None,
    *,
    training: bool = True,
    axis_name: str | None = None,
    row_dim: int = 0,
) -> torch.Tensor:
    """Zeroes each entry with probability ``p`` and scales the rest by ``1 / (1 - p)``.

    As ``torch.nn.functional.dropout``, but the mask is a pure function of ``key``, the row's
    index in the full batch and the entry's position in its row. Inside :func:`fdp.pmap` or
    :func:`fdp.value_and_grad` the row index includes the replica's offset
    (:func:`fdp.random.row_index`), so each example gets the same mask as in a single-device
    run with the same key. ``x`` is never modified.

    Args:
        x: the input; dim ``row_dim`` holds the examples.
        p: the probability to drop an entry, in ``[0, 1)``.
        key: the key; ``None`` takes the next key of the bound
            :func:`fdp.random.key_context`.
        training: apply dropout; ``False`` returns ``x``.
        axis_name: the mesh axis whose row offset counts; ``None``: the innermost bound one.
        row_dim: the dimension of ``x`` that indexes examples.

    Example:
        >>> import fdp.random
        >>> x = torch.ones(4, 6)
        >>> y = fdp.nn.dropout(x, 0.5, fdp.random.key(0))
        >>> sorted(set(y.flatten().tolist()))
        [0.0, 2.0]
        >>> mesh = fdp.Mesh(2)  # each row keeps its mask under DP
        >>> rows = fdp.pmap(lambda s: fdp.nn.dropout(s, 0.5, fdp.random.key(0)), mesh)(
        ...     fdp.scatter(x, mesh))
        >>> torch.equal(fdp.gather(rows, mesh), y)
        True
    """
    p = _check_p(p, "fdp.nn.dropout")
    if not isinstance(x, torch.Tensor) or not (x.is_floating_point() or x.is_complex()):
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"fdp.nn.dropout: x must be a floating-point tensor, got {got}")
    if not training or p == 0.0:
        return x
    if x.dim() == 0 or not -x.dim() <= row_dim < x.dim():
        raise ValueError(f"fdp.nn.dropout: row_dim={row_dim} is not a dim of x with shape "
                         f"{tuple(x.shape)}; x needs a dim that indexes examples")
    if key is None:
        key = _random.next_key("fdp.nn.dropout")
    d = row_dim % x.dim()
    row_shape = x.shape[:d] + x.shape[d + 1:]
    rows = _random.row_index(x.shape[d], axis_name, device=x.device)
    keep = _random.bernoulli(key.to(x.device), 1.0 - p, row_shape, counter=rows)
    return x * (keep.movedim(0, d).to(x.dtype) / (1.0 - p))


class Dropout(nn.Module):
    """``torch.nn.Dropout`` with keyed masks: equal under data parallelism and on one device.

    In training mode each call takes the next key of the bound :func:`fdp.random.key_context`
    (``fold_in(key, i)`` for the ``i``-th random call of the forward), and applies
    :func:`dropout`. In eval mode (or with ``p = 0``) it returns its input and needs no key.

    Args:
        p: the probability to drop an entry, in ``[0, 1)``.
        axis_name: the mesh axis whose row offset counts; ``None``: the innermost bound one.
        row_dim: the dimension of the input that indexes examples.

    Example:
        >>> import fdp.random
        >>> layer = fdp.nn.Dropout(0.25)
        >>> with fdp.random.key_context(fdp.random.key(0)):
        ...     y = layer(torch.ones(2, 8))
        >>> torch.equal(y, fdp.nn.dropout(torch.ones(2, 8), 0.25,
        ...                               fdp.random.fold_in(fdp.random.key(0), 0)))
        True
    """

    def __init__(self, p: float = 0.5, *, axis_name: str | None = None,
                 row_dim: int = 0) -> None:
        super().__init__()
        self.p = _check_p(p, "fdp.nn.Dropout")
        if axis_name is not None and (not isinstance(axis_name, str) or not axis_name):
            raise TypeError(f"fdp.nn.Dropout: axis_name must be None or a non-empty str, got "
                            f"{axis_name!r}")
        if not _check.is_int(row_dim):
            raise TypeError(f"fdp.nn.Dropout: row_dim must be an int, got {row_dim!r}")
        self.axis_name = axis_name
        self.row_dim = row_dim

    def extra_repr(self) -> str:
        extra = f", axis_name={self.axis_name!r}" if self.axis_name is not None else ""
        return f"p={self.p}{extra}" + (f", row_dim={self.row_dim}" if self.row_dim else "")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Applies :func:`dropout` with the context's next key (training mode only)."""
        if not self.training or self.p == 0.0:
            return input
        key = _random.next_key("fdp.nn.Dropout")
        return dropout(input, self.p, key, axis_name=self.axis_name, row_dim=self.row_dim)
