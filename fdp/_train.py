"""``fdp.TrainState`` and ``fdp.data_parallel_step``: one pure data-parallel training step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

from fdp import _check, _explain, _tree
from fdp._accumulate import accumulate
from fdp._donation import check_donate, check_not_donated, hand_over
from fdp._grad import value_and_grad
from fdp._mesh import Mesh, check_mesh
from fdp._step_memory import StepMemory
from fdp._tree import Params
from fdp._zero import ShardedOptState, check_sharded, init_sharded, sharded_update
from fdp.backends._base import SplitLoss
from fdp.backends._options import (
    BufferPolicy,
    Randomness,
    Reduction,
    SplitRule,
    Strategy,
    Unused,
)
from fdp.random import _key_words, fold_in

__all__ = ["TrainState", "data_parallel_step"]



class TrainState(NamedTuple):
    """Everything that changes during training, as one pytree of tensors.

    Attributes:
        params: parameter name -> tensor.
        buffers: buffer name -> tensor. Checkpointed with the rest; with
            ``data_parallel_step(..., with_buffers=True)`` the loss reads them, and with a
            ``buffer_policy`` the step also replaces them with the updated ones.
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
        *,
        mesh: Mesh | None = None,
        shard_optimizer_state: bool = False,
    ) -> TrainState:
        """A fresh state: ``optimizer.init(params)``, step 0, a generator seeded with ``seed``.

        ``params`` and ``buffers`` are copied, so later in-place changes to a module they came
        from do not reach the state.

        Args:
            params: parameter name -> tensor.
            optimizer: an :mod:`fdp.optim` ``GradientTransformation``.
            buffers: buffer name -> tensor (default: none).
            seed: seeds the state's ``rng``.
            mesh: the mesh the state is for; needed (only) with ``shard_optimizer_state``.
            shard_optimizer_state: split the optimizer state over ``mesh`` (ZeRO stage 1):
                ``opt_state`` is then an :class:`fdp.ShardedOptState` holding this process's
                slices, about ``1/N`` of the full state per replica; train it with
                ``fdp.data_parallel_step(..., shard_optimizer_state=True)``. See
                docs/training.md.

        Example:
            >>> state = fdp.TrainState.create({"w": torch.zeros(2)}, fdp.optim.sgd(0.1))
            >>> int(state.step)
            0
        """
        _check.param_dict(params, "TrainState.create")
        _check.param_dict({} if buffers is None else buffers, "TrainState.create", "buffers")
        _check_optimizer(optimizer, "TrainState.create")
        _check.integer(seed, "TrainState.create", "seed")
        if not isinstance(shard_optimizer_state, bool):
            raise TypeError(f"TrainState.create: shard_optimizer_state must be a bool, got "
                            f"{type(shard_optimizer_state).__name__}")
        if mesh is not None:
            check_mesh(mesh, "TrainState.create")
        if shard_optimizer_state and mesh is None:
            raise ValueError("TrainState.create: shard_optimizer_state=True splits the optimizer "
                             "state over a mesh; pass it: TrainState.create(params, optimizer, "
                             "mesh=mesh, shard_optimizer_state=True)")
        generator = torch.Generator().manual_seed(seed)
        opt_state = (init_sharded(params, optimizer, mesh)
                     if shard_optimizer_state and mesh is not None else optimizer.init(params))
        return cls(
            params={k: v.detach().clone() for k, v in params.items()},
            buffers={k: v.detach().clone() for k, v in (buffers or {}).items()},
            opt_state=opt_state,
            step=torch.zeros((), dtype=torch.int64),
            rng=generator.get_state(),
        )


def data_parallel_step(
    loss_fn: Callable[..., Any],
    optimizer: Any,
    mesh: Mesh,
    *,
    has_aux: bool = False,
    strategy: Strategy = "weighted",
    split: SplitRule = "chunk",
    dim: int = 0,
    reduction: Reduction = "mean",
    microbatches: int = 1,
    with_buffers: bool = False,
    buffer_policy: BufferPolicy | None = None,
    randomness: Randomness = "error",
    key: torch.Tensor | None = None,
    unused: Unused = "none",
    shard_optimizer_state: bool = False,
    donate: Literal["auto", "state", "none"] = "auto",
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]]:
    """Builds ``step(state, batch) -> (new_state, metrics)``: one data-parallel update.

    The step splits ``batch`` over ``mesh``, computes the single-device loss and gradient with
    :func:`fdp.value_and_grad` (optionally over ``microbatches`` slices, see
    :func:`fdp.accumulate`), and applies ``optimizer``. It is pure (unless built with
    ``donate="state"``): the input state is left as it was, and ``torch.compile(step)`` gives
    the eager numbers.

    Args:
        loss_fn: ``loss_fn(params, batch)``, the loss you would write for one device; with
            ``with_buffers``, ``loss_fn(params, buffers, batch)`` gets ``state.buffers``.
        optimizer: an :mod:`fdp.optim` ``GradientTransformation``.
        mesh: the mesh.
        has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` goes into ``metrics["aux"]``.
        strategy, split, dim, reduction, randomness: as for :func:`fdp.value_and_grad`
            (``randomness="different"`` for dropout; seed with ``torch.manual_seed``).
        microbatches: gradient accumulation: split the batch into this many slices and run
            them one after another (the same update as the full batch, less memory). Needs a
            loss that is a mean (or sum) of per-example terms, so not ``strategy="gather"``,
            and a named ``split`` rule (explicit sizes would describe one slice, not all).
        key: an :mod:`fdp.random` key for keyed random layers (:class:`fdp.nn.Dropout`):
            step ``t`` uses ``fdp.random.fold_in(key, t)``, in every replica, so a run is
            reproducible, resumes from a checkpoint with the same masks, and equals
            single-device training with the same key on every backend (docs/randomness.md).
        with_buffers: pass ``state.buffers`` to ``loss_fn`` (read-only: e.g. BatchNorm in eval
            mode; restored checkpoints then reach the model).
        buffer_policy: for layers that update buffers in training (BatchNorm):
            ``"replica0"`` (``nn.DataParallel``'s choice), ``"mean"`` (row-weighted average)
            or ``"sync"`` (layers converted with :func:`fdp.nn.convert_sync_batchnorm`
            compute their statistics over the whole mesh: equal to single-device training).
            ``loss_fn(params, buffers, batch)`` then returns ``(loss, new_buffers)``
            (``((loss, aux), new_buffers)`` with ``has_aux``) and the step stores the kept
            buffers in the new state. See docs/training.md.

        unused: ``"none"`` (default): a parameter that gets no gradient — frozen
            (``requires_grad=False`` in the module that :func:`fdp.functionalize` wrapped) or
            unused by the loss — is left as ``torch.optim`` leaves one whose ``.grad`` is
            ``None``: no update, no weight decay, its optimizer state unchanged. Under
            ``torch.compile`` this costs a graph break on the first call per batch shape,
            which ``fullgraph=True`` refuses; ``"zeros"`` gives such parameters a zero
            gradient instead (as ``torch.func.grad``), with no graph break.
        shard_optimizer_state: ZeRO stage 1: each replica keeps the optimizer state of one
            ``1/N`` slice of the flattened parameters and updates only that slice; the
            updated slices are all-gathered into the new params. The state must come from
            ``fdp.TrainState.create(..., mesh=mesh, shard_optimizer_state=True)``. The result
            equals the unsharded step (up to the rounding of a global norm's sum); every
            :mod:`fdp.optim` transformation works, a global-norm clip sums over all slices
            (:func:`fdp.optim.sum_over_shards`). See docs/training.md.
        donate: how the step may reuse memory; the results are bitwise those of ``"none"``
            either way (docs/training.md, "Donated steps").

            * ``"auto"`` (default): pure, and in place where nobody can tell: the step keeps
              the storage of the states it returned and writes a new state into one that no
              tensor uses any more (in ``state, m = step(state, batch)``, the state of two
              steps ago), so steady state allocates no parameter-size memory. A state you
              keep stays as it was (the step then allocates afresh). On CPU only; elsewhere,
              under ``torch.compile`` or a ``torch.func`` transform, with tensors that require
              grad, and with ``shard_optimizer_state``, the update is functional.
            * ``"state"``: the step consumes its input state (JAX's ``donate_argnums``) and
              writes the new params and optimizer state into its tensors, as
              ``torch.optim`` does. Passing the old state (or its tensors) to a step,
              :func:`fdp.value_and_grad`, an :mod:`fdp.optim` update or
              :func:`fdp.save_checkpoint` again raises a ValueError; reading its tensors
              directly shows the new values. Raises where it cannot write in place (under a
              ``torch.func`` transform, tensors requiring grad, two state tensors sharing
              memory); under ``torch.compile`` the update is functional in every mode.
            * ``"none"``: fresh tensors every step.

    Returns:
        ``step(state, batch)``; ``metrics`` holds ``"loss"`` (the full batch's loss) and
        ``"num_examples"`` (rows in the batch), and ``"aux"`` with ``has_aux`` (with
        ``microbatches > 1``: a list, one entry per non-empty slice).

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
    if key is not None:
        _key_words(key, "data_parallel_step")
    if not isinstance(shard_optimizer_state, bool):
        raise TypeError(f"data_parallel_step: shard_optimizer_state must be a bool, got "
                        f"{type(shard_optimizer_state).__name__}")
    check_mesh(mesh, "data_parallel_step")
    donate = check_donate(donate, "data_parallel_step")
    if donate == "state" and shard_optimizer_state:
        raise ValueError("data_parallel_step: donate='state' does not combine with "
                         "shard_optimizer_state=True (the sharded update is functional); use "
                         "donate='auto' or 'none'")

    _check_optimizer(optimizer, "data_parallel_step")
    memory = StepMemory(donate, optimizer)
    _check.callable_(loss_fn, "data_parallel_step", "loss_fn")
    _check.integer(microbatches, "data_parallel_step", "microbatches")
    if microbatches != 1 and strategy == "gather":
        raise ValueError("data_parallel_step: microbatches > 1 weights each slice's loss by its "
                         "rows, which is exact only for a mean of per-example terms; use "
                         "strategy='weighted' with accumulation")
    if microbatches != 1 and not isinstance(split, str):
        raise ValueError(f"data_parallel_step: split={list(split)} gives the sizes of one batch; "
                         f"with microbatches={microbatches} use split='chunk' or 'even'")
    if buffer_policy is not None and (with_buffers or microbatches != 1):
        raise ValueError("data_parallel_step: buffer_policy already passes state.buffers to "
                         "loss_fn (drop with_buffers=True), and it does not combine with "
                         "microbatches > 1 (each slice would update the buffers once)")
    fn = (lambda p, b, buffers: loss_fn(p, buffers, b)) if with_buffers else loss_fn
    if with_buffers and isinstance(loss_fn, SplitLoss):
        raise TypeError("data_parallel_step: with_buffers=True takes a plain loss_fn(params, "
                        "buffers, batch), not a split_loss")
    grad_fn = value_and_grad(fn, mesh, has_aux, strategy=strategy, split=split, dim=dim,
                             reduction=reduction, randomness=randomness,
                             buffer_policy=buffer_policy, unused=unused)
    needs = ("buffer_policy=" + repr(buffer_policy) if buffer_policy is not None
             else "with_buffers=True" if with_buffers else None)
    if microbatches != 1:
        grad_fn = accumulate(grad_fn, microbatches, has_aux=has_aux, dim=dim,
                             reduction=reduction)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
        if not isinstance(state, TrainState):
            raise TypeError(f"step: state must be an fdp.TrainState, got "
                            f"{type(state).__name__}; build one with fdp.TrainState.create")
        check_not_donated(state, "step", "state")
        buffers = state.buffers
        keyed = {} if key is None else {"key": fold_in(key, state.step)}
        try:
            if buffer_policy is not None:
                (out, buffers), grads = grad_fn(state.params, state.buffers, batch, **keyed)
            else:
                out, grads = grad_fn(state.params, batch, *((buffers,) if with_buffers else ()),
                                     **keyed)
        except (ValueError, TypeError, KeyError) as e:
            if (better := _explained(e, state, loss_fn, needs)) is None:
                raise
            raise better from e
        loss, aux = out if has_aux else (out, None)
        donated = False
        if shard_optimizer_state:
            sharded = check_sharded(state.opt_state, mesh, "data_parallel_step")
            params, opt_state = sharded_update(optimizer, mesh, grads, sharded, state.params)
        else:
            _not_sharded(state.opt_state)
            params, opt_state, donated = memory.update(optimizer, grads, state)
        new_state = state._replace(params=params, buffers=buffers, opt_state=opt_state,
                                   step=state.step + 1)
        if donated:
            new_state = hand_over(state, new_state)
        metrics: dict[str, Any] = {
            "loss": loss,
            "num_examples": torch.tensor(_rows(batch, dim), dtype=torch.int64),
        }
        if has_aux:
            metrics["aux"] = aux
        return new_state, metrics

    return step


def _explained(error: Exception, state: TrainState, loss_fn: Callable[..., Any],
               needs: str | None) -> Exception | None:
    """The step's error for a loss that needs buffers (``needs``: the option that passes them)
    where the state has none, or a loss_fn whose arguments do not fit the options."""
    fn = "data_parallel_step"
    if needs is None:
        return None
    if not state.buffers and (isinstance(error, KeyError) or "buffers" in str(error)):
        return ValueError(
            f"{fn}: {needs} passes state.buffers to loss_fn, but state.buffers is empty; build "
            f"the state with the model's buffers: fdp.TrainState.create(params, optimizer, "
            f"buffers=model.buffers)"
        )
    return _explain.arity(error, fn, loss_fn, 3,
                          f"with {needs} it is called as loss_fn(params, buffers, batch)")


def _not_sharded(opt_state: Any) -> None:
    if isinstance(opt_state, ShardedOptState):
        raise ValueError("data_parallel_step: state.opt_state is sharded over a mesh "
                         "(fdp.ShardedOptState); train it with data_parallel_step(..., "
                         "shard_optimizer_state=True)")


def _check_optimizer(optimizer: Any, fn: str) -> None:
    for name in ("init", "update"):
        if not callable(getattr(optimizer, name, None)):
            raise TypeError(f"{fn}: optimizer must be an fdp.optim GradientTransformation "
                            f"(with init and update), e.g. fdp.optim.adam(1e-3); got "
                            f"{type(optimizer).__name__}")


def _rows(batch: Any, dim: int) -> int:
    """Rows in a batch that value_and_grad has already validated."""
    first = next(x for x in _tree.flatten(batch)[0] if isinstance(x, torch.Tensor))
    return first.shape[dim]
