"""Keyed functional and attention dropout: data-parallel training with the dropout of
transformer attention (``F.dropout``, ``F.scaled_dot_product_attention(dropout_p=...)``, as in
Hugging Face models) equals single-device training with the same key."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fdp
import fdp.random as R
from tests.helpers import F64_REL, assert_close

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


class _GPTBlock(nn.Module):
    """GPT-2-like: causal attention through SDPA with dropout_p, F.dropout on the residual,
    torch.dropout on the mlp; an attention mask from the padding."""

    def __init__(self, width: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj, self.mlp = nn.Linear(width, 3 * width), nn.Linear(width, width), \
            nn.Linear(width, width)
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        mask = keep[:, None, None, :].expand(b, 1, t, t) & torch.ones(t, t, dtype=torch.bool).tril()
        mask = mask | torch.eye(t, dtype=torch.bool)  # every query sees itself
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=0.2 if self.training else 0.0)
        h = x + F.dropout(self.proj(a.transpose(1, 2).reshape(b, t, w)), 0.1, self.training)
        h = h + torch.dropout(torch.tanh(self.mlp(h)), 0.3, self.training)
        return self.head(h.mean(1))


def _case(rows: int, seed: int):
    torch.manual_seed(seed)
    net = fdp.nn.convert_dropout(_GPTBlock().double(), functional=True)
    model = fdp.functionalize(net)
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows, 6, generator=g) > 0.3
    batch = {"x": torch.randn(rows, 6, 8, dtype=torch.float64, generator=g), "keep": keep,
             "y": torch.randn(rows, 2, dtype=torch.float64, generator=g)}

    def loss_fn(params, batch):
        out, _ = model.apply(params, model.buffers, batch["x"], batch["keep"])
        return (out - batch["y"]).square().mean()

    return model, loss_fn, batch


@pytest.mark.parametrize("backend", ["vmap", "threads"])
@given(rows=st.integers(1, 9), n=st.integers(1, 4), seed=st.integers(0, 3))
def test_attention_dropout_under_dp_equals_one_device(backend, rows, n, seed):
    model, loss_fn, batch = _case(rows, seed)
    key = R.key(seed)
    with R.key_context(key):
        ref = loss_fn(model.params, batch)
    ref_grads = torch.func.grad(lambda p: R.with_key(loss_fn)(p, batch, key))(model.params)
    mesh = fdp.Mesh(n) if backend == "vmap" else fdp.Mesh(devices=["cpu"] * n)
    loss, grads = fdp.value_and_grad(R.with_key(loss_fn), mesh, split="even")(
        model.params, batch, key)
    assert_close(loss, ref, F64_REL)
    assert_close(grads, ref_grads, F64_REL)


def test_the_masks_follow_the_key():
    model, loss_fn, batch = _case(5, 0)
    losses = []
    for k in (0, 0, 1):
        with R.key_context(R.key(k)):
            losses.append(loss_fn(model.params, batch))
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])
    model.apply.module.eval()  # eval mode: no dropout, no key needed
    out_eval = model.apply(model.params, model.buffers, batch["x"], batch["keep"])[0]
    assert out_eval.shape == (5, 2)


def test_keyed_sdpa_dropout_is_torchs_attention_when_p_is_zero():
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(5, 5) > 0.3
    mask |= torch.eye(5, dtype=torch.bool)
    from fdp.nn._keyed import _attention_with_keyed_dropout

    with R.key_context(R.key(0)):
        mine = _attention_with_keyed_dropout(1e-30, None, query=q, key=k, value=v,
                                             attn_mask=mask, is_causal=False)
    torch.testing.assert_close(mine, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_multihead_attention_dropout_cannot_be_keyed_and_says_so():
    net = nn.Sequential(nn.Linear(4, 4))
    net.add_module("attn", nn.MultiheadAttention(4, 2, dropout=0.1))
    with pytest.raises(ValueError, match=r"module\.attn is an nn\.MultiheadAttention with "
                                         r"dropout=0\.1.*dropout = 0\.0"):
        fdp.nn.convert_dropout(net, functional=True)
    fdp.nn.convert_dropout(net)  # without functional=True its nn.Dropout layers are keyed
