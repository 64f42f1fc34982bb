"""fdp.functionalize: a pure apply that matches the module."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fdp
from tests.helpers import KwargsNet, assert_unchanged, snapshot


def test_apply_matches_module_and_is_pure_with_batchnorm():
    module = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU()).train()
    reference = copy.deepcopy(module)
    model = fdp.functionalize(module)
    x = torch.randn(8, 4)
    before = snapshot((model.params, model.buffers))
    out, new_buffers = model.apply(model.params, model.buffers, x)
    assert_unchanged(before, (model.params, model.buffers))
    expected = reference(x)
    assert torch.allclose(out, expected)
    for name, buf in reference.named_buffers():
        assert torch.equal(new_buffers[name], buf), name
    assert new_buffers["1.num_batches_tracked"].item() == 1
    assert module[1].num_batches_tracked.item() == 0  # the module itself is untouched


def test_failed_call_leaves_buffers_untouched():
    module = nn.BatchNorm1d(3).train()
    model = fdp.functionalize(module)
    before = snapshot(model.buffers)
    with pytest.raises(ValueError):
        model.apply(model.params, model.buffers, torch.randn(1, 3))  # BN needs > 1 value
    assert_unchanged(before, model.buffers)


def test_module_tensors_are_restored_after_an_error():
    module = nn.Linear(3, 2)
    weight = module.weight
    model = fdp.functionalize(module)
    with pytest.raises(RuntimeError):
        model.apply(model.params, model.buffers, torch.randn(2, 5))  # wrong width
    assert module.weight is weight


def test_tied_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, idx):
            return self.out(self.emb(idx))

    module = Tied()
    model = fdp.functionalize(module)
    assert sorted(model.params) == ["emb.weight"]
    new_weight = torch.randn(5, 3)
    idx = torch.tensor([0, 3])
    out, _ = model.apply({"emb.weight": new_weight}, {}, idx)
    assert torch.allclose(out, new_weight[idx] @ new_weight.T)


def test_kwargs_and_buffer_reassignment():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(()))

        def forward(self, x):
            self.count = self.count + 1  # re-assigns instead of updating in place
            return x

    model = fdp.functionalize(Counter())
    _, new = model.apply(model.params, model.buffers, torch.ones(1))
    assert new["count"].item() == 1 and model.buffers["count"].item() == 0

    net = fdp.functionalize(KwargsNet())
    x = {"x": torch.randn(2, 4), "aux": (torch.randn(2, 6),)}
    out, _ = net.apply(net.params, net.buffers, x, scale=0.5, mask=torch.ones(2))
    assert out.shape == (2,)


def test_apply_under_compile_matches_eager():
    module = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    model = fdp.functionalize(module)
    x = torch.randn(5, 4)
    compiled = torch.compile(lambda p, x: model.apply(p, model.buffers, x)[0])
    assert torch.allclose(compiled(model.params, x), module(x))


def test_apply_never_lends_the_users_module_to_other_threads():
    """While one thread runs ``apply`` with other params, another thread that uses the module
    itself sees its own parameters only (outputs and ``state_dict``)."""
    import threading

    torch.manual_seed(0)
    net = nn.Linear(3, 2).double()
    model = fdp.functionalize(net)
    other = {k: torch.randn_like(v) for k, v in model.params.items()}
    x = torch.randn(4, 3, dtype=torch.float64)
    expected = net(x).detach()
    stop, wrong = threading.Event(), []

    def apply_loop():
        while not stop.is_set():
            model.apply(other, model.buffers, x)

    thread = threading.Thread(target=apply_loop)
    thread.start()
    try:
        for _ in range(3000):
            if not torch.equal(net(x).detach(), expected):
                wrong.append("output")
            if not torch.equal(net.state_dict()["weight"], model.params["weight"]):
                wrong.append("state_dict")
    finally:
        stop.set()
        thread.join()
    assert not wrong, f"{len(wrong)} observations of the other params, e.g. {wrong[:3]}"
