"""Public pytree helpers: key paths, stacking, flat buffers and structural comparison."""

from fdp._tree import (
    allclose,
    assert_allclose,
    flatten,
    keystr,
    leaves_with_path,
    map_with_path,
    ravel,
    stack,
    unflatten,
    unstack,
)

__all__ = [
    "allclose",
    "assert_allclose",
    "flatten",
    "keystr",
    "leaves_with_path",
    "map_with_path",
    "ravel",
    "stack",
    "unflatten",
    "unstack",
]
