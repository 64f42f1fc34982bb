"""Philox-4x32-10 (Salmon et al. 2011) on int64 carriers: the hash behind :mod:`fdp.random`.

32-bit words live in int64 tensors; no operation overflows int64 (a product of a word and a
multiplier is formed as ``x * (m - 2**32)``, which fits), and every result is masked to 32 bits.
"""

from __future__ import annotations

import torch

_MASK = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 multipliers (Salmon et al. 2011)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_ROUNDS = 10
def _mulhilo(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``x * m`` for 32-bit ``x`` and ``2**31 <= m < 2**32``.

    ``x * m = p + x * 2**32`` with ``p = x * (m - 2**32)`` in ``(-2**63, 0]``: no int64
    overflow. ``p``'s low word is the product's; torch's ``>>`` is an arithmetic shift
    (floor division by ``2**32``), so the high word is ``(p >> 32) + x``, masked.
    """
    p = x * (m - 2**32)
    return ((p >> 32) + x) & _MASK, p & _MASK


def _philox(c: tuple, k: tuple) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10 of counter words ``c`` (4) under key words ``k`` (2); broadcasts."""
    c0, c1, c2, c3 = c
    k0, k1 = k
    for r in range(_ROUNDS):
        if r:
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _words(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high 32-bit words of an int64 tensor (two's complement bits)."""
    return v & _MASK, (v >> 32) & _MASK
