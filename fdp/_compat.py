"""Every private torch API fdp relies on, in one place.

fdp declares the torch versions it is tested with (``pyproject.toml``). The names below are
not part of torch's public API, so a new torch release may move them; ``tests/test_compat.py``
checks each one's behaviour, so that such a change fails there, by name, rather than somewhere
deep inside a data-parallel step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree  # torch has no public pytree module yet (2.13)
from torch.nn.modules.batchnorm import _BatchNorm as BatchNormBase
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

__all__ = [
    "BatchNormBase",
    "UninitializedTensorMixin",
    "add_note",
    "broadcast_prefix_and_flatten",
    "in_functorch_transform",
    "is_functorch_wrapped",
    "pytree",
]


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` (Python 3.11+); on 3.10, which shows no notes, the note joins
    the message of an exception with one string argument."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    elif len(error.args) == 1 and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]}\n{note}",)


def broadcast_prefix_and_flatten(prefix: Any, treedef: pytree.TreeSpec) -> list[Any] | None:
    """``prefix`` (a tree prefix of ``treedef``) expanded to one value per leaf, or ``None``
    when it is not a prefix (``jax.tree_util``'s prefix broadcasting)."""
    return pytree._broadcast_to_and_flatten(prefix, treedef)


def in_functorch_transform() -> bool:
    """Whether the caller runs inside a ``torch.func`` transform (vmap, grad, jvp, ...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def is_functorch_wrapped(x: torch.Tensor) -> bool:
    """Whether ``x`` is a ``torch.func`` wrapper (batched or tracked by a transform), whose
    value cannot be read on the host."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
