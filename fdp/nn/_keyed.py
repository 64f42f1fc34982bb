"""Keying a model's dropout: its ``nn.Dropout`` layers (:func:`convert_dropout`), and the code that
calls ``torch.nn.functional`` (:func:`keyed_dropout`): attention dropout in transformers.

Transformers often drop out without a ``nn.Dropout`` module: ``F.dropout`` on attention weights
(Hugging Face's eager attention), or ``F.scaled_dot_product_attention(..., dropout_p=p)`` (their
``sdpa`` attention). Inside :func:`keyed_dropout` those calls, made by the model's own code,
draw their masks from the bound :func:`fdp.random.key_context`, per example (the row's index in
the full batch), as :func:`fdp.nn.dropout` does, so data-parallel training with attention
dropout equals single-device training with the same key.

What cannot be keyed: dropout inside torch's own composite functions, which dispatch before the
mode can see their inner calls: ``nn.MultiheadAttention``'s attention dropout (inside
``F.multi_head_attention_forward``) and ``nn.TransformerEncoderLayer``/``DecoderLayer``'s
(through it). :func:`convert_dropout` with ``functional=True`` refuses such a layer with
``dropout > 0`` and says how to proceed.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fdp.nn._convert import replace_layers
from fdp.nn._dropout import Dropout, dropout

__all__ = ["KeyedForward", "convert_dropout", "keyed_dropout"]

_DROPOUTS = {F.dropout: ("input", "p", "training", "inplace"),  # training defaults to True
             torch.dropout: ("input", "p", "train")}
_SDPA = {F.scaled_dot_product_attention}


class _KeyedMode(TorchFunctionMode):
    def __init__(self, axis_name: str | None) -> None:
        super().__init__()
        self.axis_name = axis_name

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _DROPOUTS:
            return self._dropout(func, args, kwargs)
        if func in _SDPA:
            return self._attention(func, args, kwargs)
        return func(*args, **kwargs)

    def _dropout(self, func: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        bound = {**dict(zip(_DROPOUTS[func], args, strict=False)), **kwargs}
        x, p = bound["input"], float(bound.get("p", 0.5))
        if not bound.get("training", bound.get("train", True)) or p == 0.0:
            return x
        if p == 1.0:  # what torch gives; fdp.nn.dropout refuses p = 1
            return x * 0.0
        return dropout(x, p, training=True, axis_name=self.axis_name, row_dim=0)

    def _attention(self, func: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                 "enable_gqa")
        bound = {**dict(zip(names, args, strict=False)), **kwargs}
        p = float(bound.get("dropout_p", 0.0) or 0.0)
        if p == 0.0:
            return func(*args, **kwargs)
        return _attention_with_keyed_dropout(p, self.axis_name, **bound)


def _attention_with_keyed_dropout(p: float, axis_name: str | None, *, query: torch.Tensor,
                                  key: torch.Tensor, value: torch.Tensor,
                                  attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                  is_causal: bool = False, scale: float | None = None,
                                  enable_gqa: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention``'s math, with the attention weights dropped out by
    keyed per-example masks (the batch at dim 0 of the query)."""
    length, source = query.shape[-2], key.shape[-2]
    if enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * factor
    if is_causal:
        allowed = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    weights = torch.softmax(scores, dim=-1)
    weights = dropout(weights, p, training=True, axis_name=axis_name, row_dim=0)
    return weights @ value


@contextlib.contextmanager
def keyed_dropout(axis_name: str | None = None) -> Iterator[None]:
    """Makes ``torch.nn.functional.dropout`` and the dropout of
    ``F.scaled_dot_product_attention`` draw keyed, per-example masks inside the block.

    The masks come from the bound :func:`fdp.random.key_context` (each call takes its next
    key), and the examples are indexed along dim 0 of the tensor dropped out (of the query for
    attention), counted in the full batch under data parallelism. Calls with ``p == 0`` or
    ``training=False`` are left alone. :func:`fdp.nn.convert_dropout` with
    ``functional=True`` runs a model's whole forward inside it.

    Args:
        axis_name: the mesh axis whose row offset counts; ``None``: the innermost bound one.

    Example:
        >>> import fdp.random
        >>> x = torch.ones(2, 6)
        >>> k = fdp.random.key(0)
        >>> with fdp.random.key_context(k), fdp.nn.keyed_dropout():
        ...     y = torch.nn.functional.dropout(x, 0.5)
        >>> torch.equal(y, fdp.nn.dropout(x, 0.5, fdp.random.fold_in(k, 0)))
        True
    """
    with _KeyedMode(axis_name):
        yield


def convert_dropout(module: nn.Module, *, axis_name: str | None = None,
                    functional: bool = False) -> nn.Module:
    """A copy of ``module`` whose ``torch.nn.Dropout`` layers are :class:`Dropout`.

    Layers keep their ``p`` and train/eval mode (``inplace`` is dropped: fdp's dropout never
    writes to its input). Other dropout variants (``Dropout1d/2d/3d``, ``AlphaDropout``) and
    everything else are deep-copied unchanged. ``module`` is not modified.

    With ``functional=True`` the copy's forward also runs inside :func:`fdp.nn.keyed_dropout`,
    so that dropout the model's code calls as a function draws keyed masks too: ``F.dropout``
    and ``F.scaled_dot_product_attention(dropout_p=...)`` (Hugging Face transformers'
    attention). Their examples are indexed along dim 0. ``nn.MultiheadAttention`` layers with
    ``dropout > 0`` are refused then: their attention dropout runs inside torch's
    ``F.multi_head_attention_forward``, which cannot be keyed.

    Args:
        module: the model (or a single ``nn.Dropout``).
        axis_name: given to every new layer (``None``: the innermost bound axis).
        functional: also key functional and attention dropout.

    Returns:
        The converted copy.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
        >>> keyed = fdp.nn.convert_dropout(net)
        >>> type(keyed[1]).__name__, keyed[1].p, type(net[1]).__name__
        ('Dropout', 0.1, 'Dropout')
        >>> type(keyed[1]).__module__, type(net[1]).__module__
        ('fdp.nn._dropout', 'torch.nn.modules.dropout')
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_dropout: module must be a torch.nn.Module, got "
                        f"{type(module).__name__}")
    if not isinstance(functional, bool):
        raise TypeError(f"convert_dropout: functional must be a bool, got "
                        f"{type(functional).__name__}")
    if functional:
        _refuse_unkeyable(module)
    converted = _convert(copy.deepcopy(module), axis_name)
    if functional:
        converted.forward = KeyedForward(converted.forward, axis_name)
    return converted


class KeyedForward:
    """A module's forward run inside :func:`fdp.nn.keyed_dropout` (``convert_dropout(...,
    functional=True)`` puts it on the converted copy; deep copies follow their own module)."""

    def __init__(self, forward: Callable[..., Any], axis_name: str | None) -> None:
        self.forward, self.axis_name = forward, axis_name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with keyed_dropout(self.axis_name):
            return self.forward(*args, **kwargs)


def _refuse_unkeyable(module: nn.Module) -> None:
    for name, m in module.named_modules(prefix="module"):
        if isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            raise ValueError(
                f"convert_dropout: {name} is an nn.MultiheadAttention with dropout={m.dropout}; "
                f"its attention dropout runs inside torch's F.multi_head_attention_forward, "
                f"where fdp cannot key it. Set {name}.dropout = 0.0 and add an "
                f"fdp.nn.Dropout after the layer, or compute the attention with "
                f"F.scaled_dot_product_attention(dropout_p=...) in your own module (keyed "
                f"with functional=True)"
            )


def _convert(module: nn.Module, axis_name: str | None) -> nn.Module:
    return replace_layers(module, lambda m: Dropout(m.p, axis_name=axis_name).train(m.training)
                          if type(m) is nn.Dropout else None)
