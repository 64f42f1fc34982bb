"""``fdp.nn.SyncBatchNorm`` and ``convert_sync_batchnorm``: BatchNorm layers that synchronize."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from fdp._compat import BatchNormBase
from fdp._functionalize import uninitialized
from fdp.nn._sync_batch_norm import sync_batch_norm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class SyncBatchNorm(BatchNormBase):
    """BatchNorm (1d, 2d or 3d input) whose batch statistics span the replicas of a pmap axis.

    The forward is :func:`fdp.nn.sync_batch_norm`. In training mode with tracked statistics it
    *re-assigns* the buffers (``running_mean``, ``running_var``, ``num_batches_tracked``)
    rather than writing into them, so :func:`fdp.functionalize` returns the new values and the
    caller's tensors are never modified, also under ``vmap`` (inside :func:`fdp.pmap`).
    Outside any pmap it behaves as ``torch.nn.BatchNorm*d``. In eval mode without running
    statistics it uses (synchronized) batch statistics, as torch's BatchNorm does.

    Args:
        num_features: the number of channels ``C`` (dim 1 of the input).
        eps: added to the variance.
        momentum: the running-average factor, or ``None`` for the cumulative average.
        affine: learnable ``weight`` and ``bias``.
        track_running_stats: keep running statistics (used in eval mode).
        axis_name: the :func:`fdp.pmap` axis to synchronize over.
        device: where to create parameters and buffers.
        dtype: their dtype.
        bias: with ``affine``, whether to learn a ``bias`` too.

    Example:
        >>> bn = fdp.nn.SyncBatchNorm(3)
        >>> model = fdp.functionalize(bn)
        >>> mesh = fdp.Mesh(2)
        >>> f = fdp.pmap(model.apply, mesh, in_axes=(None, None, 0))
        >>> x = fdp.scatter(torch.randn(5, 3), mesh)  # 3 + 2 rows
        >>> out, new_buffers = f(model.params, model.buffers, x).data
        >>> out.shape, new_buffers["num_batches_tracked"].tolist(), bn.num_batches_tracked.item()
        (torch.Size([2, 3, 3]), [1, 1], 0)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        axis_name: str = "dp",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias)
        if not isinstance(axis_name, str) or not axis_name:
            raise TypeError(f"SyncBatchNorm: axis_name must be a non-empty str, got "
                            f"{axis_name!r}")
        self.axis_name = axis_name

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if not 2 <= input.dim() <= 5:
            raise ValueError(f"SyncBatchNorm: expected 2D to 5D input ([B, C, ...]), got "
                             f"{input.dim()}D input of shape {tuple(input.shape)}")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, axis_name={self.axis_name!r}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalizes ``input``; in training with tracked stats, re-assigns the buffers."""
        self._check_input_dim(input)
        update = self.training and self.track_running_stats
        use_buffers = not self.training or self.track_running_stats  # as torch's _BatchNorm
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        result = sync_batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            training=batch_stats,
            momentum=self.momentum,
            eps=self.eps,
            axis_name=self.axis_name,
            num_batches_tracked=self.num_batches_tracked if update else None,
        )
        if update:  # re-assign, never write in place (functionalize picks these up)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                if self._buffers.get(name) is not None:
                    self._buffers[name] = getattr(result, name)
        return result.out


def convert_sync_batchnorm(module: nn.Module, axis_name: str = "dp") -> nn.Module:
    """A copy of ``module`` whose BatchNorm layers are :class:`SyncBatchNorm` on ``axis_name``.

    ``BatchNorm1d``/``2d``/``3d`` and ``torch.nn.SyncBatchNorm`` layers (affine or not, with
    or without running statistics, any momentum) become :class:`SyncBatchNorm` with the same
    configuration, a copy of their parameters and buffers, and the same train/eval mode;
    existing :class:`SyncBatchNorm` layers get ``axis_name``. Everything else is deep-copied
    unchanged, so a model without BatchNorm gives a plain copy. ``module`` is not modified.

    Args:
        module: the model (or a single BatchNorm layer).
        axis_name: the :func:`fdp.pmap` axis the statistics are synchronized over.

    Returns:
        The converted copy.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> synced = fdp.nn.convert_sync_batchnorm(net)
        >>> type(synced[1]).__name__, synced[1].axis_name, type(net[1]).__name__
        ('SyncBatchNorm', 'dp', 'BatchNorm1d')
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_sync_batchnorm: module must be a torch.nn.Module, got "
                        f"{type(module).__name__}")
    if not isinstance(axis_name, str) or not axis_name:
        raise TypeError(f"convert_sync_batchnorm: axis_name must be a non-empty str, got "
                        f"{axis_name!r}")
    for name, sub in module.named_modules(prefix="module"):
        if isinstance(sub, BatchNormBase) and uninitialized(sub):
            raise ValueError(
                f"convert_sync_batchnorm: {name} is a {type(sub).__name__} whose parameters "
                f"are not initialized yet; run one forward pass before converting"
            )
    return _convert(copy.deepcopy(module), axis_name)


def replace_layers(module: nn.Module, swap: Callable[[nn.Module], nn.Module | None]
                   ) -> nn.Module:
    """``module`` (a private copy) with every layer for which ``swap`` returns a replacement
    replaced by it; ``swap`` returns ``None`` to keep a layer and look inside it."""
    new = swap(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        replaced = replace_layers(child, swap)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def _convert(module: nn.Module, axis_name: str) -> nn.Module:
    """Replaces BatchNorm layers in ``module`` (a private copy) and returns it."""
    return replace_layers(module, lambda m: _sync_layer(m, axis_name)
                          if isinstance(m, BatchNormBase) else None)


def _sync_layer(bn: BatchNormBase, axis_name: str) -> SyncBatchNorm:
    """A SyncBatchNorm that takes over ``bn``'s configuration and (copied) tensors."""
    out = SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine,
                        bn.track_running_stats, axis_name, device="meta",
                        bias=bn.bias is not None)
    for table in ("_parameters", "_buffers"):
        getattr(out, table).update(getattr(bn, table))
    out.train(bn.training)
    if hasattr(bn, "qconfig"):
        out.qconfig = bn.qconfig
    return out
