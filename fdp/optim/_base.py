"""Core of :mod:`fdp.optim`: the ``GradientTransformation`` pair, ``chain``, ``apply_updates``.

A gradient transformation is a pair of pure functions, as in optax: ``init(params) -> state``
builds the optimizer state (a pytree of tensors) and ``update(grads, state, params=None) ->
(updates, new_state)`` maps gradients to *updates*, which :func:`apply_updates` adds to the
params. Nothing is ever written in place: every call returns new tensors.

Trees are matched by *key path* (``['fc.weight']``), never by leaf position, so a dict whose keys
were inserted in another order still lines up; a missing or extra key is an error naming it.

A ``None`` gradient means *no gradient*, as a ``.grad`` of ``None`` does for ``torch.optim``: the
parameter is frozen (``requires_grad=False``) or the loss did not use it. Every transformation
then leaves it as torch.optim does: its update is ``None`` (``apply_updates`` keeps the param),
its state entries (momentum, moments) stay as they were, no weight decay applies, and it does
not count towards a global norm. Adam counts each parameter's own steps for its bias
correction, as torch does. (SGD's "first step" of the momentum buffer is the optimizer's: with
``dampening != 0``, a parameter whose first gradient comes late starts its buffer at
``(1 - dampening) * g`` where torch starts it at ``g``.)
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from fdp import _check, _tree
from fdp._compat import pytree
from fdp._donation import check_not_donated
from fdp.optim._native import is_native, native

__all__ = ["EmptyState", "GradientTransformation", "apply_updates", "chain", "sum_over_shards"]

PyTree = Any
Updates = Any
OptState = Any


class GradientTransformation(NamedTuple):
    """A pure optimizer: ``init(params) -> state`` and ``update(grads, state, params) -> ...``.

    ``update`` returns ``(updates, new_state)``; ``updates`` has the structure of ``grads`` and is
    meant for :func:`apply_updates`. Pass ``params`` when the transformation needs them (weight
    decay).

    Example:
        >>> opt = fdp.optim.sgd(0.5)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": torch.tensor([1.0, 1.0])}, state, params)
        >>> fdp.optim.apply_updates(params, updates)
        {'w': tensor([0.5000, 1.5000])}
    """

    init: Callable[[PyTree], OptState]
    update: Callable[..., tuple[Updates, OptState]]


class EmptyState(NamedTuple):
    """The state of a stateless transformation (e.g. :func:`fdp.optim.clip_by_global_norm`)."""


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Composes transformations: each one's updates are the next one's grads.

    The state is a tuple with one entry per transformation.

    Example:
        >>> opt = fdp.optim.chain(fdp.optim.clip_by_global_norm(1.0), fdp.optim.sgd(0.1))
        >>> params = {"w": torch.zeros(2)}
        >>> updates, _ = opt.update({"w": torch.tensor([3.0, 4.0])}, opt.init(params), params)
        >>> updates["w"]
        tensor([-0.0600, -0.0800])
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"chain: transforms[{i}] is a {type(t).__name__}, not a GradientTransformation; "
                f"pass optimizers such as fdp.optim.sgd(0.1), not their states or updates"
            )

    def init(params: PyTree) -> tuple[OptState, ...]:
        return tuple(t.init(params) for t in transforms)

    natives = [is_native(t.update) for t in transforms]

    def update(
        grads: PyTree, state: tuple[OptState, ...], params: PyTree | None = None, *,
        _into: Any = None,
    ) -> tuple[Updates, tuple[OptState, ...]]:
        if type(state) is not tuple or len(state) != len(transforms):
            got = len(state) if type(state) is tuple else type(state).__name__
            raise ValueError(
                f"chain.update: state must be the tuple of {len(transforms)} states made by "
                f"this chain's init, got {got}; build it with opt.init(params)"
            )
        new_states = []
        last = len(transforms) - 1
        for k, (t, s) in enumerate(zip(transforms, state, strict=True)):
            if _into is None or not natives[k]:  # a user's transformation: functional
                grads, s = t.update(grads, s, params)
            else:  # its output stays in the step unless a user's transformation reads it
                private = _into.private_output and (k == last or natives[k + 1])
                dest = None if _into.state is None else _into.state[k]
                grads, s = t.update(grads, s, params, _into=_into.child(dest, private))
            new_states.append(s)
        return grads, tuple(new_states)

    return GradientTransformation(init, native(update, [t.update for t in transforms]))


def apply_updates(params: PyTree, updates: Updates) -> PyTree:
    """Returns ``params + updates`` leaf by leaf (matched by key path), keeping params' dtypes.

    Example:
        >>> fdp.optim.apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -1.0])})
        {'w': tensor([1.5000, 0.0000])}
    """
    return apply_into(params, updates, None)


def apply_into(params: PyTree, updates: Updates, into: PyTree | None) -> PyTree:
    """:func:`apply_updates`, writing each new leaf into the leaf of ``into`` (a tree like
    ``params``) where one is given: the same kernel as the functional sum."""
    check_not_donated(params, "apply_updates", "params")
    check_not_donated(updates, "apply_updates", "updates")
    p_leaves, spec = pytree.tree_flatten(params)
    u_leaves = aligned_leaves("apply_updates", updates, "updates", params, "params",
                              same_dtype=False, blame=_UPDATES_FIX)
    for path, leaf in _paths_if_needed(params, p_leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"apply_updates: params{path} is a {type(leaf).__name__}, "
                            f"not a torch.Tensor")
    d_leaves = [None] * len(p_leaves) if into is None else pytree.tree_leaves(into)
    out = [p if u is None else _add(p, u, d) for p, u, d in zip(p_leaves, u_leaves, d_leaves,
                                                                strict=True)]
    return pytree.tree_unflatten(out, spec)


def _add(p: torch.Tensor, u: torch.Tensor, dest: torch.Tensor | None) -> torch.Tensor:
    """``p + u`` in ``p``'s dtype, into ``dest`` when given (the same kernel either way)."""
    if dest is None or u.dtype != p.dtype:
        return (p + u).to(p.dtype)
    return torch.add(p, u, out=dest)


def _paths_if_needed(tree: PyTree, leaves: list[Any]) -> list[tuple[str, Any]]:
    """Key paths of ``tree`` only when some leaf is not a tensor (the error path)."""
    if all(isinstance(x, torch.Tensor) for x in leaves):
        return []
    return _tree.leaves_with_path(tree)


# --- sharded optimizer state -------------------------------------------------------------------

_SHARDS = threading.local()  # each replica of the threads backend runs its update in a thread


def sum_over_shards(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over every replica's slice of the parameters; ``x`` itself elsewhere.

    With ``fdp.data_parallel_step(..., shard_optimizer_state=True)`` each replica updates only
    its slice of the (flattened) parameters, so a quantity over *all* parameters — a global
    norm, a count — must be summed over the slices. A transformation computes its part from the
    leaves it sees and passes it through this function: inside a sharded update it is a
    :func:`fdp.psum` over the mesh, otherwise the identity. :func:`clip_by_global_norm` sums
    its squared norm this way.

    Example:
        >>> fdp.optim.sum_over_shards(torch.tensor(3.0))  # not sharded: unchanged
        tensor(3.)
    """
    total: Callable[[torch.Tensor], torch.Tensor] | None = getattr(_SHARDS, "total", None)
    return x if total is None else total(x)


def sharded() -> bool:
    """Whether the current update runs on one slice of the parameters."""
    return getattr(_SHARDS, "total", None) is not None


@contextlib.contextmanager
def summing_over_shards(total: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Makes :func:`sum_over_shards` call ``total`` (a ``psum``) in this thread."""
    previous = getattr(_SHARDS, "total", None)
    _SHARDS.total = total
    try:
        yield
    finally:
        _SHARDS.total = previous


# --- checks shared by the optimizers ----------------------------------------------------------

def float_params(params: PyTree, fn: str) -> list[torch.Tensor]:
    """The leaves of ``params``; each must be a floating-point tensor."""
    leaves = pytree.tree_leaves(params)
    for path, leaf in _tree.leaves_with_path(params):
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            what = leaf.dtype if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            raise TypeError(
                f"{fn}: params{path} is a {what}, but optimizers need floating-point tensors; "
                f"cast it (e.g. .float()) or keep it out of the params tree"
            )
    return leaves


def step_count(params_leaves: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d int64 zero on the params' device: the initial step count."""
    device = params_leaves[0].device if params_leaves else None
    return torch.zeros((), dtype=torch.int64, device=device)


def grad_leaves(grads: PyTree, fn: str) -> list[torch.Tensor | None]:
    """The leaves of ``grads``; each must be a tensor, or ``None`` for *no gradient*."""
    leaves = pytree.tree_leaves(grads)
    if any(not isinstance(x, torch.Tensor) and x is not None for x in leaves):
        for path, leaf in _tree.leaves_with_path(grads):
            if not isinstance(leaf, torch.Tensor) and leaf is not None:
                raise TypeError(f"{fn}: grads{path} is a {type(leaf).__name__}, not a "
                                f"torch.Tensor (or None: no gradient)")
    return leaves


def aligned_leaves(
    fn: str, tree: PyTree, name: str, ref: PyTree, ref_name: str = "grads",
    same_dtype: bool = True, blame: str | None = None,
) -> list[Any]:
    """The leaves of ``tree`` in the leaf order of ``ref``, after checking their key paths.

    With ``blame`` (the fix to suggest) the errors say that ``tree`` is the one that does not
    fit ``ref`` (an optimizer state checked against grads that match the params, updates
    checked against the params).

    Raises:
        ValueError: naming the first key path one tree has and the other lacks, or a leaf whose
            shape differs.
    """
    leaves, spec = pytree.tree_flatten(tree)
    ref_leaves, ref_spec = pytree.tree_flatten(ref)
    if spec != ref_spec:
        ref_pairs = _tree.leaves_with_path(ref)
        by_path = dict(_tree.leaves_with_path(tree))
        ref_paths = [p for p, _ in ref_pairs]
        ref_set = set(ref_paths)
        missing = [p for p in by_path if p not in ref_set]
        unexpected = [p for p in ref_paths if p not in by_path]
        if blame is not None and (missing or unexpected):
            _keys_error(fn, name, ref_name, missing, unexpected, blame)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{ref_name} lacks {name}{missing[0]}")
            if unexpected:
                parts.append(f"{ref_name}{unexpected[0]} is unexpected ({name} has no such key)")
            raise ValueError(
                f"{fn}: {ref_name} and {name} have different tree structures: "
                f"{'; '.join(parts)}. Give {ref_name} the key paths of the params the optimizer "
                f"was initialized with (e.g. the grads of the same params dict)"
            )
        leaves = [by_path[p] for p in ref_paths]
    for i, (leaf, r) in enumerate(zip(leaves, ref_leaves, strict=True)):
        if not (isinstance(leaf, torch.Tensor) and isinstance(r, torch.Tensor)):
            continue
        differs = leaf.shape != r.shape or (same_dtype and leaf.dtype != r.dtype)
        if blame is not None and differs:
            _leaf_error(fn, name, ref_name, _tree.leaves_with_path(ref)[i][0], (leaf, r), blame)
        if leaf.shape != r.shape:
            path = _tree.leaves_with_path(ref)[i][0]
            raise ValueError(
                f"{fn}: {ref_name}{path} has shape {tuple(r.shape)} but {name}{path} has "
                f"{tuple(leaf.shape)}; the grads must have the params' shapes"
            )
        if same_dtype and leaf.dtype != r.dtype:
            path = _tree.leaves_with_path(ref)[i][0]
            raise ValueError(
                f"{fn}: {ref_name}{path} is {r.dtype} but {name}{path} is {leaf.dtype}; cast "
                f"the grads to the params' dtype"
            )
    return leaves


_REBUILD = ("the grads match the params, so the optimizer state was made by init for other "
            "params; build it for these with opt.init(params) (a TrainState's opt_state: "
            "fdp.TrainState.create(params, opt))")
_UPDATES_FIX = "pass the updates that optimizer.update returned for these params"


def _keys_error(fn: str, name: str, ref_name: str, missing: list[str], unexpected: list[str],
                fix: str) -> None:
    what = (f"{name} has no entry for {ref_name}{unexpected[0]}" if unexpected
            else f"{name}{missing[0]} is not a key of the {ref_name}")
    raise ValueError(f"{fn}: {name} does not match the {ref_name}: {what}; {fix}")


def _leaf_error(fn: str, name: str, ref_name: str, path: str,
                pair: tuple[torch.Tensor, torch.Tensor], fix: str) -> None:
    leaf, ref = pair
    raise ValueError(
        f"{fn}: {name}{path} is {leaf.dtype}{list(leaf.shape)} but {ref_name}{path} is "
        f"{ref.dtype}{list(ref.shape)}: {name} does not match the {ref_name}; {fix}"
    )


def check_state(state: Any, expected: type, fn: str, factory: str) -> None:
    """A clear error when ``update`` gets another optimizer's state (or none)."""
    if not isinstance(state, expected):
        raise TypeError(
            f"{fn}: state must be the {expected.__name__} made by {factory}.init, got "
            f"{type(state).__name__}; initialize the state with the same optimizer"
        )
    check_not_donated(state, fn, "state")


def update_inputs(
    where: str, factory: str, state: Any, state_type: type, grads: PyTree,
    params: PyTree | None, weight_decay: float,
) -> tuple[list[torch.Tensor | None], list[Any]]:
    """The checks every optimizer's ``update`` starts with.

    Returns the grad leaves and the params' leaves aligned to them by key path (``None``s when
    no params were given and none are needed).
    """
    check_state(state, state_type, where, factory)
    check_not_donated(grads, where, "grads")
    check_not_donated(params, where, "params")
    g_leaves = grad_leaves(grads, where)
    if weight_decay != 0:
        need_params(params, where, f"weight_decay={weight_decay}")
    if params is None:
        return g_leaves, [None] * len(g_leaves)
    return g_leaves, aligned_leaves(where, params, "params", grads)


def state_leaves(where: str, tree: PyTree, name: str, grads: PyTree, present: bool = True,
                 params: PyTree | None = None) -> list[Any]:
    """A part of an optimizer's state, aligned to the grads (``None``s if absent).

    When ``params`` were given (and the grads matched them), a mismatch is the state's fault.
    """
    if not present:
        return [None] * len(pytree.tree_leaves(grads))
    return aligned_leaves(where, tree, name, grads, blame=None if params is None else _REBUILD)


def need_params(params: PyTree | None, fn: str, why: str) -> None:
    if params is None:
        raise ValueError(
            f"{fn}: params is None but {why} needs the current params; "
            f"call update(grads, state, params)"
        )


def number(value: Any, fn: str, name: str) -> float:
    """``value`` as a float; must be a finite real number (not a bool or a tensor)."""
    if not _check.is_number(value):
        raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    return float(value)


def nonnegative(value: Any, fn: str, name: str) -> float:
    v = number(value, fn, name)
    if v < 0:
        raise ValueError(f"{fn}: {name} must be >= 0, got {value}; e.g. {name}=0.0")
    return v


def unit_interval(value: Any, fn: str, name: str) -> float:
    """A decay rate in ``[0, 1)`` (like Adam's betas)."""
    v = number(value, fn, name)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{fn}: {name} must be in [0, 1), got {value}; e.g. {name}=0.9")
    return v


def unflatten_like(leaves: list[Any], tree: PyTree) -> PyTree:
    return pytree.tree_unflatten(leaves, pytree.tree_structure(tree))
