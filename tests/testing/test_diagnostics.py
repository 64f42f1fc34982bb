"""assert_dp_equivalent fails on models that break equivalence, and names the culprit."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fdp
from fdp.testing import assert_dp_equivalent
from fdp.testing import strategies as fst
from tests.testing.models import (
    BNNet,
    CenterNet,
    InlineCenterNet,
    RunningMax,
    mse,
    regression_batch,
)

# At least two replicas get rows (chunk/even, N >= 2, B >= 2), so shards differ from the batch.
_SPLIT_MESHES = fst.mesh_batches(min_size=2, max_size=6, min_batch=2, max_batch=12,
                                 kinds=["chunk", "even"])


def _failure(*args, **kwargs) -> AssertionError:
    with pytest.raises(AssertionError) as info:
        assert_dp_equivalent(*args, **kwargs)
    return info.value


def _culprits(error: AssertionError) -> list[str]:
    return re.findall(r"^  culprit: (.*)$", str(error), flags=re.M)


@given(mb=_SPLIT_MESHES, policy=st.sampled_from([None, "replica0", "mean"]))
def test_train_mode_batchnorm_is_named(mb, policy):
    """Per-replica BN statistics: the message names BatchNorm1d at 'encoder.bn' and the fix,
    whether DP returns other numbers (replica0/mean) or raises (no policy, 1-row shards)."""
    error = _failure(BNNet().double(), mse, regression_batch(mb.batch_size), mb.mesh,
                     split=mb.split, buffer_policy=policy)
    culprits = _culprits(error)
    assert culprits and culprits[0].startswith(
        "BatchNorm1d at 'encoder.bn' uses per-replica batch statistics")
    assert "buffer_policy='sync' with fdp.nn.convert_sync_batchnorm(model)" in culprits[0]
    assert len(culprits) == 1  # nothing else is blamed


@given(mb=_SPLIT_MESHES, data=st.data())
def test_drawn_models_with_train_mode_batchnorm_are_diagnosed(mb, data):
    """Every drawn MLP/CNN with a train-mode BatchNorm fails, naming the layer at 'body.bn'."""
    case = data.draw(fst.model_cases(["mlp", "cnn"], batch_size=mb.batch_size, batchnorm=True))
    policy = data.draw(st.sampled_from([None, "replica0", "mean"]))
    error = _failure(case.module, case.loss_fn, case.batch, mb.mesh, split=mb.split,
                     inputs=case.inputs, buffer_policy=policy)
    expected = "BatchNorm1d" if case.kind == "mlp" else "BatchNorm2d"
    assert _culprits(error)[0].startswith(
        f"{expected} at 'body.bn' uses per-replica batch statistics")


def test_batchnorm_without_policy_chains_fdp_error():
    error = _failure(BNNet().double(), mse, regression_batch(12), fdp.Mesh(4))
    assert isinstance(error.__cause__, ValueError)  # fdp's, naming the layer and the fix
    assert "'encoder.bn'" in str(error.__cause__) and "buffer_policy=" in str(error.__cause__)
    assert "Batch norm got a batched tensor" in str(error.__cause__.__cause__)  # torch's
    assert "data-parallel training raised ValueError" in str(error)
    assert _culprits(error)[0].startswith("BatchNorm1d at 'encoder.bn'")


def test_batchnorm_with_one_row_shards_chains_fdp_error():
    error = _failure(BNNet().double(), mse, regression_batch(10), fdp.Mesh(4),
                     buffer_policy="mean")  # chunk: 3, 3, 3, 1
    assert isinstance(error.__cause__, ValueError)
    assert "1 row per channel" in str(error.__cause__)
    culprit = _culprits(error)[0]
    assert culprit.startswith("BatchNorm1d at 'encoder.bn'")
    assert "on replica 3's shard of 1 row it raises ValueError" in culprit


def test_batchnorm_numbers_mismatch_lists_the_quantities():
    error = str(_failure(BNNet().double(), mse, regression_batch(12), fdp.Mesh(4),
                         buffer_policy="replica0"))
    assert "differs: loss:" in error and "differs: grads['encoder.fc.weight']" in error


@given(mb=_SPLIT_MESHES, dtype=st.sampled_from([torch.float64, torch.float32]))
def test_batch_mean_subtraction_is_named(mb, dtype):
    error = _failure(CenterNet().to(dtype), mse, regression_batch(mb.batch_size, dtype=dtype),
                     mb.mesh, split=mb.split)
    culprits = _culprits(error)
    assert culprits == [culprits[0]] and culprits[0].startswith(
        "BatchMeanCenter at 'center' mixes examples across the batch: its output rows depend "
        "on other rows, so a per-replica shard gives different values")


def test_mixing_in_a_forward_body_names_the_enclosing_module():
    culprit = _culprits(_failure(InlineCenterNet().double(), mse, regression_batch(9),
                                 fdp.Mesh(3)))[0]
    assert culprit.startswith("InlineCenterNet (the root module) mixes examples across the batch "
                              "in its own forward code: the rows it passes to Linear at 'fc2'")


def test_every_culprit_is_listed_in_execution_order():
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), CenterNet(5, 5, 2))
    culprits = _culprits(_failure(net.double(), mse, regression_batch(12), fdp.Mesh(3),
                                  buffer_policy="replica0"))
    assert [c.split(" mixes")[0].split(" uses")[0] for c in culprits] == [
        "BatchNorm1d at '1'", "BatchMeanCenter at '3.center'"]


@pytest.mark.parametrize("randomness", ["error", "different"])
def test_dropout_in_train_mode_is_named(randomness):
    net = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 2)).double()
    error = _failure(net, mse, regression_batch(8), fdp.Mesh(2), randomness=randomness)
    culprit = _culprits(error)[0]
    assert culprit.startswith("Dropout at '1' draws random numbers in training mode")
    assert "eval mode" in culprit
    assert_dp_equivalent(net.eval(), mse, regression_batch(8), fdp.Mesh(2))


def test_loss_that_is_not_a_per_example_mean_is_named():
    def spread(out, batch):
        return mse(out, batch) + out.std(0).sum()

    culprit = _culprits(_failure(nn.Linear(4, 2).double(), spread, regression_batch(9),
                                 fdp.Mesh(3)))[0]
    assert culprit.startswith("loss_fn is not a mean of per-example terms")
    assert "strategy='gather'" in culprit


def test_buffer_update_without_policy_is_named():
    net = nn.Sequential(nn.Linear(4, 5), RunningMax(), nn.Linear(5, 2)).double()
    error = str(_failure(net, mse, regression_batch(8), fdp.Mesh(2)))
    assert "differs: buffers['1.peak']" in error
    assert ("culprit: buffers['1.peak'] of RunningMax at '1' changes in single-device "
            "training, but with buffer_policy=None") in error


def test_buffer_the_policy_cannot_combine_is_named():
    net = nn.Sequential(nn.Linear(4, 5), RunningMax(), nn.Linear(5, 2)).double()
    error = str(_failure(net, mse, regression_batch(8), fdp.Mesh(2), buffer_policy="mean"))
    assert "culprit: buffers['1.peak'] of RunningMax at '1': its update depends on which rows" \
        in error


def test_a_model_from_functionalize_is_diagnosed_per_layer():
    model = fdp.functionalize(CenterNet().double())
    culprit = _culprits(_failure(model, mse, regression_batch(8), fdp.Mesh(2)))[0]
    assert culprit.startswith("BatchMeanCenter at 'center' mixes examples")


def test_a_bare_model_is_diagnosed_as_a_whole():
    def apply(params, buffers, x):
        h = x @ params["w"]
        return h - h.mean(0), buffers

    model = fdp.Model(apply, {"w": torch.randn(4, 2, dtype=torch.float64)}, {})
    culprit = _culprits(_failure(model, mse, regression_batch(8), fdp.Mesh(2)))[0]
    assert culprit.startswith("the model (fdp.Model.apply) mixes examples across the batch")


def test_sync_policy_on_an_unconverted_model_is_named():
    error = _failure(BNNet().double(), mse, regression_batch(8), fdp.Mesh(2),
                     buffer_policy="sync")
    assert isinstance(error.__cause__, ValueError)
    assert _culprits(error)[0].startswith("BatchNorm1d at 'encoder.bn' uses per-replica")


def test_sync_batchnorm_on_uneven_shards_blames_no_layer():
    fnn = pytest.importorskip("fdp.nn")
    synced = fnn.convert_sync_batchnorm(BNNet().double())
    error = _failure(synced, mse, regression_batch(10), fdp.Mesh(4), buffer_policy="sync")
    assert "needs every replica to hold the same number of rows" in str(error)
    assert _culprits(error)[0].startswith("no layer breaks equivalence")


def test_tolerances_can_be_loosened():
    net = CenterNet().double()
    _failure(net, mse, regression_batch(8), fdp.Mesh(2))
    assert_dp_equivalent(net, mse, regression_batch(8), fdp.Mesh(2), rtol=10.0, atol=10.0)


class _TokenLM(nn.Module):
    """A Hugging Face-like language model: with ``labels`` it returns its own loss, the mean
    over the tokens whose label is not -100."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(11, 8), nn.Linear(8, 11)

    def forward(self, ids, labels=None):
        logits = self.out(torch.tanh(self.emb(ids)))
        loss = nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1),
                                           ignore_index=-100)
        return {"loss": loss, "logits": logits}


def test_a_token_mean_loss_inside_the_model_is_named_not_blamed_on_the_root():
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (6, 5))
    labels = ids.clone()
    labels[0, 2:] = labels[3, 1:] = -100  # padding: rows hold different numbers of tokens
    batch = {"ids": ids, "labels": labels}
    with pytest.raises(AssertionError) as info:
        assert_dp_equivalent(_TokenLM().double(), lambda out, b: out["loss"], batch,
                             inputs=lambda b: fdp.testing.Args(b["ids"], labels=b["labels"]))
    culprits = [line for line in str(info.value).splitlines() if "culprit" in line]
    assert len(culprits) == 1, culprits
    assert "loss inside its forward (a scalar at out['loss'])" in culprits[0]
    assert "strategy='gather'" in culprits[0] and "mixes examples" not in culprits[0]


def test_many_alike_culprits_share_one_line():
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(4, 4), nn.BatchNorm1d(4)]
    model = nn.Sequential(*layers, nn.Linear(4, 2)).double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    with pytest.raises(AssertionError) as info:
        assert_dp_equivalent(model, lambda out, b: (out - b[1]).square().mean(), (x, y),
                             buffer_policy="replica0")
    culprits = [line for line in str(info.value).splitlines() if "culprit" in line]
    assert len(culprits) == 1, culprits
    assert "BatchNorm1d at '1' and 5 more BatchNorm1d layers ('3', '5', '7', ...)" in culprits[0]


def test_the_reference_is_torch_optim_on_frozen_and_unused_parameters(monkeypatch):
    """A data-parallel step that decayed frozen and unused parameters (what fdp 0.1 did) is
    caught; the step that leaves them alone passes."""
    from tests.test_frozen_and_unused import _partly

    module = _partly()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(7, 4, dtype=torch.float64, generator=g),
             torch.randn(7, 6, dtype=torch.float64, generator=g))

    def loss_fn(out, b):
        return (out - b[1]).square().mean()

    optimizer = fdp.optim.adamw(0.01, weight_decay=0.1)
    assert_dp_equivalent(module, loss_fn, batch, optimizer=optimizer, steps=2)
    import fdp._train as train

    real = train.value_and_grad
    monkeypatch.setattr(train, "value_and_grad",
                        lambda *a, **kw: real(*a, **{**kw, "unused": "zeros"}))
    with pytest.raises(AssertionError, match=r"params\['(stem\.weight|spare)'\] after step 1"):
        assert_dp_equivalent(module, loss_fn, batch, optimizer=optimizer, steps=2)
