"""Samples: bits, uniform, Bernoulli and normal values as pure functions of a key and a counter."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fdp import _check
from fdp._philox import _philox, _words
from fdp.random._keys import _integer_words, _key_words

__all__ = ["bernoulli", "bits", "normal", "uniform"]

Shape = int | Sequence[int]


def _shape(shape: Any, fn: str) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) else shape
    if not isinstance(dims, (tuple, list, torch.Size)) or any(
            not _check.is_int(d) or d < 0 for d in dims):
        raise TypeError(f"fdp.random.{fn}: shape must be an int or a sequence of ints >= 0, "
                        f"got {shape!r}")
    return tuple(dims)


def _stream(k: torch.Tensor, shape: tuple[int, ...], counter: Any, per: int,
            fn: str) -> torch.Tensor:
    """``per`` 32-bit words per element: shape ``counter.shape + shape + (per,)``.

    Word ``w`` of the stream of counter ``c`` is lane ``w % 4`` of Philox of the counter
    words ``(w // 4, c)``: a prefix of a stream does not depend on how much is drawn.
    """
    k0, k1 = _key_words(k, fn)
    c_lo, c_hi = _integer_words(0 if counter is None else counter, fn, "counter", k)
    n = math.prod(shape) * per
    block = torch.arange((n + 3) // 4, dtype=torch.int64, device=k.device)
    b_lo, b_hi = _words(block)
    out = _philox((b_lo, b_hi, c_lo.unsqueeze(-1), c_hi.unsqueeze(-1)), (k0, k1))
    lead = tuple(c_lo.shape)
    lanes = torch.stack(torch.broadcast_tensors(*out), -1).flatten(-2)[..., :n]
    return lanes.reshape(*lead, *shape, per)


def bits(key: torch.Tensor, shape: Shape, *, counter: int | torch.Tensor | None = None
         ) -> torch.Tensor:
    """Uniform 32-bit words (int64 values in ``[0, 2**32)``) of shape ``counter.shape + shape``.

    Args:
        key: the key.
        shape: the shape drawn per counter value.
        counter: ``None`` (one stream), an int, or an integer tensor of stream indices: entry
            ``(i..., j...)`` of the result depends only on ``(key, counter[i...], j...)``.

    Example:
        >>> import fdp.random
        >>> k = fdp.random.key(0)
        >>> torch.equal(fdp.random.bits(k, 6)[:4], fdp.random.bits(k, 4))
        True
    """
    return _stream(key, _shape(shape, "bits"), counter, 1, "bits")[..., 0]


def _float_dtype(dtype: torch.dtype | None, fn: str) -> torch.dtype:
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"fdp.random.{fn}: dtype must be a floating-point torch.dtype, got "
                        f"{dtype!r}")
    return dtype


def _unit(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floats in ``[0, 1)`` with the dtype's full precision, exact (one or two words each)."""
    m = _digits(dtype)
    if words.shape[-1] == 1:
        return (words[..., 0] >> (32 - m)).to(dtype) * 2.0**-m
    ints = (words[..., 0] >> (64 - m)) * 2**32 + words[..., 1]  # m <= 63 bits
    return ints.to(dtype) * 2.0**-m


def _digits(dtype: torch.dtype) -> int:
    """Significand bits, the implicit one included (float32: 24, float64: 53)."""
    return round(1 - math.log2(torch.finfo(dtype).eps))


def uniform(key: torch.Tensor, shape: Shape, *, counter: int | torch.Tensor | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uniform floats in ``[0, 1)``, of shape ``counter.shape + shape``, on the key's device.

    Every value has the dtype's full precision (24 random bits for float32, 53 for float64)
    and is exact: the same on every device. ``counter`` works as for :func:`bits`.

    Example:
        >>> import fdp.random
        >>> u = fdp.random.uniform(fdp.random.key(0), (2, 3), dtype=torch.float64)
        >>> u.shape, bool(((u >= 0) & (u < 1)).all())
        (torch.Size([2, 3]), True)
    """
    dtype = _float_dtype(dtype, "uniform")
    words = _stream(key, _shape(shape, "uniform"), counter, 1 + (_digits(dtype) > 32), "uniform")
    return _unit(words, dtype)


def bernoulli(key: torch.Tensor, p: float | torch.Tensor, shape: Shape, *,
              counter: int | torch.Tensor | None = None) -> torch.Tensor:
    """Booleans that are ``True`` with probability ``p``: shape ``counter.shape + shape``.

    A value is ``bits < floor(p * 2**32)``: an exact integer comparison, so the result does
    not depend on any float dtype or device, and ``p = 0`` / ``p = 1`` give all ``False`` /
    all ``True``.

    Args:
        key: the key.
        p: a probability in ``[0, 1]``: a float, or a floating tensor that broadcasts to the
            result.
        shape: the shape drawn per counter value.
        counter: as for :func:`bits`.

    Example:
        >>> import fdp.random
        >>> keep = fdp.random.bernoulli(fdp.random.key(0), 0.75, 10_000)
        >>> keep.dtype, abs(keep.double().mean().item() - 0.75) < 0.02
        (torch.bool, True)
    """
    words = bits(key, _shape(shape, "bernoulli"), counter=counter)
    if isinstance(p, torch.Tensor) and p.is_floating_point():
        return words < (p.to(torch.float64) * 2.0**32).floor().to(torch.int64)
    if not _check.is_number(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"fdp.random.bernoulli: p must be a probability in [0, 1] (a float "
                         f"or a floating tensor), got {p!r}")
    return words < math.floor(p * 2.0**32)


def normal(key: torch.Tensor, shape: Shape, *, counter: int | torch.Tensor | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal floats (Box-Muller of two :func:`uniform` values per entry).

    The uniforms are exact everywhere; ``log``/``cos`` may round differently on CPU and CUDA
    (within a few ulp). ``counter`` works as for :func:`bits`.

    Example:
        >>> import fdp.random
        >>> z = fdp.random.normal(fdp.random.key(1), 20_000, dtype=torch.float64)
        >>> abs(z.mean().item()) < 0.05, abs(z.std().item() - 1) < 0.05
        (True, True)
    """
    dtype = _float_dtype(dtype, "normal")
    per = 1 + (_digits(dtype) > 32)
    words = _stream(key, _shape(shape, "normal"), counter, 2 * per, "normal")
    u1 = 1.0 - _unit(words[..., :per], dtype)  # in (0, 1]: log is finite
    u2 = _unit(words[..., per:], dtype)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)


# --- per-example counters ---------------------------------------------------------------------
