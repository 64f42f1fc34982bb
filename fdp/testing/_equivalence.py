"""``fdp.testing.assert_dp_equivalent``: does a model train the same under data parallelism?"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from fdp._functionalize import Model
from fdp._layout import split_sizes
from fdp._mesh import Mesh
from fdp.backends._options import BufferPolicy, Randomness, Reduction, SplitRule, Strategy
from fdp.testing._diagnose import diagnose
from fdp.testing._runs import Trajectory, data_parallel, single_device
from fdp.testing._spec import FN, Spec, cuda_indices, make_spec, meshes
from fdp.testing._trace import difference, scale

__all__ = ["assert_dp_equivalent"]

_MAX_LINES = 4


class Mismatch(NamedTuple):
    label: str  # e.g. "grads['fc.weight']"
    buffer: str | None  # the buffer's name when a buffer differs
    detail: str


def assert_dp_equivalent(
    model_or_apply: nn.Module | Model,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: Any,
    mesh: Mesh | Sequence[Mesh] | None = None,
    *,
    inputs: Callable[[Any], Any] | None = None,
    split: SplitRule = "chunk",
    steps: int = 1,
    optimizer: Any = None,
    buffer_policy: BufferPolicy | None = None,
    strategy: Strategy = "weighted",
    reduction: Reduction = "mean",
    randomness: Randomness = "error",
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Checks that a model trains identically under data parallelism and on one device.

    The single-device run is plain PyTorch autograd on the whole batch (on a deep copy of the
    module, or on ``model.apply``); the data-parallel run is :func:`fdp.value_and_grad` and,
    when training, :func:`fdp.data_parallel_step` on ``mesh``. Compared: the loss, the
    gradients, the new buffers, and after each of ``steps`` optimizer steps the loss, params
    and buffers. Nothing given is modified (torch's RNG state included).

    Args:
        model_or_apply: an ``nn.Module`` (run in its current train/eval mode) or an
            :class:`fdp.Model` from :func:`fdp.functionalize`.
        loss_fn: ``loss_fn(outputs, batch) -> scalar``: the criterion on the model's outputs,
            a mean over the batch's examples (a sum with ``reduction="sum"``; anything with
            ``strategy="gather"``).
        batch: a tree of tensors with the examples along dim 0 (other leaves are constants).
        mesh: an :class:`fdp.Mesh` or a sequence of them, each checked; default ``Mesh(4)``.
        inputs: ``inputs(batch)``: what the model is called with, one value or
            :class:`Args`. Default: the batch itself if it is a tensor, else ``batch[0]``
            or ``batch["x"]``. It is called on each replica's shard too.
        split: how the batch is split over the replicas: ``"chunk"``, ``"even"`` or a list
            of row counts (see :func:`fdp.scatter`).
        steps: optimizer steps to compare (on the same batch); 1 compares one loss and
            gradient unless ``optimizer`` is given.
        optimizer: an :mod:`fdp.optim` optimizer for the steps; default
            ``fdp.optim.sgd(0.1)``.
        buffer_policy: ``None``, ``"replica0"``, ``"mean"`` or ``"sync"`` (see
            :func:`fdp.value_and_grad`). Without one, a model whose buffers change in
            training fails the check.
        strategy, reduction, randomness: as for :func:`fdp.value_and_grad`.
        rtol, atol: each value passes when ``max|dp - single| <= rtol * max|single| + atol``;
            default by dtype: float64 ``1e-10, 1e-13``, float32 ``1e-5, 1e-7``.

    Raises:
        AssertionError: when a value differs or the data-parallel run raises (chained). The
            message names the quantities that differ and the culprit: the layer whose output
            rows on a replica's shard differ from the full batch's (per-replica BatchNorm
            statistics, a layer mixing examples, a random layer), a buffer the policy cannot
            combine, or a loss that is not a per-example mean.
        TypeError, ValueError: for invalid arguments. Errors of the single-device run
            propagate unchanged.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                           torch.nn.Linear(4, 1)).double()
        >>> batch = (torch.randn(10, 3, dtype=torch.float64),
        ...          torch.randn(10, 1, dtype=torch.float64))
        >>> def mse(out, batch):
        ...     return ((out - batch[1]) ** 2).mean()
        >>> fdp.testing.assert_dp_equivalent(net, mse, batch, fdp.Mesh(3), steps=2)
    """
    spec = make_spec(model_or_apply, loss_fn, batch, inputs, split, steps, optimizer,
                 buffer_policy, strategy, reduction, randomness, rtol, atol)
    targets = meshes(mesh)
    plans = [(m, split_sizes(spec.rows, m.size, split, FN)) for m in targets]
    with torch.random.fork_rng(devices=cuda_indices(targets)):
        expected = single_device(spec)
        for m, sizes in plans:
            _check_mesh(spec, m, sizes, expected)


# --- comparing and reporting ------------------------------------------------------------------

def _compare(actual: Trajectory, expected: Trajectory, spec: Spec) -> list[Mismatch]:
    found = _differ("loss", actual.loss, expected.loss, spec)
    found += _differ_dict("grads", actual.grads, expected.grads, spec)
    found += _differ_dict("buffers", actual.buffers, expected.buffers, spec)
    for i, (a, e) in enumerate(zip(actual.steps, expected.steps, strict=True)):
        if found:
            break
        after = f" after step {i + 1}"
        found += _differ(f"loss at step {i + 1}", a[0], e[0], spec)
        found += _differ_dict("params", a[1], e[1], spec, after)
        found += _differ_dict("buffers", a[2], e[2], spec, after)
    return found


def _differ(label: str, actual: Any, expected: Any, spec: Spec,
            buffer: str | None = None, floor: float = 0.0) -> list[Mismatch]:
    if actual is None or expected is None:  # no gradient: frozen, or unused by the loss
        if actual is None and expected is None:
            return []
        where = "the data-parallel run" if actual is None else "single-device training"
        return [Mismatch(label, buffer, f"no gradient (None) in {where} only")]
    if not isinstance(actual, torch.Tensor):
        return [Mismatch(label, buffer, f"got {type(actual).__name__}")]
    diff = difference(actual, expected, spec.rtol, spec.atol, floor)
    return [] if diff is None else [Mismatch(label, buffer, diff)]


def _differ_dict(root: str, actual: dict, expected: dict, spec: Spec,
                 suffix: str = "") -> list[Mismatch]:
    if actual.keys() != expected.keys():
        return [Mismatch(root + suffix, None, f"keys {sorted(actual)} vs single-device "
                                              f"{sorted(expected)}")]
    found, floor = [], scale(expected)
    for key, e in expected.items():
        buffer = key if root == "buffers" else None
        found += _differ(f"{root}[{key!r}]{suffix}", actual[key], e, spec, buffer, floor)
    return found


def _check_mesh(spec: Spec, mesh: Mesh, sizes: tuple[int, ...], expected: Trajectory) -> None:
    try:
        actual = data_parallel(spec, mesh)
    except Exception as e:
        head = (f"data-parallel training raised {type(e).__name__} where single-device "
                f"training runs: {_first_line(e)}")
        raise AssertionError(_report(spec, mesh, sizes, head, [],
                                     diagnose(spec, sizes, [], True, mesh.backend.ragged))) from e
    found = _compare(actual, expected, spec)
    if found:
        head = "data-parallel training differs from single-device training"
        bad_buffers = list(dict.fromkeys(m.buffer for m in found if m.buffer is not None))
        culprits = diagnose(spec, sizes, bad_buffers, False,
                            mesh.backend.ragged)
        raise AssertionError(_report(spec, mesh, sizes, head, found, culprits))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().split("\n")[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _report(spec: Spec, mesh: Mesh, sizes: tuple[int, ...], head: str,
            found: list[Mismatch], culprits: list[str]) -> str:
    setup = (f"mesh of {mesh.size} ({mesh.backend_name}), split={spec.split!r}: "
             f"{spec.rows} rows -> {sizes}, buffer_policy={spec.buffer_policy!r}")
    lines = [f"{FN}: {head}", f"  setup: {setup}"]
    for m in found[:_MAX_LINES]:
        lines.append(f"  differs: {m.label}: {m.detail}")
    if len(found) > _MAX_LINES:
        lines.append(f"  ... and {len(found) - _MAX_LINES} more")
    lines += [f"  culprit: {c}" for c in culprits]
    return "\n".join(lines)
