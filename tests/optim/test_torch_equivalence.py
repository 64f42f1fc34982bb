"""Law: every fdp.optim optimizer equals its torch.optim counterpart over k steps (float64 to
1e-12 relative, float32 loosely), with constant and scheduled learning rates."""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st
from torch.optim import lr_scheduler

import fdp.optim as optim
from tests.helpers import F32_REL, assert_close
from tests.optim.trees import make, run_ours, run_torch, structures, torch_state

REL = 1e-12
f64 = torch.float64
steps = st.integers(5, 8)
unit = st.floats(0.0, 0.99)


@st.composite
def learning_rates(draw: Any, k: int) -> tuple[Any, float, Any]:
    """(our learning_rate, torch's base lr, a torch scheduler factory or None)."""
    lr = draw(st.floats(1e-3, 0.3))
    kind = draw(st.sampled_from(["constant", "step", "cosine", "linear", "warmup"]))
    if kind == "constant":
        return lr, lr, None
    if kind == "step":
        size, gamma = draw(st.integers(1, 3)), draw(st.floats(0.1, 0.9))
        return (optim.step_schedule(lr, size, gamma), lr,
                lambda o: lr_scheduler.StepLR(o, size, gamma))
    if kind == "cosine":
        t_max, alpha = draw(st.integers(k, 2 * k)), draw(st.floats(0.0, 0.5))
        return (optim.cosine_decay_schedule(lr, t_max, alpha), lr,
                lambda o: lr_scheduler.CosineAnnealingLR(o, t_max, eta_min=alpha * lr))
    start, total = draw(st.floats(0.1, 1.0)), draw(st.integers(1, k))
    if kind == "linear":
        end = draw(st.floats(0.1, 1.0))
        return (optim.linear_schedule(lr * start, lr * end, total), lr,
                lambda o: lr_scheduler.LinearLR(o, start, end, total))
    return (optim.linear_warmup_schedule(lr, total, init_value=lr * start), lr,
            lambda o: lr_scheduler.LinearLR(o, start, 1.0, total))


def _problem(data: Any, dtype: torch.dtype = f64) -> tuple[Any, list[Any], int]:
    structure, k = data.draw(structures), data.draw(steps)
    params = make(structure, dtype)
    return params, [make(structure, dtype) for _ in range(k)], k


def _count(state: Any, k: int) -> None:
    assert state.count.dtype == torch.int64 and state.count.shape == ()
    assert int(state.count) == k


@given(data=st.data(), momentum=st.sampled_from([0.0, 0.5, 0.9]) | unit,
       dampening=st.sampled_from([0.0, 0.3]), nesterov=st.booleans(),
       weight_decay=st.sampled_from([0.0, 0.1]))
def test_sgd(data, momentum, dampening, nesterov, weight_decay):
    if nesterov:
        momentum, dampening = max(momentum, 0.1), 0.0
    params, grads, k = _problem(data)
    lr, base, sched = data.draw(learning_rates(k))
    ours, state = run_ours(optim.sgd(lr, momentum, dampening, nesterov, weight_decay),
                           params, grads)
    ref, opt, ps = run_torch(lambda p: torch.optim.SGD(
        p, base, momentum, dampening, weight_decay, nesterov), params, grads, sched)
    assert_close(ours, ref, REL)
    _count(state, k)
    if momentum:
        assert_close(state.momentum_buffer, torch_state(opt, ps, "momentum_buffer", params), REL)
    else:
        assert state.momentum_buffer == optim.EmptyState()


@given(data=st.data(), decoupled=st.booleans(), amsgrad=st.booleans(),
       weight_decay=st.sampled_from([0.0, 0.01, 0.3]), b1=unit, b2=st.floats(0.5, 0.999),
       eps=st.sampled_from([1e-8, 1e-3]))
def test_adam_and_adamw(data, decoupled, amsgrad, weight_decay, b1, b2, eps):
    params, grads, k = _problem(data)
    lr, base, sched = data.draw(learning_rates(k))
    make_ours, make_torch = ((optim.adamw, torch.optim.AdamW) if decoupled
                             else (optim.adam, torch.optim.Adam))
    ours, state = run_ours(make_ours(lr, b1, b2, eps, weight_decay, amsgrad), params, grads)
    ref, opt, ps = run_torch(lambda p: make_torch(
        p, base, (b1, b2), eps, weight_decay, amsgrad), params, grads, sched)
    assert_close(ours, ref, REL)
    _count(state, k)
    assert_close(state.mu, torch_state(opt, ps, "exp_avg", params), REL)
    assert_close(state.nu, torch_state(opt, ps, "exp_avg_sq", params), REL)
    if amsgrad:
        assert_close(state.nu_max, torch_state(opt, ps, "max_exp_avg_sq", params), REL)


@given(data=st.data(), alpha=st.floats(0.5, 0.99), eps=st.sampled_from([1e-8, 1e-3]),
       weight_decay=st.sampled_from([0.0, 0.1]), momentum=st.sampled_from([0.0, 0.9]) | unit,
       centered=st.booleans())
def test_rmsprop(data, alpha, eps, weight_decay, momentum, centered):
    params, grads, k = _problem(data)
    lr, base, sched = data.draw(learning_rates(k))
    ours, state = run_ours(optim.rmsprop(lr, alpha, eps, weight_decay, momentum, centered),
                           params, grads)
    ref, opt, ps = run_torch(lambda p: torch.optim.RMSprop(
        p, base, alpha, eps, weight_decay, momentum, centered), params, grads, sched)
    assert_close(ours, ref, REL)
    _count(state, k)
    assert_close(state.square_avg, torch_state(opt, ps, "square_avg", params), REL)
    if centered:
        assert_close(state.grad_avg, torch_state(opt, ps, "grad_avg", params), REL)
    if momentum:
        assert_close(state.momentum_buffer, torch_state(opt, ps, "momentum_buffer", params),
                     REL)


@given(data=st.data(), max_norm=st.floats(0.05, 5.0), scale=st.sampled_from([0.1, 1.0, 3.0]),
       momentum=st.sampled_from([0.0, 0.9]))
def test_clip_then_sgd(data, max_norm, scale, momentum):
    """chain(clip_by_global_norm, sgd) == clip_grad_norm_ + SGD, clipping active or not."""
    structure, k = data.draw(structures), data.draw(steps)
    params = make(structure, f64)
    grads = [make(structure, f64, scale) for _ in range(k)]
    opt = optim.chain(optim.clip_by_global_norm(max_norm), optim.sgd(0.1, momentum))
    ours, _ = run_ours(opt, params, grads)
    ref, _, _ = run_torch(lambda p: torch.optim.SGD(p, 0.1, momentum), params, grads,
                          clip=max_norm)
    assert_close(ours, ref, REL)


@given(data=st.data())
def test_global_norm_matches_torch(data):
    grads = make(data.draw(structures), f64, data.draw(st.sampled_from([0.1, 10.0])))
    expected = torch.nn.utils.get_total_norm(pytree.tree_leaves(grads))
    assert_close(optim.global_norm(grads), expected, REL)


OPTIMIZERS = {
    "sgd": (lambda lr: optim.sgd(lr, 0.9, nesterov=True, weight_decay=0.1),
            lambda p, lr: torch.optim.SGD(p, lr, 0.9, weight_decay=0.1, nesterov=True)),
    "adam": (lambda lr: optim.adam(lr, weight_decay=0.1, amsgrad=True),
             lambda p, lr: torch.optim.Adam(p, lr, weight_decay=0.1, amsgrad=True)),
    "adamw": (lambda lr: optim.adamw(lr), lambda p, lr: torch.optim.AdamW(p, lr)),
    "rmsprop": (lambda lr: optim.rmsprop(lr, momentum=0.5, centered=True),
                lambda p, lr: torch.optim.RMSprop(p, lr, momentum=0.5, centered=True)),
}


@given(data=st.data(), name=st.sampled_from(sorted(OPTIMIZERS)))
def test_float32(data, name):
    params, grads, k = _problem(data, torch.float32)
    lr, base, sched = data.draw(learning_rates(k))
    ours_fn, torch_fn = OPTIMIZERS[name]
    ours, _ = run_ours(ours_fn(lr), params, grads)
    ref, _, _ = run_torch(lambda p: torch_fn(p, base), params, grads, sched)
    # float32: rounding scales with the whole problem (adam divides by sqrt(v) + eps), so a
    # leaf that ends near 0 is compared against the largest parameter, not its own size
    scale = max(x.abs().max().item() for x in pytree.tree_leaves(ref) if x.numel())
    torch.testing.assert_close(ours, ref, rtol=F32_REL, atol=F32_REL * scale)
