"""``fdp.TrainState`` and ``fdp.data_parallel_step``: one pure data-parallel training step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fdp import _check, _tree
from fdp._accumulate import accumulate
from fdp._grad import value_and_grad
from fdp._layout import SplitRule
from fdp._mesh import Mesh

__all__ = ["TrainState", "data_parallel_step"]

Params = dict[str, torch.Tensor]


class TrainState(NamedTuple):
    """Everything that changes during training, as one pytree of tensors.

    Attributes:
        params: parameter name -> tensor.
        buffers: buffer name -> tensor (carried and checkpointed; a DP step leaves them as is).
        opt_state: the optimizer's state (a pytree of tensors).
        step: number of steps taken, an int64 0-d tensor.
        rng: the state of a ``torch.Generator`` (uint8 tensor) for the training loop's own
            randomness, e.g. shuffling; restore it with ``generator.set_state(state.rng)``.
    """

    params: Params
    buffers: Params
    opt_state: Any
    step: torch.Tensor
    rng: torch.Tensor

    @classmethod
    def create(
        cls,
        params: Params,
        optimizer: Any,
        buffers: Params | None = None,
        seed: int = 0,
    ) -> TrainState:
        """A fresh state: ``optimizer.init(params)``, step 0, a generator seeded with ``seed``.

        Example:
            >>> state = fdp.TrainState.create({"w": torch.zeros(2)}, fdp.optim.sgd(0.1))
            >>> int(state.step)
            0
        """
        _check.param_dict(params, "TrainState.create")
        generator = torch.Generator().manual_seed(seed)
        return cls(
            params=dict(params),
            buffers=dict(buffers or {}),
            opt_state=optimizer.init(params),
            step=torch.zeros((), dtype=torch.int64),
            rng=generator.get_state(),
        )


def data_parallel_step(
    loss_fn: Callable[[Params, Any], Any],
    optimizer: Any,
    mesh: Mesh,
    *,
    has_aux: bool = False,
    strategy: str = "weighted",
    split: SplitRule = "chunk",
    dim: int = 0,
    reduction: str = "mean",
    microbatches: int = 1,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]]:
    """Builds ``step(state, batch) -> (new_state, metrics)``: one data-parallel update.

    The step splits ``batch`` over ``mesh``, computes the single-device loss and gradient with
    :func:`fdp.value_and_grad` (optionally over ``microbatches`` slices, see
    :func:`fdp.accumulate`), and applies ``optimizer``. It is pure: the input state is left as
    it was, and ``torch.compile(step)`` gives the eager numbers.

    Args:
        loss_fn: ``loss_fn(params, batch)``, the loss you would write for one device.
        optimizer: an :mod:`fdp.optim` ``GradientTransformation``.
        mesh: the mesh.
        has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` goes into ``metrics["aux"]``.
        strategy, split, dim, reduction: as for :func:`fdp.value_and_grad`.
        microbatches: gradient accumulation: split the batch into this many slices and run
            them one after another (the same update as the full batch, less memory).

    Returns:
        ``step(state, batch)``; ``metrics`` holds ``"loss"`` (the full batch's loss) and
        ``"num_examples"`` (rows in the batch), and ``"aux"`` with ``has_aux``.

    Example:
        >>> model = fdp.functionalize(torch.nn.Linear(3, 1))
        >>> def loss_fn(params, batch):
        ...     out, _ = model.apply(params, model.buffers, batch["x"])
        ...     return ((out - batch["y"]) ** 2).mean()
        >>> optimizer = fdp.optim.sgd(0.1)
        >>> step = fdp.data_parallel_step(loss_fn, optimizer, fdp.Mesh(4))
        >>> state = fdp.TrainState.create(model.params, optimizer)
        >>> state, metrics = step(state, {"x": torch.randn(10, 3), "y": torch.randn(10, 1)})
        >>> int(state.step), int(metrics["num_examples"])
        (1, 10)
    """
    from fdp.optim import apply_updates

    for name in ("init", "update"):
        if not callable(getattr(optimizer, name, None)):
            raise TypeError(f"data_parallel_step: optimizer must be an fdp.optim "
                            f"GradientTransformation (with init and update), got "
                            f"{type(optimizer).__name__}")
    grad_fn = value_and_grad(loss_fn, mesh, has_aux, strategy=strategy, split=split, dim=dim,
                             reduction=reduction)
    if microbatches != 1:
        grad_fn = accumulate(grad_fn, microbatches, has_aux=has_aux, dim=dim,
                             reduction=reduction)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
        if not isinstance(state, TrainState):
            raise TypeError(f"step: state must be an fdp.TrainState, got "
                            f"{type(state).__name__}; build one with fdp.TrainState.create")
        out, grads = grad_fn(state.params, batch)
        loss, aux = out if has_aux else (out, None)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = state._replace(params=apply_updates(state.params, updates),
                                   opt_state=opt_state, step=state.step + 1)
        metrics: dict[str, Any] = {
            "loss": loss,
            "num_examples": torch.tensor(_rows(batch, dim), dtype=torch.int64),
        }
        if has_aux:
            metrics["aux"] = aux
        return new_state, metrics

    return step


def _rows(batch: Any, dim: int) -> int:
    """Rows in a batch that value_and_grad has already validated."""
    first = next(x for x in _tree.flatten(batch)[0] if isinstance(x, torch.Tensor))
    return first.shape[dim]
