"""Bad input as a property: every case across the public API raises the documented exception
type, its message names the argument or key path, and nothing passed in was mutated.

Each case builds its inputs (so every case gets fresh tensors), then calls one public entry
point with them. Before the call the inputs are deep-snapshotted (tensors' values, shapes,
dtypes, ``requires_grad`` and version counters; containers' keys and members; modules' state
and mode); after the error they must be unchanged.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

import fdp
import fdp.nn
import fdp.optim as optim
import fdp.random as frandom
import fdp.testing

HAS_JAX = importlib.util.find_spec("jax") is not None
NEVER_WRITTEN = Path(tempfile.gettempdir()) / f"fdp-bad-input-{os.getpid()}" / "never"
F64 = torch.float64


class Case(NamedTuple):
    id: str
    build: Callable[[], tuple[Callable[..., Any], tuple, dict]]  # -> (fn, args, kwargs)
    exc: type[BaseException]
    needles: tuple[str, ...]  # substrings the message must contain (argument / key path)


CASES: list[Case] = []


def case(id_: str, exc: type[BaseException], needles: str | tuple[str, ...],
         build: Callable[[], tuple[Callable[..., Any], tuple, dict]]) -> None:
    CASES.append(Case(id_, build, exc, (needles,) if isinstance(needles, str) else needles))


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Callable, tuple, dict]:
    return fn, args, kwargs


# --- inputs -----------------------------------------------------------------------------------

def m2() -> fdp.Mesh:
    return fdp.Mesh(2)


def lin_loss(p, b):
    return (b["x"] @ p["w"]).pow(2).mean()


def params() -> dict[str, torch.Tensor]:
    return {"w": torch.randn(3, 2)}


def batch(rows: int = 4) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(rows, 3)}


def bn_model() -> fdp.Model:
    return fdp.functionalize(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train())


def model_loss(model: fdp.Model) -> Callable[..., Any]:
    def loss_fn(p, b):
        return model.apply(p, model.buffers, b["x"])[0].pow(2).mean()
    return loss_fn


def buffered_loss(model: fdp.Model) -> Callable[..., Any]:
    def loss_fn(p, bufs, b):
        out, new = model.apply(p, bufs, b["x"])
        return out.pow(2).mean(), new
    return loss_fn


def in_pmap(body: Callable[[torch.Tensor], Any]) -> tuple[Callable, tuple, dict]:
    return call(fdp.pmap(body, m2()), torch.ones(2, 3))


def step_call(loss_fn, optimizer, state, b, **options) -> tuple[Callable, tuple, dict]:
    return call(fdp.data_parallel_step(loss_fn, optimizer, m2(), **options), state, b)


# --- Mesh -------------------------------------------------------------------------------------

case("Mesh/n-float", TypeError, "n must be an int", lambda: call(fdp.Mesh, 2.5))
case("Mesh/n-bool", TypeError, "n must be an int", lambda: call(fdp.Mesh, True))
case("Mesh/device-typo", ValueError, "device='cpux'", lambda: call(fdp.Mesh, 2, device="cpux"))
case("Mesh/devices-typo", ValueError, "devices[1]='cpux'",
     lambda: call(fdp.Mesh, devices=["cpu", "cpux"]))
case("Mesh/devices-str", TypeError, "devices", lambda: call(fdp.Mesh, devices="cpu"))
case("Mesh/executor", ValueError, "executor='gpu'", lambda: call(fdp.Mesh, 2, executor="gpu"))
case("Mesh/timeout", ValueError, "timeout", lambda: call(fdp.Mesh, 2, timeout=-1))
case("Mesh/axis_name-int", TypeError, "axis_name", lambda: call(fdp.Mesh, 2, axis_name=3))

# --- scatter, gather, replicate, unreplicate, all_reduce --------------------------------------

case("scatter/dim-str", TypeError, "dim", lambda: call(fdp.scatter, batch(), m2(), dim="0"))
case("scatter/nested-sizes", ValueError, ("batch['a'][0]", "batch['a'][1]"),
     lambda: call(fdp.scatter, {"a": [torch.ones(4), torch.ones(2)]}, m2()))
case("scatter/split-non-int", TypeError, "split[1]='2'",
     lambda: call(fdp.scatter, torch.ones(4), m2(), split=[2, "2"]))
case("scatter/sharded-again", TypeError, ("batch", "fdp.Sharded"),
     lambda: call(fdp.scatter, fdp.scatter(torch.ones(4), m2()), m2()))
case("scatter/mesh-int", TypeError, "mesh", lambda: call(fdp.scatter, batch(), 2))
case("gather/no-replica-axis", ValueError, "outs['o']",
     lambda: call(fdp.gather, {"o": torch.ones(3, 2)}, m2()))
case("gather/dim-out-of-range", ValueError, "dim=5",
     lambda: call(fdp.gather, {"o": torch.ones(2, 3)}, m2(), dim=5))
case("replicate/mesh-str", TypeError, "mesh", lambda: call(fdp.replicate, params(), "mesh"))
case("replicate/list-leaf", TypeError, "tree['w']",
     lambda: call(fdp.replicate, {"w": np.ones(2)}, m2()))
case("unreplicate/leading-size", ValueError, "tree['w']",
     lambda: call(fdp.unreplicate, {"w": torch.ones(3, 2)}, m2()))
case("all_reduce/op", ValueError, "op='avg'",
     lambda: call(fdp.all_reduce, torch.ones(2, 3), m2(), "avg"))
case("all_reduce/nested-shape", ValueError, "tree['a'][0]",
     lambda: call(fdp.all_reduce, {"a": [torch.ones(3)]}, m2()))
case("all_reduce/weights-length", ValueError, "weights",
     lambda: call(fdp.all_reduce, torch.ones(2, 3), m2(), weights=[1, 2, 3]))

# --- pmap and the collectives -----------------------------------------------------------------

case("psum/unknown-axis", ValueError, "'model'", lambda: in_pmap(lambda x: fdp.psum(x, "model")))
case("pmean/axis-int", TypeError, "axis_name", lambda: in_pmap(lambda x: fdp.pmean(x, 3)))
case("axis_index/unknown-axis", ValueError, "'tp'",
     lambda: in_pmap(lambda x: x * fdp.axis_index("tp")))
case("axis_size/outside", ValueError, "'dp'", lambda: call(fdp.axis_size, "dp"))
case("pmax/outside", ValueError, "'dp'", lambda: call(fdp.pmax, torch.ones(2), "dp"))
case("all_gather/axis", ValueError, "axis=4",
     lambda: in_pmap(lambda x: fdp.all_gather(x, "dp", axis=4)))
case("pmap/in_axes-length", ValueError, "in_axes",
     lambda: call(fdp.pmap(lambda a, b: a, m2(), in_axes=(0, 0, 0)), torch.ones(2), torch.ones(2)))
case("pmap/static-out-of-range", ValueError, "static_broadcasted_argnums",
     lambda: call(fdp.pmap, lambda a: a, m2(), static_broadcasted_argnums=3))
case("pmap/randomness", ValueError, "randomness='sometimes'",
     lambda: call(fdp.pmap, lambda x: x, m2(), randomness="sometimes"))
case("pmap/axis_name-empty", TypeError, "axis_name",
     lambda: call(fdp.pmap, lambda x: x, m2(), axis_name=""))
case("pmap/mapped-size", ValueError, "args[0]['x']",
     lambda: call(fdp.pmap(lambda a: a, m2()), {"x": torch.ones(3, 2)}))
case("pmap/random-op", ValueError, ("randomness='different'", "torch.nn.functional.dropout"),
     lambda: in_pmap(lambda x: nn.functional.dropout(x, 0.5)))

# --- value_and_grad ---------------------------------------------------------------------------

case("value_and_grad/loss-not-callable", TypeError, "loss_fn",
     lambda: call(fdp.value_and_grad, "loss", m2()))
case("value_and_grad/int-params", TypeError, "params['w']",
     lambda: call(fdp.value_and_grad(lin_loss, m2()), {"w": torch.ones(3, 2, dtype=torch.int64)},
                  batch()))
case("value_and_grad/numpy-batch", TypeError, "batch['x']",
     lambda: call(fdp.value_and_grad(lin_loss, m2()), params(), {"x": np.ones((4, 3))}))
case("value_and_grad/nested-sizes", ValueError, ("batch['x']", "batch['y'][0]"),
     lambda: call(fdp.value_and_grad(lin_loss, m2()), params(),
                  {"x": torch.ones(4, 3), "y": [torch.ones(5)]}))
case("value_and_grad/randomness", ValueError, "randomness='maybe'",
     lambda: call(fdp.value_and_grad, lin_loss, m2(), randomness="maybe"))
case("value_and_grad/buffer_policy", ValueError, "buffer_policy='first'",
     lambda: call(fdp.value_and_grad, lin_loss, m2(), buffer_policy="first"))
case("value_and_grad/unused", ValueError, "unused='drop'",
     lambda: call(fdp.value_and_grad, lin_loss, m2(), unused="drop"))
case("value_and_grad/dim-range", ValueError, ("dim=2", "batch['x']"),
     lambda: call(fdp.value_and_grad(lin_loss, m2(), dim=2), params(), batch()))
case("value_and_grad/split-sum", ValueError, "split=[1, 1]",
     lambda: call(fdp.value_and_grad(lin_loss, m2(), split=[1, 1]), params(), batch()))
case("value_and_grad/buffers-not-dict", TypeError, ("buffers", "functionalize(module).buffers"),
     lambda: call(fdp.value_and_grad(lin_loss, m2(), buffer_policy="mean"), params(),
                  [torch.ones(2)], batch()))
case("value_and_grad/key", ValueError, "value_and_grad: key",
     lambda: call(fdp.value_and_grad(lin_loss, m2()), params(), batch(), key=torch.ones(3)))
case("value_and_grad/row_offset", TypeError, "row_offset",
     lambda: call(fdp.value_and_grad(lin_loss, m2()), params(), batch(), row_offset="0"))
case("value_and_grad/dtypes", TypeError, ("batch['x']", "params['w']", "torch.float64"),
     lambda: call(fdp.value_and_grad(lin_loss, m2()), {"w": torch.ones(3, 2, dtype=F64)},
                  batch()))
case("value_and_grad/arity", TypeError, ("loss_fn", "buffer_policy='mean'"),
     lambda: call(fdp.value_and_grad(lin_loss, m2(), buffer_policy="mean"), params(),
                  {"b": torch.ones(2)}, batch()))
case("value_and_grad/policy-with-gather", ValueError, "buffer_policy",
     lambda: call(fdp.value_and_grad, fdp.split_loss(lin_loss, lambda o, b: o), m2(),
                  strategy="gather", buffer_policy="mean"))
case("value_and_grad/batchnorm", ValueError, ("buffers['1.running_mean']", "buffer_policy="),
     lambda: (lambda m: call(fdp.value_and_grad(model_loss(m), m2()), m.params, batch()))(
         bn_model()))
case("value_and_grad/dropout", ValueError, ("randomness='different'", "dropout"),
     lambda: (lambda m: call(fdp.value_and_grad(model_loss(m), m2()), m.params, batch()))(
         fdp.functionalize(nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)))))
case("split_loss/criterion", TypeError, "criterion",
     lambda: call(fdp.split_loss, lin_loss, None))

# --- data_parallel_step, accumulate, TrainState ------------------------------------------------

case("data_parallel_step/optimizer", TypeError, "optimizer",
     lambda: call(fdp.data_parallel_step, lin_loss, torch.optim.SGD, m2()))
case("data_parallel_step/microbatches", TypeError, "microbatches",
     lambda: call(fdp.data_parallel_step, lin_loss, optim.sgd(0.1), m2(), microbatches=1.5))
case("data_parallel_step/microbatches-gather", ValueError, ("microbatches", "strategy="),
     lambda: call(fdp.data_parallel_step, fdp.split_loss(lin_loss, lambda o, b: o),
                  optim.sgd(0.1), m2(), strategy="gather", microbatches=2))
case("data_parallel_step/key", ValueError, "data_parallel_step: key",
     lambda: call(fdp.data_parallel_step, lin_loss, optim.sgd(0.1), m2(), key=torch.ones(2)))
case("data_parallel_step/policy-and-with_buffers", ValueError, "buffer_policy",
     lambda: call(fdp.data_parallel_step, lin_loss, optim.sgd(0.1), m2(),
                  buffer_policy="mean", with_buffers=True))
case("step/state-not-trainstate", TypeError, "state",
     lambda: step_call(lin_loss, optim.sgd(0.1), {"params": params()}, batch()))
case("step/no-buffers-for-policy", ValueError, ("state.buffers", "buffers=model.buffers"),
     lambda: (lambda m, o: step_call(buffered_loss(m), o, fdp.TrainState.create(m.params, o),
                                     batch(), buffer_policy="mean"))(bn_model(), optim.sgd(0.1)))
case("step/opt_state-of-other-params", ValueError, ("state.mu", "opt.init(params)"),
     lambda: (lambda o: step_call(lin_loss, o, fdp.TrainState.create(params(), o)._replace(
         opt_state=o.init({"v": torch.ones(3, 2)})), batch()))(optim.adam(0.1)))
case("accumulate/not-callable", TypeError, "value_and_grad_fn",
     lambda: call(fdp.accumulate, 3, 2))
case("accumulate/microbatches", ValueError, "microbatches",
     lambda: call(fdp.accumulate, fdp.value_and_grad(lin_loss, m2()), 0))
case("accumulate/split", ValueError, ("split='pad'", "one per replica"),
     lambda: call(fdp.accumulate, fdp.value_and_grad(lin_loss, m2()), 2, split="pad"))
case("accumulate/batch-sizes", ValueError, "batch['y']",
     lambda: call(fdp.accumulate(fdp.value_and_grad(lin_loss, m2()), 2), params(),
                  {"x": torch.ones(4, 3), "y": torch.ones(3)}))
case("TrainState.create/params-list", TypeError, "params",
     lambda: call(fdp.TrainState.create, [torch.ones(2)], optim.sgd(0.1)))
case("TrainState.create/buffer-leaf", TypeError, "buffers['n']",
     lambda: call(fdp.TrainState.create, params(), optim.sgd(0.1), buffers={"n": 3}))
case("TrainState.create/seed", TypeError, "seed",
     lambda: call(fdp.TrainState.create, params(), optim.sgd(0.1), seed="0"))
case("TrainState.create/optimizer", TypeError, "optimizer",
     lambda: call(fdp.TrainState.create, params(), "adam"))

# --- DataParallel and functionalize -----------------------------------------------------------

case("DataParallel/module", TypeError, "module",
     lambda: call(fdp.DataParallel, lambda x: x, m2()))
case("DataParallel/output_device", ValueError, "output_device='cpux'",
     lambda: call(fdp.DataParallel, nn.Linear(3, 2), m2(), output_device="cpux"))
case("DataParallel/buffer_policy", ValueError, "buffer_policy='first'",
     lambda: call(fdp.DataParallel, nn.Linear(3, 2), m2(), buffer_policy="first"))
case("DataParallel/randomness", ValueError, "randomness='never'",
     lambda: call(fdp.DataParallel, nn.Linear(3, 2), m2(), randomness="never"))
case("DataParallel/numpy-input", TypeError, "inputs[0]",
     lambda: call(fdp.DataParallel(nn.Linear(3, 2), m2()), np.ones((4, 3))))
case("DataParallel/one-row-batchnorm", ValueError, ("BatchNorm1d layer '1'", "1 row"),
     lambda: call(fdp.DataParallel(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
                                   fdp.Mesh(4)), torch.randn(5, 3)))
case("DataParallel/dtypes", TypeError, ("inputs[0]", "module.weight"),
     lambda: call(fdp.DataParallel(nn.Linear(3, 2).double(), m2()), torch.randn(4, 3)))
case("functionalize/not-module", TypeError, "module",
     lambda: call(fdp.functionalize, nn.Linear))
case("apply/buffers-keys", ValueError, ("buffers", "'1.running_mean'"),
     lambda: (lambda m: call(m.apply, m.params, {}, torch.ones(2, 3)))(bn_model()))
case("apply/param-leaf", TypeError, "params['weight']",
     lambda: call(fdp.functionalize(nn.Linear(3, 2)).apply, {"weight": 1.0, "bias": 0.0}, {},
                  torch.ones(1, 3)))

# --- fdp.optim --------------------------------------------------------------------------------

case("sgd/learning_rate", TypeError, "learning_rate", lambda: call(optim.sgd, "0.1"))
case("adam/b1", ValueError, "b1", lambda: call(optim.adam, 0.1, b1=1.5))
case("sgd/momentum", ValueError, "momentum", lambda: call(optim.sgd, 0.1, momentum=-1.0))
case("clip_by_global_norm/max_norm", ValueError, "max_norm",
     lambda: call(optim.clip_by_global_norm, -1.0))
case("chain/transform", TypeError, "transforms[1]",
     lambda: call(optim.chain, optim.sgd(0.1), optim.sgd(0.1).init))
case("cosine_decay_schedule/decay_steps", ValueError, "decay_steps",
     lambda: call(optim.cosine_decay_schedule, 0.1, 0))
case("adam.update/state-of-other-params", ValueError, ("state.mu", "['b']", "opt.init(params)"),
     lambda: (lambda o, p: call(o.update, p, o.init({"a": p["a"]}), p))(
         optim.adam(0.1), {"a": torch.ones(2), "b": torch.ones(3)}))
case("sgd.update/state-shape", ValueError, ("state.momentum_buffer['a']", "opt.init(params)"),
     lambda: (lambda o, p: call(o.update, p, o.init({"a": torch.ones(4)}), p))(
         optim.sgd(0.1, momentum=0.9), {"a": torch.ones(2)}))
case("adam.update/sgd-state", TypeError, "state",
     lambda: call(optim.adam(0.1).update, params(), optim.sgd(0.1).init(params()), params()))
case("apply_updates/missing", ValueError, ("updates", "params['w']"),
     lambda: call(optim.apply_updates, params(), {}))

# --- fdp.random -------------------------------------------------------------------------------

case("random.key/seed", TypeError, "seed", lambda: call(frandom.key, "1"))
case("random.split/n", ValueError, "n", lambda: call(frandom.split, frandom.key(0), -1))
case("random.uniform/key", ValueError, "key", lambda: call(frandom.uniform, torch.ones(3), (2,)))
case("random.normal/dtype", TypeError, "dtype",
     lambda: call(frandom.normal, frandom.key(0), (2,), dtype=torch.int64))
case("random.bernoulli/p", ValueError, "p", lambda: call(frandom.bernoulli, frandom.key(0), 1.5,
                                                         (2,)))
case("random.fold_in/data", TypeError, "data", lambda: call(frandom.fold_in, frandom.key(0),
                                                            "x"))
case("random.bits/shape", TypeError, "shape",
     lambda: call(frandom.bits, frandom.key(0), "2"))

# --- fdp.nn -----------------------------------------------------------------------------------

case("nn.convert_dropout/module", TypeError, "module",
     lambda: call(fdp.nn.convert_dropout, "module"))
case("nn.convert_sync_batchnorm/axis_name", TypeError, "axis_name",
     lambda: call(fdp.nn.convert_sync_batchnorm, nn.BatchNorm1d(3), axis_name=""))
case("nn.dropout/p", ValueError, "p",
     lambda: call(fdp.nn.dropout, torch.ones(2, 3), 2.0, frandom.key(0)))

# --- checkpoints ------------------------------------------------------------------------------

case("save_checkpoint/path-int", TypeError, "path",
     lambda: call(fdp.save_checkpoint, 3, {"w": torch.ones(2)}))
case("save_checkpoint/path-is-a-source-file", ValueError, "path",
     lambda: call(fdp.save_checkpoint, Path(__file__), {"w": torch.ones(2)}))
case("save_checkpoint/lambda-leaf", TypeError, "state['f']",
     lambda: call(fdp.save_checkpoint, NEVER_WRITTEN, {"f": lambda: 0}))
case("load_checkpoint/missing", FileNotFoundError, "load_checkpoint",
     lambda: call(fdp.load_checkpoint, NEVER_WRITTEN, {"w": torch.ones(2)}))
case("load_checkpoint/path-int", TypeError, "path",
     lambda: call(fdp.load_checkpoint, 3, {"w": torch.ones(2)}))

# --- fdp.testing ------------------------------------------------------------------------------

case("assert_dp_equivalent/model", TypeError, "model_or_apply",
     lambda: call(fdp.testing.assert_dp_equivalent, "net", lin_loss, batch(), m2()))
case("assert_dp_equivalent/steps", ValueError, "steps",
     lambda: call(fdp.testing.assert_dp_equivalent, nn.Linear(3, 2),
                  lambda o, b: o.sum(), torch.ones(4, 3), m2(), steps=0))
case("assert_dp_equivalent/split", ValueError, "split='pad'",
     lambda: call(fdp.testing.assert_dp_equivalent, nn.Linear(3, 2),
                  lambda o, b: o.sum(), torch.ones(4, 3), m2(), split="pad"))


# --- fdp.interop ------------------------------------------------------------------------------

def _jax_case(fn_name: str, *args: Any, **kwargs: Any) -> tuple[Callable, tuple, dict]:
    import fdp.interop.jax as fjax

    return call(getattr(fjax, fn_name), *args, **kwargs)


if HAS_JAX:
    case("interop.to_jax/leaf", TypeError, "tree['n']",
         lambda: _jax_case("to_jax", {"w": torch.ones(2), "n": "x"}))
    case("interop.from_jax/like", ValueError, "like",
         lambda: _jax_case("from_jax", {"w": np.ones(2, np.float32)},
                           like={"v": torch.ones(2)}))


# --- the property -----------------------------------------------------------------------------

def _snapshot(x: Any, seen: set[int] | None = None) -> Any:
    """A deep, comparable record of ``x``: tensors by value and metadata, containers by their
    members' identities and records, modules by their state and mode."""
    seen = set() if seen is None else seen
    if isinstance(x, torch.Tensor):
        return ("tensor", id(x), x.dtype, tuple(x.shape), x.requires_grad, x._version,
                x.detach().clone())
    if id(x) in seen:
        return ("seen", id(x))
    seen.add(id(x))
    if isinstance(x, dict):
        return ("dict", id(x), list(x), [(id(v), _snapshot(v, seen)) for v in x.values()])
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, id(x), [(id(v), _snapshot(v, seen)) for v in x])
    if isinstance(x, nn.Module):  # state_dict() is a new dict per call: its entries count
        state = x.state_dict(keep_vars=True)
        return ("module", id(x), (x.training, list(state)),
                ("list", 0, [(id(v), _snapshot(v, seen)) for v in state.values()]))
    if isinstance(x, np.ndarray):
        return ("ndarray", id(x), x.copy())
    return ("object", id(x))


def _same(before: Any, after: Any, path: str = "inputs") -> None:
    kind = before[0]
    assert after[0] == kind and after[1] == before[1], f"{path}: replaced"
    if kind == "tensor":
        assert before[2:6] == after[2:6], f"{path}: dtype/shape/requires_grad/version changed"
        assert torch.equal(before[6], after[6]) or (
            before[6].is_floating_point() and before[6].isnan().any()
            and torch.allclose(before[6], after[6], rtol=0, atol=0, equal_nan=True)
        ), f"{path}: values changed"
    elif kind == "ndarray":
        assert np.array_equal(before[2], after[2]), f"{path}: values changed"
    elif kind == "dict":
        assert before[2] == after[2], f"{path}: keys changed"
        for k, (ib, sb), (ia, sa) in zip(before[2], before[3], after[3], strict=True):
            assert ib == ia, f"{path}[{k!r}]: replaced"
            _same(sb, sa, f"{path}[{k!r}]")
    elif kind == "module":
        assert before[2][0] == after[2][0], f"{path}: train/eval mode changed"
        assert before[2][1] == after[2][1], f"{path}: state names changed"
        _same(before[3], after[3], f"{path}.state_dict()")
    elif kind not in ("object", "seen"):  # a list, a tuple or a NamedTuple
        assert len(before[2]) == len(after[2]), f"{path}: length changed"
        for i, ((ib, sb), (ia, sa)) in enumerate(zip(before[2], after[2], strict=True)):
            assert ib == ia, f"{path}[{i}]: replaced"
            _same(sb, sa, f"{path}[{i}]")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_raises_names_it_and_mutates_nothing(case: Case):
    fn, args, kwargs = case.build()
    inputs = (args, kwargs)
    before = _snapshot(inputs)
    with pytest.raises(case.exc) as info:
        fn(*args, **kwargs)
    assert type(info.value) is case.exc or isinstance(info.value, case.exc)
    message = str(info.value)
    missing = [n for n in case.needles if n not in message]
    assert not missing, f"{case.id}: message lacks {missing}: {message}"
    _same(before, _snapshot(inputs))


def test_refused_calls_leave_no_files():
    assert not NEVER_WRITTEN.parent.exists()  # a refused save creates no directory


def test_the_table_is_large_and_its_ids_distinct():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 60


def test_the_snapshot_sees_mutation():
    x = {"a": [torch.ones(2)], "m": nn.Linear(2, 1)}
    before = _snapshot(x)
    x["a"][0].add_(1)
    with pytest.raises(AssertionError, match=r"\['a'\]\[0\]"):
        _same(before, _snapshot(x))
    before = _snapshot(x)
    x["m"].eval()
    with pytest.raises(AssertionError, match="mode changed"):
        _same(before, _snapshot(x))
    before = _snapshot(x)
    x["a"].append(1)
    with pytest.raises(AssertionError, match="length changed"):
        _same(before, _snapshot(x))
