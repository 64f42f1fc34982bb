"""The key a step's keyed layers draw from: ``key_context``, ``next_key``, ``row_index``."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from fdp import _check
from fdp.backends._frame import bound_frames, lookup
from fdp.random._keys import _integer_words, _key_words, fold_in

__all__ = ["key_context", "next_key", "row_index", "with_key"]

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
