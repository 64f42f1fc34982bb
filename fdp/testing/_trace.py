"""Forward-hook tracing: a module run on a shard of the batch, compared with the full-batch run.

A :class:`Tracer` records every submodule call of one forward pass as a sequence of events:
``("in", name, (args, kwargs))`` when the call starts and ``("out", name, output)`` when it
returns. Given the events of a *reference* run (the full batch), it compares each event of this
run (one replica's shard) with the reference rows the shard holds, notes where they first
differ, and then *forces* the reference values into the run, so every later layer is judged on
the inputs it would get in single-device training. A difference at an ``"out"`` event is the
module's own doing; at an ``"in"`` event it is the code of the enclosing module's forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from fdp._compat import pytree

__all__ = ["Finding", "Tracer", "tolerance"]

_TOLERANCES = {torch.float64: (1e-10, 1e-13), torch.float32: (1e-5, 1e-7)}
_LOW_PRECISION = (1e-2, 1e-4)  # float16 / bfloat16


def tolerance(dtype: torch.dtype, rtol: float | None, atol: float | None) -> tuple[float, float]:
    """``(rtol, atol)`` for ``dtype``: the given values, else the defaults for that dtype."""
    default = _TOLERANCES.get(dtype, _LOW_PRECISION)
    return (default[0] if rtol is None else rtol, default[1] if atol is None else atol)


def difference(actual: torch.Tensor, expected: torch.Tensor, rtol: float | None,
               atol: float | None, floor: float = 0.0) -> str | None:
    """None when close, else a short description (max abs difference vs tolerance).

    Close: ``max|actual - expected| <= rtol * max(max|expected|, floor) + atol``. ``floor``
    is the scale of the related tensors (e.g. all gradients): a value that is zero by
    cancellation (a conv bias before BatchNorm) carries the rounding of the terms that cancel.
    """
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return (f"{actual.dtype}{list(actual.shape)} vs single-device "
                f"{expected.dtype}{list(expected.shape)}")
    a, e = actual.detach(), expected.detach()
    if not (e.is_floating_point() or e.is_complex()):
        return None if torch.equal(a, e) else "values differ"
    if e.numel() == 0:
        return None
    r, t = tolerance(e.dtype, rtol, atol)
    err = (a - e).abs().max().item()
    scale = max(e.abs().max().item(), floor)
    if err <= r * scale + t and not (torch.isnan(a) ^ torch.isnan(e)).any():
        return None
    return f"max abs difference {err:.3e} > tolerance {r * scale + t:.3e} (scale {scale:.3e})"


def scale(tensors: Any) -> float:
    """The largest magnitude among the floating-point tensors in ``tensors`` (0 if none)."""
    values = [x.detach().abs().max().item() for x in pytree.tree_leaves(tensors)
              if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()]
    return max(values, default=0.0)


class Finding(NamedTuple):
    """Where a run first departs from the reference.

    Attributes:
        kind: ``"mixes"`` (a module's output rows differ although its inputs agree),
            ``"own_code"`` (the inputs of a call differ: the enclosing forward's own code),
            ``"raises"`` (the module raised on the shard), ``"random"`` (two full-batch runs
            with different seeds differ) or ``"inputs"`` (the model's inputs differ).
        name: qualified name of the culprit module (``""`` for the root).
        module: the culprit module, or None for ``"inputs"``.
        detail: what differs (the largest difference, or the error).
        before: for ``"own_code"``: the call whose inputs differ (``"Linear at 'fc2'"``).
    """

    kind: str
    name: str
    module: nn.Module | None
    detail: str
    before: str = ""


Event = tuple[str, str, Any]  # ("in" | "out", qualified name, cloned value)


def _clone(tree: Any) -> Any:
    return pytree.tree_map(
        lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree)


def _align(cur: torch.Tensor, ref: torch.Tensor, rows: tuple[int, int],
           total: int) -> torch.Tensor | None:
    """The part of ``ref`` (full batch) that ``cur`` (a shard of ``rows``) should equal."""
    start, size = rows
    if size != total:
        for d in range(ref.dim()):
            if ref.shape[d] == total and cur.dim() == ref.dim() and cur.shape[d] == size and \
                    all(cur.shape[i] == ref.shape[i] for i in range(ref.dim()) if i != d):
                return ref.narrow(d, start, size)
    return ref if cur.shape == ref.shape else None


class Tracer:
    """Hooks for one forward pass; compares with and forces from ``reference`` when given.

    Args:
        names: ``id(module) -> qualified name`` for every hooked module.
        reference: the events of the full-batch run, or None to only record.
        rows: ``(first_row, size)`` of the shard this run sees.
        total: rows in the full batch.
        rtol, atol: tolerances (None: by dtype).
        skip: names whose differences are not findings (known-random layers); their values
            are still forced.
    """

    def __init__(self, names: dict[int, str], reference: list[Event] | None = None,
                 rows: tuple[int, int] = (0, 0), total: int = 0, rtol: float | None = None,
                 atol: float | None = None, skip: frozenset[str] = frozenset()) -> None:
        self.names, self.reference, self.rows, self.total = names, reference, rows, total
        self.rtol, self.atol, self.skip = rtol, atol, skip
        self.events: list[Event] = []
        self.findings: list[Finding] = []
        self.stack: list[tuple[str, nn.Module]] = []
        self._aligned = reference is not None

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        name = self.names[id(module)]
        parent = self.stack[-1] if self.stack else None
        self.stack.append((name, module))
        return self._visit("in", name, (args, kwargs),
                           lambda diff: self._input_finding(parent, name, module, diff))

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        name, _ = self.stack.pop()
        return self._visit("out", name, output,
                           lambda diff: Finding("mixes", name, module, diff))

    def running(self) -> tuple[str, nn.Module] | None:
        """The innermost call that has started and not returned (the one that raised)."""
        return self.stack[-1] if self.stack else None

    def _input_finding(self, parent: tuple[str, nn.Module] | None, name: str,
                       module: nn.Module, diff: str) -> Finding:
        if parent is None:
            return Finding("inputs", "", None, diff)
        return Finding("own_code", parent[0], parent[1], diff,
                       f"{type(module).__name__} at {name!r}")

    def _visit(self, kind: str, name: str, value: Any,
               finding: Callable[[str], Finding]) -> Any:
        self.events.append((kind, name, _clone(value)))
        if not self._aligned:
            return None
        position = len(self.events) - 1
        assert self.reference is not None
        if position >= len(self.reference) or self.reference[position][:2] != (kind, name):
            self._aligned = False  # control flow depends on the batch: stop comparing
            return None
        ref = self.reference[position][2]
        diff = self._difference(value, ref)
        if diff is not None:
            found = finding(diff)
            if found.name not in self.skip:
                self.findings.append(found)
        return self._forced(value, ref)

    def _pairs(self, value: Any, ref: Any) -> list[tuple[Any, Any]] | None:
        leaves, spec = pytree.tree_flatten(value)
        ref_leaves, ref_spec = pytree.tree_flatten(ref)
        return None if spec != ref_spec else list(zip(leaves, ref_leaves, strict=True))

    def _difference(self, value: Any, ref: Any) -> str | None:
        pairs = self._pairs(value, ref)
        if pairs is None:
            return "its structure differs"
        for cur, full in pairs:
            if isinstance(cur, torch.Tensor) and isinstance(full, torch.Tensor):
                expected = _align(cur, full, self.rows, self.total)
                if expected is None:
                    continue
                diff = difference(cur, expected, self.rtol, self.atol)
                if diff is not None:
                    return diff
        return None

    def _forced(self, value: Any, ref: Any) -> Any:
        pairs = self._pairs(value, ref)
        if pairs is None:
            return None
        out, changed = [], False
        for cur, full in pairs:
            expected = None
            if isinstance(cur, torch.Tensor) and isinstance(full, torch.Tensor):
                expected = _align(cur, full, self.rows, self.total)
            out.append(cur if expected is None else expected.clone())
            changed = changed or expected is not None
        if not changed:
            return None
        return pytree.tree_unflatten(out, pytree.tree_structure(value))
