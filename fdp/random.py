"""``fdp.random``: explicit, counter-based random numbers (JAX-style keys).

A *key* is a small int64 tensor (two 32-bit words). Random values are a pure function of the
key and a *counter*: :func:`uniform`, :func:`bernoulli` and :func:`normal` hash them with
Philox-4x32-10 (the generator behind torch's and cuRAND's CUDA RNG), written with integer
tensor ops only. So draws do not depend on a global generator, a device, a backend or how a
batch is split: they are identical on CPU and CUDA, inside ``torch.func.vmap`` (a batched key
or counter included) and under ``torch.compile``.

For per-example randomness (dropout) the counter is the example's row in the *full* batch
(:func:`row_index`), so every replica of a data-parallel run draws exactly what a
single-device run draws for the same example. Layers find the step's key through
:func:`key_context`; see ``docs/randomness.md``.

32-bit words live in int64 carriers; no operation overflows int64 (a product of a word and a
multiplier is formed as ``x * (m - 2**32)``, which fits), and every result is masked to 32 bits.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from fdp import _check
from fdp._philox import _MASK, _philox, _words
from fdp.backends._frame import bound_frames, lookup

__all__ = ["bernoulli", "bits", "fold_in", "key", "key_context", "next_key", "normal",
           "row_index", "split", "uniform", "with_key"]

_SPLIT_TAG = (0x243F6A88, 0x85A308D3)  # key tweaks that separate derived keys from samples
_FOLD_TAG = (0x13198A2E, 0x03707344)

Shape = int | Sequence[int]


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

def row_index(rows: int, axis_name: str | None = None, *,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Each local row's index in the full batch: the counter for per-example randomness.

    Inside :func:`fdp.pmap` / :func:`fdp.value_and_grad` over a batch that fdp split, this is
    ``row_offset(axis) + arange(rows)``, so it follows the example, not the replica. When the
    axis carries no offset (a mapped input that ``fdp.scatter`` did not split), replica ``r``
    is taken to hold rows ``r * rows ...`` (a contiguous even split). Outside any pmap it is
    ``arange(rows)``. A :func:`key_context` with ``row_offset`` (a microbatch's first row)
    adds it.

    Args:
        rows: the number of local rows.
        axis_name: the mesh axis; ``None`` means the innermost bound one (if any).
        device: where the result lives.

    Example:
        >>> import fdp.random
        >>> fdp.pmap(lambda x: fdp.random.row_index(2), fdp.Mesh(2))(torch.zeros(2, 2))
        tensor([[0, 1],
                [2, 3]])
    """
    if not _check.is_int(rows) or rows < 0:
        raise ValueError(f"fdp.random.row_index: rows must be an int >= 0, got {rows!r}")
    frames = bound_frames()
    local = torch.arange(rows, dtype=torch.int64, device=device)
    frame = None
    if axis_name is not None and frames:
        frame = lookup(axis_name, "fdp.random.row_index")
    elif frames:
        frame = frames[-1]
    base = _context_offset()
    if frame is not None:
        start = frame.offset if frame.offset is not None else frame.index * rows
        local = local + start.to(local.device)
    return local if isinstance(base, int) and base == 0 else local + base


# --- the key context --------------------------------------------------------------------------

@dataclass
class _KeyFrame:
    key: torch.Tensor
    row_offset: int | torch.Tensor
    calls: int = 0


_state = threading.local()


def _key_frames() -> list[_KeyFrame]:
    if not hasattr(_state, "frames"):
        _state.frames = []
    return _state.frames


def _context_offset() -> int | torch.Tensor:
    frames = _key_frames()
    return frames[-1].row_offset if frames else 0


@contextmanager
def key_context(key: torch.Tensor, *, row_offset: int | torch.Tensor = 0) -> Iterator[None]:
    """Makes ``key`` the key that random layers (:class:`fdp.nn.Dropout`) draw from.

    Each :func:`next_key` inside gives a fresh key ``fold_in(key, i)`` for the ``i``-th call,
    counted from 0 every time the context is entered. Bind it where the forward runs, once per
    forward: inside ``loss_fn`` (see :func:`with_key`), so that every replica — a vmap slice,
    a thread or a process — enters it once and counts its layers' calls identically. The
    context is thread-local: one bound in the caller's thread is invisible to the replicas
    of a threads mesh.

    Args:
        key: the key (from :func:`key`, :func:`split` or :func:`fold_in`).
        row_offset: added to :func:`row_index`: the first row of a microbatch in the batch.

    Example:
        >>> import fdp.random
        >>> k = fdp.random.key(0)
        >>> with fdp.random.key_context(k):
        ...     first, second = fdp.random.next_key(), fdp.random.next_key()
        >>> torch.equal(first, fdp.random.fold_in(k, 0)), torch.equal(first, second)
        (True, False)
    """
    _key_words(key, "key_context")
    if isinstance(row_offset, torch.Tensor):
        _integer_words(row_offset, "key_context", "row_offset", key)
    elif not _check.is_int(row_offset) or row_offset < 0:
        raise ValueError(f"fdp.random.key_context: row_offset must be an int >= 0 or an "
                         f"integer tensor, got {row_offset!r}")
    frames = _key_frames()
    frames.append(_KeyFrame(key, row_offset))
    try:
        yield
    finally:
        frames.pop()


def next_key(fn: str = "fdp.random.next_key") -> torch.Tensor:
    """The next per-call key of the innermost :func:`key_context` (``fold_in(key, i)``).

    Args:
        fn: the caller's name, for the error message when no key is bound.
    """
    frames = _key_frames()
    if not frames:
        raise RuntimeError(
            f"{fn} needs a random key, and none is bound: run the forward inside "
            f"`with fdp.random.key_context(key):` (in a data-parallel loss: write "
            f"loss_fn(params, batch, key), bind the context inside it — or wrap it with "
            f"fdp.random.with_key(loss_fn) — and pass the key as the last argument), or pass "
            f"key=... explicitly"
        )
    frame = frames[-1]
    out = fold_in(frame.key, frame.calls)
    frame.calls += 1
    return out


def with_key(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``g(*args, key)``: calls ``fn(*args)`` inside ``key_context(key)``.

    Made for losses: ``fdp.value_and_grad(with_key(loss_fn), mesh)(params, batch, key)``
    passes ``key`` to every replica (extra arguments are not split), and each replica binds it
    where it runs, on every backend.

    Example:
        >>> import fdp.random
        >>> f = fdp.random.with_key(lambda x: fdp.random.next_key())
        >>> torch.equal(f(None, fdp.random.key(3)), fdp.random.fold_in(fdp.random.key(3), 0))
        True
    """
    if not callable(fn):
        raise TypeError(f"fdp.random.with_key: fn must be callable, got {type(fn).__name__}")

    @functools.wraps(fn)
    def keyed(*args: Any, **kwargs: Any) -> Any:
        if not args:
            raise TypeError("fdp.random.with_key: call the function with the key as its last "
                            "positional argument")
        *rest, k = args
        with key_context(k):
            return fn(*rest, **kwargs)

    return keyed
