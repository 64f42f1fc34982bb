"""Bad input: each a clear ValueError/TypeError naming the argument and the key path."""

from __future__ import annotations

import math

import pytest
import torch

import fdp.optim as optim

f64 = torch.float64
ALL = {
    "sgd": lambda: optim.sgd(0.1, momentum=0.9),
    "adam": lambda: optim.adam(0.1, amsgrad=True),
    "adamw": lambda: optim.adamw(0.1),
    "rmsprop": lambda: optim.rmsprop(0.1, momentum=0.9, centered=True),
    "chain": lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.adam(0.1)),
}


def _params():
    return {"fc": {"weight": torch.ones(2, 3, dtype=f64), "bias": torch.ones(2, dtype=f64)}}


@pytest.mark.parametrize("name", sorted(ALL))
def test_grads_missing_a_key(name):
    opt, params = ALL[name](), _params()
    grads = {"fc": {"weight": torch.ones(2, 3, dtype=f64)}}
    with pytest.raises(ValueError, match=r"grads lacks .*\['fc'\]\['bias'\].*initialized with"):
        opt.update(grads, opt.init(params), params)


@pytest.mark.parametrize("name", sorted(ALL))
def test_grads_with_an_unexpected_key(name):
    opt, params = ALL[name](), _params()
    grads = {"fc": {**params["fc"], "scale": torch.ones(1, dtype=f64)}}
    with pytest.raises(ValueError, match=r"grads\['fc'\]\['scale'\] is unexpected"):
        opt.update(grads, opt.init(params), params)


@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop"])
def test_grads_not_matching_the_state_without_params(name):
    """Without params the state's trees are the reference; the message names state.<field>."""
    opt, params = ALL[name](), _params()
    with pytest.raises(ValueError, match=r"grads lacks state\.\w+\['fc'\]\['bias'\]"):
        opt.update({"fc": {"weight": torch.ones(2, 3, dtype=f64)}}, opt.init(params))


@pytest.mark.parametrize("name", sorted(ALL))
def test_grad_of_the_wrong_shape(name):
    opt, params = ALL[name](), _params()
    grads = {"fc": {"weight": torch.ones(3, 2, dtype=f64), "bias": torch.ones(2, dtype=f64)}}
    with pytest.raises(ValueError, match=r"grads\['fc'\]\['weight'\] has shape \(3, 2\)"):
        opt.update(grads, opt.init(params), params)


def test_grads_of_another_container_type():
    opt, params = optim.adam(0.1), {"w": torch.ones(2)}
    with pytest.raises(ValueError, match=r"grads lacks .*\['w'\]"):
        opt.update([torch.ones(2)], opt.init(params), params)


def test_non_tensor_grad_and_integer_param():
    opt = optim.sgd(0.1)
    with pytest.raises(TypeError, match=r"grads\['w'\]\[1\] is a float, not a torch.Tensor"):
        opt.update({"w": [torch.ones(2), 2.0]}, opt.init({"w": [torch.ones(2), torch.ones(1)]}))
    with pytest.raises(TypeError, match=r"params\['steps'\] is a torch.int64.*floating-point"):
        opt.init({"w": torch.ones(2), "steps": torch.tensor(3)})


@pytest.mark.parametrize("factory", [
    lambda: optim.sgd(0.1, weight_decay=0.1),
    lambda: optim.adam(0.1, weight_decay=0.1),
    lambda: optim.adamw(0.1),
    lambda: optim.rmsprop(0.1, weight_decay=0.1),
    lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(0.1)),
])
def test_weight_decay_without_params(factory):
    opt, params = factory(), {"w": torch.ones(2)}
    with pytest.raises(ValueError, match=r"params is None but weight_decay=.* needs the current "
                                         r"params; call update\(grads, state, params\)"):
        opt.update({"w": torch.ones(2)}, opt.init(params))


@pytest.mark.parametrize(("factory", "error", "message"), [
    (lambda: optim.sgd(-0.1), ValueError, r"sgd: learning_rate must be >= 0"),
    (lambda: optim.adam(math.nan), ValueError, r"adam: learning_rate must be finite"),
    (lambda: optim.sgd("0.1"), TypeError, r"learning_rate must be a float or a schedule"),
    (lambda: optim.sgd(torch.tensor(0.1)), TypeError, r"learning_rate must be a float"),
    (lambda: optim.sgd(0.1, momentum=-0.5), ValueError, r"sgd: momentum must be >= 0"),
    (lambda: optim.sgd(0.1, weight_decay=-1.0), ValueError, r"weight_decay must be >= 0"),
    (lambda: optim.sgd(0.1, nesterov=True), ValueError,
     r"nesterov=True requires momentum > 0 and dampening == 0"),
    (lambda: optim.sgd(0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError,
     r"nesterov=True requires momentum > 0 and dampening == 0"),
    (lambda: optim.adam(0.1, b1=1.0), ValueError, r"adam: b1 must be in \[0, 1\)"),
    (lambda: optim.adamw(0.1, b2=-0.1), ValueError, r"adamw: b2 must be in \[0, 1\)"),
    (lambda: optim.adam(0.1, eps=-1e-8), ValueError, r"adam: eps must be >= 0"),
    (lambda: optim.adam(0.1, amsgrad=1), TypeError, r"amsgrad must be a bool"),
    (lambda: optim.rmsprop(0.1, alpha=1.5), ValueError, r"rmsprop: alpha must be in \[0, 1\)"),
    (lambda: optim.rmsprop(0.1, momentum=-1.0), ValueError, r"rmsprop: momentum must be >= 0"),
    (lambda: optim.clip_by_global_norm(-1.0), ValueError, r"max_norm must be >= 0"),
    (lambda: optim.clip_by_global_norm(math.inf), ValueError, r"max_norm must be finite"),
    (lambda: optim.chain(optim.sgd(0.1), 0.1), TypeError, r"chain: transforms\[1\] is a float"),
    (lambda: optim.step_schedule(0.1, 0), ValueError, r"step_size must be >= 1"),
    (lambda: optim.cosine_decay_schedule(0.1, 2.5), TypeError, r"decay_steps must be an int"),
    (lambda: optim.warmup_cosine_decay_schedule(0.0, 0.1, 10, 10), ValueError,
     r"decay_steps \(10\) must exceed warmup_steps \(10\)"),
    (lambda: optim.linear_schedule(0.1, math.inf, 5), ValueError, r"end_value must be finite"),
])
def test_invalid_hyperparameters(factory, error, message):
    with pytest.raises(error, match=message):
        factory()


def test_schedule_step_must_be_a_nonnegative_int():
    s = optim.cosine_decay_schedule(0.1, 10)
    with pytest.raises(ValueError, match="step must be >= 0"):
        s(-1)
    with pytest.raises(TypeError, match="step must be an int or a tensor"):
        s(1.5)


@pytest.mark.parametrize("bad", [math.nan, math.inf, torch.tensor(math.nan, dtype=f64),
                                 torch.tensor(-math.inf)])
@pytest.mark.parametrize("make", [optim.sgd, optim.adam, optim.adamw, optim.rmsprop])
def test_schedule_returning_non_finite_values(make, bad):
    """Detected eagerly at the step where it happens (step 2 here), naming the step."""
    schedule = optim.linear_schedule(0.1, 0.0, 10)

    def broken(step):
        return bad if int(step) == 2 else schedule(step)

    opt, params = make(broken), {"w": torch.ones(2, dtype=f64)}
    state = opt.init(params)
    for _ in range(2):
        _, state = opt.update({"w": torch.ones(2, dtype=f64)}, state, params)
    with pytest.raises(ValueError, match=r"learning_rate schedule returned .*(nan|inf) at step 2"
                                         r"; a schedule must return finite, non-negative values"):
        opt.update({"w": torch.ones(2, dtype=f64)}, state, params)


def test_schedule_returning_a_non_number():
    opt = optim.sgd(lambda step: "fast")
    with pytest.raises(TypeError, match="schedule returned a str"):
        opt.update({"w": torch.ones(2)}, opt.init({"w": torch.ones(2)}))


def test_chain_given_a_foreign_state():
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1))
    params = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="state must be the tuple of 2 states"):
        opt.update(params, optim.sgd(0.1).init(params), params)


def test_apply_updates_structure_mismatch():
    with pytest.raises(ValueError, match=r"apply_updates: updates does not match the params: "
                                         r"updates\['b'\] is not a key of the params"):
        optim.apply_updates({"a": torch.ones(1)}, {"a": torch.ones(1), "b": torch.ones(1)})


@pytest.mark.parametrize("make, other", [
    (lambda: optim.adam(0.1), lambda: optim.sgd(0.1, momentum=0.9)),
    (lambda: optim.sgd(0.1, momentum=0.9), lambda: optim.adam(0.1)),
    (lambda: optim.rmsprop(0.1), lambda: optim.adam(0.1)),
])
def test_another_optimizers_state_is_a_clear_error(make, other):
    params = {"w": torch.ones(3)}
    with pytest.raises(TypeError, match=r"state must be the \w+State made by \w+\.init"):
        make().update(params, other().init(params), params)
    with pytest.raises(TypeError, match="state must be"):
        make().update(params, None, params)


def test_grads_of_another_dtype_name_the_leaf():
    params = {"w": torch.ones(3)}
    opt = optim.adam(0.1)
    with pytest.raises(ValueError, match=r"grads\['w'\] is torch.float64 but params\['w'\] "
                                         r"is torch.float32"):
        opt.update({"w": torch.ones(3, dtype=torch.float64)}, opt.init(params), params)
    with pytest.raises(ValueError, match=r"grads\['w'\] is torch.float64 but state.mu\['w'\] "
                                         r"is torch.float32"):
        opt.update({"w": torch.ones(3, dtype=torch.float64)}, opt.init(params))


@pytest.mark.parametrize("schedule, pattern", [
    (lambda step: -0.1, "finite, non-negative"),
    (lambda step: torch.tensor([0.1]), r"returned shape \(1,\)"),
])
def test_schedule_values_are_checked(schedule, pattern):
    params = {"w": torch.ones(3)}
    opt = optim.sgd(schedule)
    with pytest.raises(ValueError, match=pattern):
        opt.update(params, opt.init(params), params)
