"""``pmap``'s static arguments (``static_broadcasted_argnums``): validated, then passed to
every replica as they are."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from fdp import _check
from fdp._compat import compiling
from fdp._layout import Sharded

__all__ = ["Static", "static_argnums", "static_positions", "unwrapping"]


def is_sharded(x: Any) -> bool:
    return isinstance(x, Sharded)


def static_argnums(value: Any, fn: Callable[..., Any]) -> tuple[int, ...]:
    """Validates ``static_broadcasted_argnums`` against ``fn``'s signature where it can."""
    items = (value,) if isinstance(value, int) else value
    if not isinstance(items, (tuple, list, set, frozenset, range)) or not all(
        _check.is_int(i) for i in items
    ):
        raise TypeError(
            f"pmap: static_broadcasted_argnums must be an int or a sequence of ints (positions "
            f"of positional arguments), got {value!r}"
        )
    positions = tuple(sorted(set(items)))
    if not positions or compiling():  # dynamo cannot trace inspect
        return positions
    count = _positional_count(fn)
    bad = [] if count is None else _out_of_range(positions, count)
    if bad and count is not None:
        raise ValueError(
            f"pmap: static_broadcasted_argnums={value!r} has {bad}, out of range for "
            f"{getattr(fn, '__name__', 'fn')}, which takes {_arguments(count)} "
            f"(valid: {-count} .. {count - 1})"
        )
    return positions


def _out_of_range(positions: tuple[int, ...], count: int) -> list[int]:
    return [i for i in positions if not -count <= i < count]


def _arguments(count: int) -> str:
    return f"{count} positional argument{'s' if count != 1 else ''}"


def _positional_count(fn: Callable[..., Any]) -> int | None:
    """How many positional arguments ``fn`` can take, or None if unbounded or unknown."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = [p.kind for p in params]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return None
    return sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
               for k in kinds)


def static_positions(static: tuple[int, ...], count: int, args: tuple) -> dict[int, Any]:
    bad = _out_of_range(static, count)
    if bad:
        raise ValueError(
            f"pmap: static_broadcasted_argnums has {bad}, but the function was called with "
            f"{_arguments(count)}; pass the static values positionally (keyword arguments are "
            f"always broadcast)"
        )
    fixed = {i % count: args[i] for i in static}
    for i, value in fixed.items():
        if is_sharded(value):
            raise ValueError(
                f"pmap: args[{i}] is Sharded (split over replicas) but position {i} is in "
                f"static_broadcasted_argnums; remove it from there to map it over replicas"
            )
    return fixed


class Static:
    """A static argument: a pytree leaf that is not a tensor, so it is broadcast untouched."""

    def __init__(self, value: Any) -> None:
        self.value = value


def unwrapping(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*(a.value if isinstance(a, Static) else a for a in args), **kwargs)
    return call
