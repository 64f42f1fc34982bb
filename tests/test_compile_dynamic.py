"""torch.compile over varying batch sizes: the vmap backend's fused step compiles once for a
static first shape and once more for a symbolic batch size, then serves every further size
(even and uneven splits) without compiling again, with the eager and single-device numbers.

Compile counts use dynamo's ``CompileCounter`` backend (it counts the frames dynamo compiles and
runs their graphs as they are), so these tests measure recompilation, not inductor.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

import fdp
from tests.helpers import F64_REL, assert_close

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # the fixture is in conftest.py


def _model():
    torch.manual_seed(0)
    return fdp.functionalize(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double())


def _batch(rows: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(rows, 5, dtype=f64, generator=g),
            "y": torch.randint(0, 3, (rows,), generator=g)}


def _mse(model, reduction="mean"):
    def loss_fn(p, b):
        err = (model.apply(p, model.buffers, b["x"])[0]
               - nn.functional.one_hot(b["y"], 3).to(f64)).pow(2).sum(1)
        return err.mean() if reduction == "mean" else err.sum()
    return loss_fn


def _cross_entropy(model):
    return fdp.split_loss(lambda p, b: model.apply(p, model.buffers, b["x"])[0],
                          lambda o, b: nn.functional.cross_entropy(o, b["y"]))


def _compiled_over_sizes(fn, sizes, *args):
    """Runs ``torch.compile(fn)`` on batches of ``sizes`` rows; returns the number of frames
    dynamo compiled and each size's (compiled, eager) results."""
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter)
    results = [(compiled(*args, _batch(b, b)), fn(*args, _batch(b, b))) for b in sizes]
    return counter.frame_count, results


def _assert_eager_and_single_device(results, sizes, loss_fn, params):
    """Each size's compiled (loss, grads) equals the eager step's and single-device torch.func's."""
    for (compiled, eager), b in zip(results, sizes, strict=True):
        assert_close(compiled, eager, F64_REL)
        grads, loss = torch.func.grad_and_value(loss_fn)(params, _batch(b, b))
        assert_close(compiled, (loss, grads), F64_REL)


@pytest.mark.parametrize(("split", "sizes"), [
    ("chunk", [8, 12, 20, 28, 36]),     # even on Mesh(4)
    ("chunk", [13, 17, 22, 27, 35]),    # uneven: sizes [m, m, m, rest]
    # "even" compiles once per B mod N (how many replicas get the extra row): one class here
    ("even", [13, 17, 21, 29, 41]),
])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weighted_step_compiles_twice_for_many_batch_sizes(split, sizes, reduction):
    model = _model()
    loss_fn = _mse(model, reduction)
    vg = fdp.value_and_grad(loss_fn, fdp.Mesh(4), split=split, reduction=reduction)
    frames, results = _compiled_over_sizes(vg, sizes, model.params)
    assert frames <= 2, f"{frames} compiles for {len(sizes)} batch sizes"
    _assert_eager_and_single_device(results, sizes, loss_fn, model.params)


def test_gather_strategy_with_cross_entropy_compiles_twice_for_many_batch_sizes():
    """strategy="gather" runs the criterion on the gathered outputs, outside the vmap, so a
    cross-entropy loss stays symbolic in the batch size (see the weighted case below)."""
    model = _model()
    loss = _cross_entropy(model)
    vg = fdp.value_and_grad(loss, fdp.Mesh(4), strategy="gather")
    sizes = [13, 16, 22, 27, 40, 35]  # a static first compile, then one divisible, one not
    frames, results = _compiled_over_sizes(vg, sizes, model.params)
    assert frames <= 3, f"{frames} compiles for {len(sizes)} batch sizes"
    _assert_eager_and_single_device(results, sizes, loss, model.params)


def test_weighted_cross_entropy_compiles_per_replica_row_count():
    """Documents a torch limitation (docs/performance.md): ``torch.gather`` under ``vmap``
    (inside ``F.cross_entropy``/``nll_loss``) specializes the compiled code on the per-replica
    row count, so the weighted strategy with such a loss compiles once per distinct shard
    size. If torch lifts it, this test fails: then update the docs."""
    model = _model()
    vg = fdp.value_and_grad(_cross_entropy(model), fdp.Mesh(4))
    frames, results = _compiled_over_sizes(vg, [8, 12, 16], model.params)
    assert frames == 3
    for compiled, eager in results:
        assert_close(compiled, eager, F64_REL)


@pytest.mark.slow
def test_data_parallel_step_with_microbatches_over_batch_sizes_inductor():
    """The whole step (optimizer included) through inductor, accumulation in 2 slices:
    compiled == eager over several uneven sizes, without a compile per size."""
    model = _model()
    optimizer = fdp.optim.sgd(0.1)
    step = fdp.data_parallel_step(_mse(model), optimizer, fdp.Mesh(4), microbatches=2,
                                  unused="zeros")
    state = eager = fdp.TrainState.create(model.params, optimizer)
    counter = CompileCounter()
    # the counter sees the frames; inductor compiles them
    compiled = torch.compile(step, backend=_counting_inductor(counter))
    for b in [18, 26, 34, 42, 50]:
        state, _ = compiled(state, _batch(b, b))
        eager, _ = step(eager, _batch(b, b))
    assert_close(state.params, eager.params, F64_REL)
    assert counter.frame_count <= 3, counter.frame_count


def _counting_inductor(counter: CompileCounter):
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        counter(gm, example_inputs)
        return compile_fx(gm, example_inputs)
    return backend


def test_dynamic_true_with_uneven_splits_compiles_once():
    """``dynamic=True`` with uneven splits (which failed in dynamo before): one compile."""
    model = _model()
    vg = fdp.value_and_grad(_mse(model), fdp.Mesh(4))
    counter = CompileCounter()
    compiled = torch.compile(vg, backend=counter, dynamic=True)
    for b in [14, 17, 22, 27]:  # chunk: [m, m, m, rest], rest ≥ 2
        assert_close(compiled(model.params, _batch(b, b)), vg(model.params, _batch(b, b)),
                     F64_REL)
    assert counter.frame_count == 1
