"""Eager argument checks shared by every module (errors name the function and the argument).

This module imports nothing else from fdp, so that any module can use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeGuard, TypeVar

import torch

T = TypeVar("T")


def is_int(value: object) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool`` (``True`` is an int to Python, never a size to fdp)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(value: Any, fn: str, name: str, *, minimum: int | None = None) -> int:
    """``value`` if it is an int (and ``>= minimum``); else a TypeError/ValueError naming it."""
    if not is_int(value):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value


def positive_number(value: Any, fn: str, name: str, unit: str = "") -> float:
    """``value`` as a float if it is a finite number > 0; else a ValueError naming it."""
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{fn}: {name} must be a positive number{unit}, got {value!r}")
    return float(value)


def choice(value: Any, choices: Sequence[T], fn: str, name: str, hint: str = "") -> T:
    """``value`` if it is one of ``choices``; else a ValueError listing them."""
    if isinstance(value, str) and value in choices:
        return value  # type: ignore[return-value]  # narrowed by membership
    raise ValueError(f"{fn}: unknown {name}={value!r}; use one of {tuple(choices)}{hint}")


def callable_(value: Any, fn: str, name: str) -> None:
    if not callable(value):
        raise TypeError(f"{fn}: {name} must be callable, got {type(value).__name__}")


def param_dict(params: Any, fn: str, name: str = "params") -> dict[str, torch.Tensor]:
    """``params`` if it is a dict of tensors; else a TypeError naming the offending key."""
    if not isinstance(params, dict):
        hint = name if name in ("params", "buffers") else "params"
        raise TypeError(
            f"{fn}: {name} must be a dict of tensors (name -> Tensor), got "
            f"{type(params).__name__}; fdp.functionalize(module).{hint} is one"
        )
    for key, value in params.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{fn}: {name}[{key!r}] is a {type(value).__name__}, not a torch.Tensor"
            )
    return params


def device(value: object, fn: str, name: str, *, default_cpu: bool = True) -> torch.device:
    """``value`` as a ``torch.device`` (the CPU for ``None`` where ``default_cpu``).

    Raises:
        TypeError: ``value`` is not a device, a str or an int.
        ValueError: torch does not accept it as a device (torch's reason included).
    """
    if value is None and default_cpu:
        return torch.device("cpu")
    if isinstance(value, torch.device):
        return value
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a torch.device, a str or an int, got "
                        f"{type(value).__name__}")
    try:
        return torch.device(value)
    except RuntimeError as e:
        raise ValueError(f"{fn}: {name}={value!r} is not a device here ({e}); use e.g. "
                         f"'cpu', 'cuda' or 'cuda:0'") from e
