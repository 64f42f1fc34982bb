"""When ``torch.func.vmap`` cannot run a function: recognising that, and saying so once.

A mesh of virtual replicas runs them in one vmap, which is fast but cannot run every model:
ops without a batching rule (``nn.LSTM``/``GRU``/``RNN``, nested tensors), ``.item()`` and
data-dependent control flow (packed sequences, attention-mask fast paths), dynamic shapes, and
CPU autocast (vmap drops it for some ops, so dtypes would differ from one device's). Then the
vmap backend runs the replicas on its *general executor* instead: one thread per replica on the
same device, which runs anything that runs on one device, with the same results.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import warnings
from types import FrameType

import torch

__all__ = ["FallbackWarning", "autocast_reason", "first_line", "may_fall_back", "vmap_limitation",
           "warn_fallback"]


class FallbackWarning(UserWarning):
    """A mesh of virtual replicas ran them on its general executor (one thread per replica)
    because ``torch.func.vmap`` cannot run the function; the results are exact, the speed is
    not vmap's; or, with ``executor="replay"``, ran a step eagerly that cannot be traced for
    replay. Shown once per reason and operation; choose the executor explicitly with
    ``fdp.Mesh(n, executor=...)`` to silence it."""


_LIMITS = (  # what torch's vmap errors say, and the short name fdp reports
    ("calling .item() on a Tensor", ".item() (a host read, e.g. in packed sequences)"),
    ("data-dependent control flow", "data-dependent control flow (an `if` on a tensor)"),
    ("dynamic shape", "an op with a data-dependent output shape"),
    ("under vmap transform is not allowed", "an access that vmap forbids (e.g. Tensor.data)"),
    ("We could not generate a fallback", "an op without a batching rule"),
)
_SEMANTIC = (  # vmap errors that are about the program, not vmap: they must surface as they are
    "Batch norm got a batched tensor",  # per-replica BatchNorm statistics: buffer_policy=
    "random operation while in randomness error mode",  # randomness=
)
_OP = re.compile(r"Batching rule not implemented for (aten::\w+(?:\.\w+)?)")
_FDP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_warned: set[tuple[str, str]] = set()
_lock = threading.Lock()


def may_fall_back(error: BaseException) -> bool:
    """Whether the general executor could run what vmap failed on: a runtime error that is not
    one of vmap's messages about the program itself (BatchNorm statistics, randomness)."""
    return isinstance(error, (RuntimeError, NotImplementedError)) and not any(
        needle in str(error) for needle in _SEMANTIC)


def vmap_limitation(error: BaseException) -> str | None:
    """What vmap could not run, named, if ``error`` is one of vmap's known limitations; for
    other errors ``None`` (then only the general executor's success tells)."""
    text = str(error)
    found = _OP.search(text)
    if found:
        return found.group(1)
    return next((name for needle, name in _LIMITS if needle in text), None)


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def autocast_reason(device: torch.device) -> str | None:
    """``"autocast"`` when autocast is on for ``device``'s kind (vmap would drop it for some
    ops, so outputs would not have one device's dtypes)."""
    kind = device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return f"{kind} autocast ({torch.get_autocast_dtype(kind)})"
    return None


def warn_fallback(what: str, reason: str, size: int, device: torch.device) -> None:
    """One :class:`FallbackWarning` per ``(what, reason)`` for the process."""
    with _lock:
        if (what, reason) in _warned:
            return
        _warned.add((what, reason))
    warnings.warn(FallbackWarning(
        f"{what} on fdp.Mesh({size}): torch.func.vmap cannot run {reason}, so the {size} "
        f"replicas run on the general executor instead: one thread per replica on {device}. "
        f"The results are exact; the cost is that of {size} separate forward/backward passes "
        f"over the shards instead of one batched pass (docs/performance.md). Pass "
        f"fdp.Mesh({size}, executor='general') to choose it without this warning, or "
        f"executor='vmap' to get vmap's error instead"), stacklevel=_caller_level())


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside fdp: the user's call."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_FDP):
        frame, level = frame.f_back, level + 1
    return level
