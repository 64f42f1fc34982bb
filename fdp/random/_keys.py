"""Keys: creation, ``split`` and ``fold_in`` (derived with Philox, never with a global state)."""

from __future__ import annotations

from typing import Any

import torch

from fdp import _check
from fdp._philox import _MASK, _philox, _words

__all__ = ["fold_in", "key", "split"]

_SPLIT_TAG = (0x243F6A88, 0x85A308D3)  # key tweaks that separate derived keys from samples
_FOLD_TAG = (0x13198A2E, 0x03707344)



# --- keys -------------------------------------------------------------------------------------

def key(seed: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """A key from an integer seed: an int64 tensor of shape ``(2,)`` (two 32-bit words).

    Args:
        seed: a Python int in ``[-2**63, 2**64)`` (as ``torch.manual_seed``); it is taken
            modulo ``2**64``.
        device: where the key (and everything drawn from it) lives.

    Example:
        >>> import fdp.random
        >>> fdp.random.key(7)
        tensor([7, 0])
    """
    if not _check.is_int(seed):
        raise TypeError(f"fdp.random.key: seed must be an int, got {type(seed).__name__} "
                        f"({seed!r}); e.g. fdp.random.key(0)")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"fdp.random.key: seed={seed} is out of range [-2**63, 2**64)")
    seed %= 2**64
    return torch.tensor([seed & _MASK, seed >> 32], dtype=torch.int64, device=device)


_OUTSIDE = frozenset({"value_and_grad", "data_parallel_step"})  # callers outside fdp.random


def _key_words(k: Any, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The key's two words; ``fn`` names the caller (``fdp.random``'s own by their short name,
    others with a dot or as ``value_and_grad``/``data_parallel_step``)."""
    if fn not in _OUTSIDE and "." not in fn:
        fn = f"fdp.random.{fn}"
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"{fn}: key must be a tensor from fdp.random.key(seed), got "
                        f"{type(k).__name__}")
    if k.dtype != torch.int64 or k.shape != (2,):
        hint = " (a batch of keys: map over it with torch.func.vmap)" if k.dim() == 2 else ""
        raise ValueError(f"{fn}: key must be an int64 tensor of shape (2,) from "
                         f"fdp.random.key(seed), got {k.dtype}{list(k.shape)}{hint}")
    return k[0] & _MASK, k[1] & _MASK


def _derive(k: torch.Tensor, tag: tuple[int, int], lo: Any, hi: Any, fn: str) -> torch.Tensor:
    k0, k1 = _key_words(k, fn)
    zero = torch.zeros((), dtype=torch.int64, device=k.device)
    out = _philox((lo, hi, zero, zero), (k0 ^ tag[0], k1 ^ tag[1]))
    return torch.stack(torch.broadcast_tensors(out[0], out[1]), -1)


def split(key: torch.Tensor, n: int = 2) -> torch.Tensor:
    """``n`` new, independent keys from ``key``: a tensor of shape ``(n, 2)``.

    Example:
        >>> import fdp.random
        >>> keys = fdp.random.split(fdp.random.key(0), 3)
        >>> keys.shape, len({tuple(k.tolist()) for k in keys})
        (torch.Size([3, 2]), 3)
    """
    if not _check.is_int(n) or n < 0:
        raise ValueError(f"fdp.random.split: n must be an int >= 0, got {n!r}")
    _key_words(key, "split")
    i = torch.arange(n, dtype=torch.int64, device=key.device)
    return _derive(key, _SPLIT_TAG, i, torch.zeros_like(i), "split")


def fold_in(key: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """A new key from ``key`` and an integer (e.g. the step number): shape ``(2,)``.

    Args:
        key: the key.
        data: a Python int or an integer 0-d tensor (e.g. ``state.step``), taken modulo
            ``2**64``; different values give independent keys.

    Example:
        >>> import fdp.random
        >>> k = fdp.random.key(0)
        >>> torch.equal(fdp.random.fold_in(k, 1), fdp.random.fold_in(k, torch.tensor(1)))
        True
    """
    lo, hi = _integer_words(data, "fold_in", "data", key)
    return _derive(key, _FOLD_TAG, lo, hi, "fold_in")


def _integer_words(v: Any, fn: str, what: str, k: Any) -> tuple[torch.Tensor, torch.Tensor]:
    device = k.device if isinstance(k, torch.Tensor) else None
    if _check.is_int(v):
        if not -(2**63) <= v < 2**64:
            raise ValueError(f"fdp.random.{fn}: {what}={v} is out of range [-2**63, 2**64)")
        v %= 2**64
        return (torch.tensor(v & _MASK, device=device), torch.tensor(v >> 32, device=device))
    if isinstance(v, torch.Tensor) and not v.is_floating_point() and not v.is_complex() \
            and v.dtype != torch.bool:
        if device is not None and v.device != device:
            raise ValueError(f"fdp.random.{fn}: {what} is on {v.device} but the key is on "
                             f"{device}; move one of them")
        return _words(v.to(torch.int64))
    raise TypeError(f"fdp.random.{fn}: {what} must be an int or an integer tensor, got "
                    f"{v.dtype if isinstance(v, torch.Tensor) else type(v).__name__}")


# --- sampling ---------------------------------------------------------------------------------
