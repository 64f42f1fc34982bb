"""``fdp.nn.sync_batch_norm``: batch normalization whose statistics span all replicas.

Inside :func:`fdp.pmap` the per-channel statistics are sums over every replica's real rows,
formed with :func:`fdp.psum` (whose transpose is ``psum``, so autograd through them is exact).
The result equals ``torch.nn.functional.batch_norm`` on the concatenated batch: outputs,
gradients and running statistics. Outside any pmap it is single-device batch norm.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from fdp import _check
from fdp._collectives import psum
from fdp._compat import compiling
from fdp.backends._frame import AxisFrame, bound_frames, lookup

__all__ = ["BatchNormResult", "sync_batch_norm"]

_FN = "sync_batch_norm"


class BatchNormResult(NamedTuple):
    """What :func:`sync_batch_norm` returns: the output and the *new* running statistics.

    Attributes:
        out: the normalized input, same shape and dtype as ``x``.
        running_mean: the updated running mean, or the one given (eval mode), or ``None``.
        running_var: the updated running variance (unbiased), likewise.
        num_batches_tracked: the incremented counter, or the one given, or ``None``.
    """

    out: torch.Tensor
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None


def sync_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis_name: str = "dp",
    num_batches_tracked: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> BatchNormResult:
    """Batch norm with statistics over all replicas of ``axis_name``; a pure function.

    Channels are dim 1, as in ``torch.nn.functional.batch_norm`` (``x`` of shape ``[B, C]``,
    ``[B, C, L]``, ``[B, C, H, W]`` or ``[B, C, D, H, W]``). In training, the mean and the
    biased variance are taken over every real row of every replica (and all spatial
    positions), in two passes: ``mean = psum(Σ x) / count``, then
    ``var = psum(Σ (x - mean)²) / count``. Padding rows of an uneven :func:`fdp.scatter`
    (the row mask that :func:`fdp.pmap` binds) and rows where ``mask`` is False are left out;
    a replica without real rows contributes nothing. Outside any pmap the statistics are this
    batch's own. Nothing given is written to: the new running statistics are returned.

    Args:
        x: the input, floating point, channels at dim 1.
        running_mean: ``[C]`` running mean, or ``None`` to track none.
        running_var: ``[C]`` running (unbiased) variance, or ``None``; give both or neither.
        weight: ``[C]`` scale, or ``None``.
        bias: ``[C]`` shift, or ``None``.
        training: ``True`` normalizes with batch statistics (and updates the running ones);
            ``False`` with the running statistics, without any collective.
        momentum: the running-average factor, as torch's ``BatchNorm``:
            ``new = (1 - momentum) * old + momentum * batch_stat``. ``None`` gives the
            cumulative average (factor ``1 / num_batches_tracked`` after incrementing it).
        eps: added to the variance before the square root.
        axis_name: the pmap axis to synchronize over. When no pmap is running the statistics
            are local; inside a pmap that does not bind this name it is an error.
        num_batches_tracked: an integer scalar tensor, incremented in training when running
            statistics are tracked; required for ``momentum=None``.
        mask: ``[B]`` bool, True on the rows of ``x`` that count. Default: the row mask of an
            uneven :func:`fdp.scatter` (all rows when the shards are even or outside pmap).

    Returns:
        A :class:`BatchNormResult` ``(out, running_mean, running_var, num_batches_tracked)``.

    Raises:
        TypeError: ``x`` is not a floating-point tensor, or an argument has the wrong type.
        ValueError: wrong shapes, an unbound axis name inside pmap, or one value or fewer per
            channel over all replicas in training.

    Example:
        >>> mesh = fdp.Mesh(2)
        >>> x = torch.tensor([[1.0], [2.0], [3.0], [6.0], [8.0]])  # 3 + 2 rows: uneven
        >>> bn = lambda x: fdp.nn.sync_batch_norm(x, None, None, None, None).out
        >>> out = fdp.gather(fdp.pmap(bn, mesh)(fdp.scatter(x, mesh)), mesh)
        >>> torch.allclose(out, torch.nn.functional.batch_norm(x, None, None, training=True))
        True
    """
    channels = _check_inputs(x, running_mean, running_var, weight, bias, num_batches_tracked)
    _check_options(training, momentum, eps, axis_name)
    if not training:
        return _with_running_stats(x, running_mean, running_var, weight, bias, eps,
                                   num_batches_tracked)
    tracked = running_mean is not None
    if tracked and momentum is None and num_batches_tracked is None:
        raise ValueError(
            f"{_FN}: momentum=None (cumulative moving average) needs num_batches_tracked; "
            f"pass it (e.g. torch.tensor(0)) or give a float momentum"
        )
    frame = _frame(axis_name)
    mean, var, count = _batch_stats(x, _row_mask(mask, frame, x), frame, channels)
    out = _affine((x - _per_channel(mean, x)) * torch.rsqrt(_per_channel(var, x) + eps),
                  weight, bias)
    if running_mean is None or running_var is None:
        return BatchNormResult(out, None, None, num_batches_tracked)
    return BatchNormResult(out, *_update_running(running_mean, running_var, mean, var, count,
                                                 momentum, num_batches_tracked))


def _with_running_stats(x: torch.Tensor, running_mean: torch.Tensor | None,
                        running_var: torch.Tensor | None, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float,
                        num_batches_tracked: torch.Tensor | None) -> BatchNormResult:
    """Eval mode: normalize with the running statistics; no collective, nothing updated."""
    if running_mean is None or running_var is None:
        raise ValueError(
            f"{_FN}: training=False normalizes with the running statistics, but "
            f"running_mean and running_var are None; pass them, or use training=True"
        )
    rstd = torch.rsqrt(_per_channel(running_var, x) + eps)
    out = _affine((x - _per_channel(running_mean, x)) * rstd, weight, bias)
    return BatchNormResult(out, running_mean, running_var, num_batches_tracked)


def _update_running(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                    var: torch.Tensor, count: Any, momentum: float | None,
                    num_batches_tracked: torch.Tensor | None) -> tuple:
    """New running mean, unbiased running variance and batch counter, as torch's _BatchNorm."""
    new_count = None if num_batches_tracked is None else num_batches_tracked + 1
    factor: Any = momentum
    if momentum is None:  # cumulative moving average (sync_batch_norm checked the counter)
        assert new_count is not None
        factor = 1.0 / new_count.to(running_mean.dtype)
    if isinstance(count, torch.Tensor):  # an int64 count (summed over replicas or masked)
        count = count.to(var.dtype)
    unbiased = var.detach() * (count / (count - 1))
    new_mean = (1 - factor) * running_mean + factor * mean.detach().to(running_mean.dtype)
    new_var = (1 - factor) * running_var + factor * unbiased.to(running_var.dtype)
    return new_mean, new_var, new_count


def _check_inputs(x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any,
                  num_batches_tracked: Any) -> int:
    """Types and shapes; returns the number of channels."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_FN}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{_FN}: x must be floating point, got {x.dtype}; cast it, e.g. "
                        f"x.float()")
    if x.dim() < 2:
        raise ValueError(f"{_FN}: x must have a batch and a channel dim ([B, C, ...]), got "
                         f"shape {tuple(x.shape)}")
    channels = x.shape[1]
    for name, value in (("running_mean", running_mean), ("running_var", running_var),
                        ("weight", weight), ("bias", bias)):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{_FN}: {name} must be a tensor or None, got "
                            f"{type(value).__name__}")
        if tuple(value.shape) != (channels,):
            raise ValueError(
                f"{_FN}: {name} has shape {tuple(value.shape)} but x has {channels} channels "
                f"(dim 1 of shape {tuple(x.shape)}); give one entry per channel, shape "
                f"({channels},)"
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{_FN}: give both running_mean and running_var, or neither (got "
                         f"only {'running_mean' if running_var is None else 'running_var'})")
    if num_batches_tracked is not None and (
        not isinstance(num_batches_tracked, torch.Tensor) or num_batches_tracked.dim() != 0
    ):
        raise TypeError(f"{_FN}: num_batches_tracked must be a scalar tensor or None, e.g. "
                        f"torch.tensor(0)")
    return channels


def _check_options(training: Any, momentum: Any, eps: Any, axis_name: Any) -> None:
    if not isinstance(training, bool):
        raise TypeError(f"{_FN}: training must be a bool, got {type(training).__name__}")
    if momentum is not None and not _check.is_number(momentum):
        raise TypeError(f"{_FN}: momentum must be a float or None, got "
                        f"{type(momentum).__name__}")
    if not _check.is_number(eps) or not eps >= 0:
        raise ValueError(f"{_FN}: eps must be a non-negative float, got {eps!r}")
    if not isinstance(axis_name, str):
        raise TypeError(f"{_FN}: axis_name must be a str, got {type(axis_name).__name__}")


def _frame(axis_name: str) -> AxisFrame | None:
    """The bound frame of ``axis_name``; ``None`` outside any pmap (local statistics)."""
    if not bound_frames():
        return None
    return lookup(axis_name, _FN)  # raises for a name this pmap does not bind


def _row_mask(mask: Any, frame: AxisFrame | None,
              x: torch.Tensor) -> torch.Tensor | None:
    """The explicit ``mask``, else the pmap's padding mask; checked against ``x``'s rows."""
    name = "mask"
    if mask is None and frame is not None and frame.mask is not None:
        mask, name = frame.mask, "the row mask of the uneven fdp.scatter"
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{_FN}: mask must be a bool tensor, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != (x.shape[0],):
        raise ValueError(
            f"{_FN}: {name} has shape {tuple(mask.shape)} but x has {x.shape[0]} rows (dim 0 "
            f"of shape {tuple(x.shape)}); pass mask=, a [B] bool tensor that marks x's real "
            f"rows"
        )
    return mask


def _batch_stats(x: torch.Tensor, mask: torch.Tensor | None,
                 frame: AxisFrame | None,
                 channels: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Mean, biased variance and value count per channel over all replicas' real rows."""
    dims = [0, *range(2, x.dim())]
    spatial = math.prod(x.shape[2:])
    rows = None if mask is None else mask.reshape(-1, *([1] * (x.dim() - 1)))

    def masked_sum(value: torch.Tensor) -> torch.Tensor:
        # where, not a product with the mask: padding rows must not reach sums or gradients
        return (value if rows is None else torch.where(rows, value, 0)).sum(dims)

    if frame is None:
        count: Any = x.shape[0] * spatial if mask is None else mask.sum() * spatial
        sums = masked_sum(x)
    else:
        sums, count = psum((masked_sum(x), _local_count(x, mask, spatial, frame)), frame.name)
    _check_count(_count_to_check(count, x, spatial, mask, frame), x, channels)
    mean = sums / count
    centered = x - _per_channel(mean, x)
    var = masked_sum(centered * centered)
    return mean, (var if frame is None else psum(var, frame.name)) / count, count


def _local_count(x: torch.Tensor, mask: torch.Tensor | None, spatial: int,
                 frame: AxisFrame) -> torch.Tensor:
    """This replica's number of values per channel, an int64 tensor.

    Built like ``frame.index`` (one value per replica), so that ``psum`` adds the counts of the
    replicas that actually run, rather than multiplying one count by the axis size.
    """
    if mask is not None:
        return mask.sum() * spatial
    return torch.full_like(frame.index, x.shape[0] * spatial)


def _count_to_check(count: Any, x: torch.Tensor, spatial: int, mask: torch.Tensor | None,
                    frame: AxisFrame | None) -> Any:
    """The total count the ``> 1`` check reads, without a device sync where possible.

    The summed count is exact (it also counts only replicas that actually ran), and reading it
    on the CPU costs nothing eagerly. On an accelerator, or under torch.compile (where reading
    it would break the graph), when there is no mask and every replica holds
    x's shape (the vmap backend), the count the shapes imply is read instead: no sync.
    Threads/processes may hold different row counts, so there the summed count is read.
    """
    on_cpu = not isinstance(count, torch.Tensor) or count.device.type == "cpu"
    shapes_agree = mask is None and (frame is None or frame.comm is None)
    if (on_cpu and not compiling()) or not shapes_agree:  # compiled: .item() would break
        return count
    return x.shape[0] * spatial * (frame.size if frame else 1)


def _check_count(count: Any, x: torch.Tensor, channels: int) -> None:
    """Batch statistics need two or more values per channel (torch raises likewise)."""
    if isinstance(count, torch.Tensor):
        try:
            count = count.item()
        except RuntimeError:  # batched under an outer vmap: cannot be checked eagerly
            return
    if count <= 1:
        raise ValueError(
            f"BatchNorm needs more than 1 value per channel in training; got {count} "
            f"(real rows x spatial positions) over all replicas, for x of per-replica shape "
            f"{tuple(x.shape)} with {channels} channels. Use a larger batch, or "
            f"training=False to normalize with the running statistics"
        )


def _per_channel(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return value.reshape(1, -1, *([1] * (x.dim() - 2)))


def _affine(xhat: torch.Tensor, weight: torch.Tensor | None,
            bias: torch.Tensor | None) -> torch.Tensor:
    out = xhat if weight is None else xhat * _per_channel(weight, xhat)
    return out if bias is None else out + _per_channel(bias, xhat)
