"""Schedules equal torch.optim.lr_scheduler (StepLR, CosineAnnealingLR, LinearLR) and agree on
int and tensor steps, under vmap and torch.compile."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.optim import lr_scheduler

import fdp.optim as optim

REL = 1e-12


def _torch_lrs(base: float, make_sched: Any, n: int) -> list[float]:
    """The lr torch uses at optimizer steps 0..n-1 (scheduler.step() after each step)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = make_sched(opt)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def _assert_schedule(schedule: Any, expected: list[float], offset: int = 0) -> None:
    """Equal to 1e-12 relative to the schedule's scale (torch's recursive LinearLR leaves
    ~1e-17 where the exact value is 0)."""
    scale = max(abs(e) for e in expected)
    for i, e in enumerate(expected):
        step = i + offset
        got_int = schedule(step)
        got_tensor = schedule(torch.tensor(step))
        assert isinstance(got_int, float)
        assert got_tensor.dtype == torch.float64 and got_tensor.shape == ()
        assert got_int == got_tensor.item()
        assert abs(got_int - e) <= REL * scale, (step, got_int, e)


lrs = st.floats(1e-4, 10.0)


@given(lr=lrs, step_size=st.integers(1, 5), gamma=st.floats(0.05, 1.0), n=st.integers(1, 30))
def test_step_schedule_is_steplr(lr, step_size, gamma, n):
    expected = _torch_lrs(lr, lambda o: lr_scheduler.StepLR(o, step_size, gamma), n)
    _assert_schedule(optim.step_schedule(lr, step_size, gamma), expected)


@given(lr=lrs, t_max=st.integers(1, 30), alpha=st.floats(0.0, 0.9))
def test_cosine_decay_is_cosine_annealing(lr, t_max, alpha):
    expected = _torch_lrs(lr, lambda o: lr_scheduler.CosineAnnealingLR(o, t_max, alpha * lr),
                          t_max + 1)
    schedule = optim.cosine_decay_schedule(lr, t_max, alpha)
    _assert_schedule(schedule, expected)
    # after decay_steps it stays at the end value (optax), where torch's anneals back up
    assert math.isclose(schedule(t_max + 5), alpha * lr, rel_tol=REL, abs_tol=1e-300)


@given(lr=lrs, start=st.floats(0.01, 1.0), end=st.floats(0.0, 1.0), total=st.integers(1, 20))
def test_linear_schedule_is_linearlr(lr, start, end, total):
    expected = _torch_lrs(lr, lambda o: lr_scheduler.LinearLR(o, start, end, total), total + 4)
    _assert_schedule(optim.linear_schedule(lr * start, lr * end, total), expected)


@given(lr=lrs, start=st.floats(0.01, 1.0), total=st.integers(1, 20))
def test_linear_warmup_is_linearlr(lr, start, total):
    expected = _torch_lrs(lr, lambda o: lr_scheduler.LinearLR(o, start, 1.0, total), total + 4)
    _assert_schedule(optim.linear_warmup_schedule(lr, total, init_value=lr * start), expected)


@given(init=st.floats(0.0, 1.0), peak=lrs, warmup=st.integers(0, 10), decay=st.integers(1, 20),
       end_frac=st.floats(0.0, 0.9))
def test_warmup_cosine_decay_is_linear_then_cosine_annealing(init, peak, warmup, decay,
                                                             end_frac):
    """Warmup: linear_schedule(init, peak); then CosineAnnealingLR(T_max=decay) shifted."""
    schedule = optim.warmup_cosine_decay_schedule(init, peak, warmup, warmup + decay,
                                                  end_value=end_frac * peak)
    if warmup:
        warm = optim.linear_schedule(init, peak, warmup)
        _assert_schedule(schedule, [warm(t) for t in range(warmup)])
    expected = _torch_lrs(peak, lambda o: lr_scheduler.CosineAnnealingLR(
        o, decay, end_frac * peak), decay + 1)
    _assert_schedule(schedule, expected, offset=warmup)
    assert math.isclose(schedule(warmup + decay + 3), end_frac * peak, rel_tol=REL)


SCHEDULES = [
    optim.constant_schedule(0.3),
    optim.step_schedule(0.3, 3, 0.5),
    optim.cosine_decay_schedule(0.3, 7, 0.1),
    optim.linear_schedule(0.1, 0.3, 5, transition_begin=2),
    optim.linear_warmup_schedule(0.3, 4),
    optim.warmup_cosine_decay_schedule(0.0, 0.3, 3, 10, 0.01),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.__name__)
def test_vmap_and_compile_agree_with_int_steps(schedule):
    steps = torch.arange(14)
    expected = torch.tensor([schedule(int(k)) for k in steps], dtype=torch.float64)
    assert torch.equal(torch.func.vmap(schedule)(steps), expected)
    torch._dynamo.reset()  # the schedules share one code object: start from a fresh cache
    compiled = torch.compile(schedule, backend="aot_eager", fullgraph=True)
    assert torch.allclose(torch.stack([compiled(k) for k in steps]), expected, rtol=REL)
    torch._dynamo.reset()


def test_constant_and_transition_begin_values():
    assert optim.constant_schedule(2)(0) == 2.0
    s = optim.linear_schedule(1.0, 0.0, 4, transition_begin=2)
    assert [s(k) for k in range(8)] == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
