"""Random ops inside pmap / value_and_grad: vmap's randomness modes, reproducible by seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fdp


def _dropout_masks(randomness, n=8, p=0.3, width=4000):
    f = fdp.pmap(lambda x: nn.functional.dropout(x, p) != 0, fdp.Mesh(n),
                 randomness=randomness)
    return f(torch.ones(n, width))


def test_different_replicas_get_different_masks_with_the_right_keep_rate():
    torch.manual_seed(3)
    masks = _dropout_masks("different")
    assert all(not torch.equal(masks[0], masks[i]) for i in range(1, 8))
    keep = masks.float().mean().item()  # 32 000 Bernoulli(0.7) draws: std ≈ 0.0026
    assert abs(keep - 0.7) < 0.015


def test_same_mode_gives_every_replica_the_same_mask():
    torch.manual_seed(3)
    masks = _dropout_masks("same")
    assert all(torch.equal(masks[0], masks[i]) for i in range(1, 8))


def test_a_seed_reproduces_the_masks_bit_for_bit():
    torch.manual_seed(11)
    first = _dropout_masks("different")
    torch.manual_seed(11)
    assert torch.equal(first, _dropout_masks("different"))


def test_default_mode_raises_on_random_ops():
    with pytest.raises(ValueError, match=r"pmap: torch.nn.functional.dropout.*randomness"):
        _dropout_masks("error")
    with pytest.raises(ValueError, match=r"unknown randomness='sometimes'"):
        fdp.pmap(lambda x: x, fdp.Mesh(2), randomness="sometimes")


def test_value_and_grad_with_dropout_is_reproducible_and_uses_the_keep_rate():
    model = fdp.functionalize(nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5),
                                            nn.Linear(32, 2)).train())

    def loss_fn(params, batch):
        out, _ = model.apply(params, model.buffers, batch["x"])
        return nn.functional.cross_entropy(out, batch["y"])

    batch = {"x": torch.randn(21, 6), "y": torch.randint(0, 2, (21,))}
    vg = fdp.value_and_grad(loss_fn, fdp.Mesh(4), randomness="different")
    torch.manual_seed(5)
    loss_a, grads_a = vg(model.params, batch)
    torch.manual_seed(5)
    loss_b, grads_b = vg(model.params, batch)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    torch.manual_seed(6)
    loss_c, _ = vg(model.params, batch)
    assert not torch.equal(loss_a, loss_c)  # another seed, other masks
    with pytest.raises(ValueError, match="unknown randomness"):
        fdp.value_and_grad(loss_fn, fdp.Mesh(4), randomness="per-step")
