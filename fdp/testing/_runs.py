"""The two runs that :func:`fdp.testing.assert_dp_equivalent` compares."""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch

from fdp._functionalize import Model, functionalize
from fdp._grad import split_loss, value_and_grad
from fdp._mesh import Mesh
from fdp._train import TrainState, data_parallel_step
from fdp.testing._spec import FN, Spec, call_args

__all__ = ["Trajectory", "data_parallel", "single_device"]


class Trajectory(NamedTuple):
    """What a run produced: the first step's loss, gradients and new buffers, then per
    training step ``(loss, params after, buffers after)``."""

    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    steps: list[tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]]


def _optimizer(spec: Spec) -> Any:
    from fdp.optim import sgd

    return spec.optimizer if spec.optimizer is not None else sgd(0.1)


class _SingleDevice:
    """Plain autograd on the whole batch: a deep copy of the module, or ``model.apply``. As
    with torch.optim, a frozen parameter (``requires_grad=False``) or one the loss does not use
    gets no gradient (``None``), which the optimizer skips."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        if spec.module is not None:
            self.module = copy.deepcopy(spec.module)
            self.params: dict[str, torch.Tensor] = dict(self.module.named_parameters())
        else:
            self.params = {k: v.detach().clone().requires_grad_(True)
                           for k, v in spec.params.items()}
            self.buffers = {k: v.detach().clone() for k, v in spec.buffers.items()}

    def loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        spec = self.spec
        if spec.module is None:
            out, new = spec.forward(self.params, self.buffers, spec.batch)
            self.buffers = {k: v.detach() for k, v in new.items()}
        else:
            args, kwargs = call_args(spec.inputs(spec.batch))
            out = self.module(*args, **kwargs)
            self.buffers = {k: v.detach().clone() for k, v in self.module.named_buffers()}
        return _scalar(spec.loss_fn(out, spec.batch)), self.buffers

    def set_params(self, new: dict[str, torch.Tensor]) -> None:
        if self.spec.module is None:
            self.params = {k: v.detach().clone().requires_grad_(True) for k, v in new.items()}
            return
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(new[k])


def _scalar(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        got = (f"{loss.dtype}{list(loss.shape)}" if isinstance(loss, torch.Tensor)
               else type(loss).__name__)
        raise ValueError(f"{FN}: loss_fn(outputs, batch) must return a floating-point scalar "
                         f"tensor, got {got}; reduce it, e.g. with .mean()")
    return loss


def single_device(spec: Spec) -> Trajectory:
    from fdp.optim import apply_updates

    run = _SingleDevice(spec)
    optimizer = _optimizer(spec)
    opt_state = optimizer.init({k: v.detach() for k, v in run.params.items()})
    first, steps = None, []
    for _ in range(spec.steps if spec.trains else 1):
        loss, buffers = run.loss()
        grads = _grads(loss, run.params)
        if first is None:
            first = (loss.detach(), grads, buffers)
        if spec.trains:
            params = {k: v.detach().clone() for k, v in run.params.items()}
            updates, opt_state = optimizer.update(grads, opt_state, params)
            run.set_params(apply_updates(params, updates))
            steps.append((loss.detach(), {k: v.detach().clone() for k, v in
                                          run.params.items()}, buffers))
    assert first is not None
    return Trajectory(*first, steps)


def _dp_loss(spec: Spec, model: Model) -> Any:
    def forward(params: dict, buffers: dict, batch: Any) -> tuple[Any, dict]:
        args, kwargs = call_args(spec.inputs(batch))
        return model.apply(params, buffers, *args, **kwargs)

    if spec.strategy == "gather":
        return split_loss(lambda p, b: forward(p, model.buffers, b)[0], spec.loss_fn)
    if spec.buffer_policy is None:
        return lambda p, b: spec.loss_fn(forward(p, model.buffers, b)[0], b)

    def with_buffers(params: dict, buffers: dict, batch: Any) -> tuple[Any, dict]:
        out, new = forward(params, buffers, batch)
        return spec.loss_fn(out, batch), new

    return with_buffers


def _grads(loss: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``None`` for a parameter that is frozen or that the loss does not reach."""
    tracked = [k for k, p in params.items() if p.requires_grad]
    found = torch.autograd.grad(loss, [params[k] for k in tracked], allow_unused=True) \
        if tracked and loss.requires_grad else [None] * len(tracked)
    grads: dict[str, Any] = dict.fromkeys(params)
    grads.update({k: None if g is None else g.detach()
                  for k, g in zip(tracked, found, strict=True)})
    return grads


def data_parallel(spec: Spec, mesh: Mesh) -> Trajectory:
    if spec.model is not None:
        model = spec.model
    else:
        assert spec.module is not None
        model = functionalize(copy.deepcopy(spec.module))
    loss_fn = _dp_loss(spec, model)
    grad_fn = value_and_grad(loss_fn, mesh, split=spec.split, strategy=spec.strategy,
                             reduction=spec.reduction, randomness=spec.randomness,
                             buffer_policy=spec.buffer_policy, unused="none")
    if spec.buffer_policy is None:
        (loss, grads), buffers = grad_fn(model.params, spec.batch), model.buffers
    else:
        (loss, buffers), grads = grad_fn(model.params, model.buffers, spec.batch)
    steps = []
    if spec.trains:
        optimizer = _optimizer(spec)
        step = data_parallel_step(loss_fn, optimizer, mesh, split=spec.split,
                                  strategy=spec.strategy, reduction=spec.reduction,
                                  randomness=spec.randomness, buffer_policy=spec.buffer_policy)
        state = TrainState.create(model.params, optimizer, buffers=model.buffers)
        for _ in range(spec.steps):
            state, metrics = step(state, spec.batch)
            steps.append((metrics["loss"], state.params, state.buffers))
    return Trajectory(loss, grads, buffers, steps)
