"""The string options of fdp's public functions, as ``Literal`` types with their validators.

A backend receives options already checked (see :class:`fdp.backends.GradPlan`); public
functions call the validators eagerly, so a typo fails where it is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

from fdp import _check

__all__ = [
    "BUFFER_POLICIES",
    "RANDOMNESS",
    "REDUCE_OPS",
    "REDUCTIONS",
    "SPLIT_NAMES",
    "STRATEGIES",
    "EXECUTORS",
    "BufferPolicy",
    "Executor",
    "Randomness",
    "ReduceOp",
    "Reduction",
    "SplitName",
    "SplitRule",
    "Strategy",
    "UNUSED",
    "Unused",
    "check_buffer_policy",
    "check_executor",
    "check_randomness",
    "check_reduce_op",
    "check_reduction",
    "check_strategy",
    "check_unused",
]

ReduceOp = Literal["sum", "mean", "max", "min"]
"""How collectives and :func:`fdp.all_reduce` combine the replicas' values."""

Randomness = Literal["error", "different", "same"]
"""torch's own random ops inside replicas (``torch.func.vmap``'s modes): raise, draw
independently per replica, or draw the same values on every replica."""

Strategy = Literal["weighted", "gather"]
"""How :func:`fdp.value_and_grad` recovers the single-device loss: each replica's loss weighted
by its rows (DDP/JAX), or outputs gathered into one criterion (``nn.DataParallel``)."""

Reduction = Literal["mean", "sum"]
"""How a loss reduces over its examples (the ``"weighted"`` strategy's weights)."""

BufferPolicy = Literal["replica0", "mean", "sync"]
"""Which of the replicas' updated buffers a step keeps (see :func:`fdp.data_parallel_step`
and docs/training.md)."""

Executor = Literal["auto", "vmap", "general", "replay"]
"""How a mesh of virtual replicas (``fdp.Mesh(n)``) runs them: ``"vmap"`` (one
``torch.func.vmap``: the fast path), ``"general"`` (one thread per replica on the mesh's device:
exact for any function that runs on one device), ``"auto"`` (vmap, and the general executor
where vmap cannot run the function, with a one-time :class:`fdp.FallbackWarning`) or
``"replay"`` (``"auto"``, with :func:`fdp.value_and_grad`'s step traced once per input signature
and replayed: opt-in, for losses without Python state, see docs/backends.md)."""

Unused = Literal["zeros", "none"]
"""The gradient of a parameter the loss does not depend on (unused, or frozen with
``requires_grad=False`` in its module): ``"zeros"`` (``torch.func.grad``'s) or ``"none"``
(``torch.autograd``'s, which ``torch.optim`` and :mod:`fdp.optim` skip)."""

SplitName = Literal["chunk", "even"]
SplitRule = SplitName | Sequence[int]
"""How a batch is split over replicas: a rule's name, or one row count per replica."""

REDUCE_OPS: tuple[ReduceOp, ...] = get_args(ReduceOp)
RANDOMNESS: tuple[Randomness, ...] = get_args(Randomness)
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)
REDUCTIONS: tuple[Reduction, ...] = get_args(Reduction)
BUFFER_POLICIES: tuple[BufferPolicy, ...] = get_args(BufferPolicy)
SPLIT_NAMES: tuple[SplitName, ...] = get_args(SplitName)
EXECUTORS: tuple[Executor, ...] = get_args(Executor)
UNUSED: tuple[Unused, ...] = get_args(Unused)


def check_reduce_op(value: object, fn: str, name: str = "op") -> ReduceOp:
    return _check.choice(value, REDUCE_OPS, fn, name)


def check_randomness(value: object, fn: str) -> Randomness:
    return _check.choice(value, RANDOMNESS, fn, "randomness")


def check_strategy(value: object, fn: str) -> Strategy:
    return _check.choice(value, STRATEGIES, fn, "strategy")


def check_reduction(value: object, fn: str) -> Reduction:
    return _check.choice(value, REDUCTIONS, fn, "reduction")


def check_unused(value: object, fn: str) -> Unused:
    return _check.choice(value, UNUSED, fn, "unused")


def check_executor(value: object, fn: str) -> Executor:
    return _check.choice(value, EXECUTORS, fn, "executor")


def check_buffer_policy(value: object, fn: str, *, optional: bool = True
                        ) -> BufferPolicy | None:
    """A buffer policy, or ``None`` (no buffers) where ``optional``."""
    if value is None and optional:
        return None
    hint = " (or None when loss_fn has no buffers)" if optional else ""
    return _check.choice(value, BUFFER_POLICIES, fn, "buffer_policy", hint)
