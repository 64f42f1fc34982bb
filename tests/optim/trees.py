"""Strategies for random pytrees of random shapes, and torch.optim reference runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from hypothesis import strategies as st

import fdp.optim


class Shape(tuple):
    """A leaf marker in a drawn tree structure (so tuples of shapes stay containers)."""


_shapes = st.lists(st.integers(1, 4), max_size=3).map(Shape)
_names = st.sampled_from(["w", "b", "fc.weight", "fc.bias", "emb", "0"])
_structures = st.recursive(
    _shapes,
    lambda kids: st.one_of(
        st.dictionaries(_names, kids, min_size=1, max_size=3),
        st.lists(kids, min_size=1, max_size=2),
        st.lists(kids, min_size=1, max_size=2).map(tuple),
    ),
    max_leaves=5,
)
structures = st.dictionaries(_names, _structures, min_size=1, max_size=3)
"""Params-like trees: a dict at the top, nested dicts/lists/tuples, 1-5 leaves of 0-3 dims."""


def make(structure: Any, dtype: torch.dtype, scale: float = 1.0) -> Any:
    """A tree of ``torch.randn`` tensors (torch's RNG is seeded by hypothesis) for ``structure``."""
    return pytree.tree_map(lambda s: scale * torch.randn(s, dtype=dtype), structure,
                           is_leaf=lambda x: isinstance(x, Shape))


def run_ours(opt: Any, params: Any, grads_seq: list[Any]) -> tuple[Any, Any]:
    state = opt.init(params)
    for grads in grads_seq:
        updates, state = opt.update(grads, state, params)
        params = fdp.optim.apply_updates(params, updates)
    return params, state


def run_torch(
    make_opt: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    params: Any,
    grads_seq: list[Any],
    make_sched: Callable[[torch.optim.Optimizer], Any] | None = None,
    clip: float | None = None,
) -> tuple[Any, torch.optim.Optimizer, list[torch.nn.Parameter]]:
    """Runs a torch.optim optimizer over the leaves of ``params`` (in flattening order)."""
    leaves, spec = pytree.tree_flatten(params)
    ps = [torch.nn.Parameter(x.detach().clone()) for x in leaves]
    opt = make_opt(ps)
    sched = make_sched(opt) if make_sched else None
    for grads in grads_seq:
        for p, g in zip(ps, pytree.tree_leaves(grads), strict=True):
            p.grad = g.detach().clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ps, clip)
        opt.step()
        if sched is not None:
            sched.step()
    out = pytree.tree_unflatten([p.detach().clone() for p in ps], spec)
    return out, opt, ps


def torch_state(opt: torch.optim.Optimizer, ps: list[torch.Tensor], key: str, spec_tree: Any):
    """One torch.optim state entry per param, as a tree shaped like ``spec_tree``."""
    return pytree.tree_unflatten([opt.state[p][key] for p in ps],
                                 pytree.tree_structure(spec_tree))
