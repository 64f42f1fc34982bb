"""Shared test helpers: strategies, small models, tolerances, snapshots for purity checks."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

import fdp

F64_REL = 1e-10  # float64: DP equals single-device up to summation order
F32_REL = 1e-5  # float32: loose enough for accumulation order (worst seen ~1e-6)


def assert_close(actual: Any, expected: Any, rel: float) -> None:
    """Tree comparison relative to each leaf's scale (so near-zero entries don't dominate)."""
    fdp.tree.map_with_path(lambda p, a, e: _leaf_close(p, a, e, rel), actual, expected)


def _leaf_close(path: str, a: Any, e: Any, rel: float) -> None:
    if not isinstance(e, torch.Tensor):
        assert a == e, f"{path}: {a!r} != {e!r}"
        return
    assert isinstance(a, torch.Tensor), f"{path}: got {type(a).__name__}"
    assert a.shape == e.shape and a.dtype == e.dtype, f"{path}: {a.dtype}{list(a.shape)} vs " \
        f"{e.dtype}{list(e.shape)}"
    if not e.is_floating_point():
        assert torch.equal(a, e), f"{path}: integer values differ"
        return
    scale = e.detach().abs().max().item() if e.numel() else 0.0
    err = (a.detach() - e.detach()).abs().max().item() if e.numel() else 0.0
    assert err <= rel * max(scale, 1e-30) + 1e-300, (
        f"{path}: max abs err {err:.3e} > {rel:g} * scale {scale:.3e}"
    )


def snapshot(tree: Any) -> list[tuple[str, Any, int]]:
    """Values and version counters of every tensor leaf, to prove nothing was mutated."""
    return [(p, x.detach().clone(), x._version) if isinstance(x, torch.Tensor) else (p, x, 0)
            for p, x in fdp.tree.leaves_with_path(tree)]


def assert_unchanged(before: list, tree: Any) -> None:
    after = snapshot(tree)
    assert len(before) == len(after)
    for (p, v0, ver0), (_, v1, ver1) in zip(before, after, strict=True):
        if isinstance(v0, torch.Tensor):
            assert ver0 == ver1, f"{p}: version counter changed (in-place write)"
            assert torch.equal(v0, v1), f"{p}: value changed"
        else:
            assert v0 == v1, f"{p}: changed"


# --- strategies -------------------------------------------------------------------------------

mesh_sizes = st.integers(1, 8)
batch_sizes = st.integers(1, 64)


@st.composite
def splits(draw: Any, batch: int, n: int) -> Any:
    """A split rule: 'chunk', 'even' or explicit sizes (zeros allowed) summing to ``batch``."""
    kind = draw(st.sampled_from(["chunk", "even", "explicit"]))
    if kind != "explicit":
        return kind
    cuts = sorted(draw(st.lists(st.integers(0, batch), min_size=n - 1, max_size=n - 1)))
    edges = [0, *cuts, batch]
    return [b - a for a, b in itertools.pairwise(edges)]


# --- models -----------------------------------------------------------------------------------

def mlp(d: int = 5, h: int = 7, c: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c))


def cnn(c: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, c))


class KwargsNet(nn.Module):
    """A model whose forward takes keyword arguments and a nested input."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.enc = nn.Linear(d, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, inputs: dict, *, scale: float = 1.0, mask: torch.Tensor | None = None):
        h = torch.tanh(self.enc(inputs["x"]) * scale)
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.head(h + inputs["aux"][0]).squeeze(-1)
