"""Bad input: each case raises ValueError/TypeError naming the argument or key path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fdp

M4 = fdp.Mesh(4)
P = {"w": torch.ones(3)}


def _loss(p, b):
    return (b * p["w"]).sum(-1).mean()


def _pmap(fn, *args, **kw):
    return lambda: fdp.pmap(fn, M4, **kw)(*args)


CASES = {
    "mesh n=0": (lambda: fdp.Mesh(0), ValueError, r"n must be ≥ 1 .* n=0"),
    "mesh n<0": (lambda: fdp.Mesh(-2), ValueError, r"n=-2"),
    "mesh n not int": (lambda: fdp.Mesh("4"), TypeError, r"n must be an int"),
    "mesh no n": (lambda: fdp.Mesh(), TypeError, r"number of replicas"),
    "mesh empty devices": (lambda: fdp.Mesh(devices=[]), ValueError, r"devices is empty"),
    "mesh bad axis name": (lambda: fdp.Mesh(2, axis_name=""), TypeError, r"axis_name"),
    "not a mesh": (lambda: fdp.scatter(torch.ones(4), 4), TypeError, r"mesh must be an fdp.Mesh"),
    "batch sizes differ": (
        lambda: fdp.scatter({"x": torch.ones(4, 2), "y": torch.ones(5)}, M4), ValueError,
        r"batch\['x'\] has 4 rows, batch\['y'\] has 5"),
    "dim out of range": (
        lambda: fdp.scatter({"x": torch.ones(4)}, M4, dim=1), ValueError,
        r"dim=1 is out of range for batch\['x'\]"),
    "sizes don't sum": (
        lambda: fdp.scatter(torch.ones(6), M4, split=[1, 1, 1, 1]), ValueError,
        r"split=\[1, 1, 1, 1\] sums to 4 but the batch has 6 rows"),
    "sizes wrong count": (
        lambda: fdp.scatter(torch.ones(6), M4, split=[3, 3]), ValueError, r"must list 4 ints"),
    "negative size": (
        lambda: fdp.scatter(torch.ones(2), M4, split=[3, -1, 0, 0]), ValueError, r"negative"),
    "unknown split": (
        lambda: fdp.scatter(torch.ones(4), M4, split="pad"), ValueError,
        r"unknown split='pad'; use 'chunk', 'even'"),
    "numpy leaf": (
        lambda: fdp.scatter({"x": np.ones(4)}, M4), TypeError,
        r"batch\['x'\] is a ndarray.*torch.as_tensor"),
    "empty batch": (lambda: fdp.scatter(torch.ones(0, 3), M4), ValueError, r"batch is empty"),
    "no tensors": (lambda: fdp.scatter({"a": 1}, M4), ValueError, r"no tensor leaves"),
    "psum outside pmap": (lambda: fdp.psum(torch.ones(1), "dp"), ValueError,
                          r"axis name 'dp' is not bound.*fdp.pmap"),
    "unknown axis name": (_pmap(lambda x: fdp.psum(x, "model"), torch.ones(4)), ValueError,
                          r"unknown axis name 'model'; bound axis names: \('dp',\)"),
    "axis_index outside": (lambda: fdp.axis_index("dp"), ValueError, r"not bound"),
    "in_axes wrong length": (_pmap(lambda a, b: a, torch.ones(4), torch.ones(4),
                                   in_axes=(0,)), ValueError, r"in_axes has 1 entries .* 2"),
    "in_axes wrong structure": (_pmap(lambda a: a, {"x": torch.ones(4)},
                                      in_axes=({"y": 0},)), ValueError,
                                r"in_axes=.* does not match the structure"),
    "in_axes not int": (_pmap(lambda a: a, torch.ones(4), in_axes="0"), TypeError,
                        r"in_axes must be an int or None"),
    "mapped size != mesh": (_pmap(lambda a: a, {"x": torch.ones(3)}), ValueError,
                            r"args\[0\]\['x'\] has size 3 at in_axes=0 but the mesh has 4"),
    "in_axes out of range": (_pmap(lambda a: a, torch.ones(4), in_axes=2), ValueError,
                             r"in_axes=2 is out of range for args\[0\]"),
    "out_axes None differs": (_pmap(lambda a: a * 2, torch.arange(4.0), out_axes=None),
                              ValueError, r"out_axes=None for out, but its value differs"),
    "out_axes out of range": (_pmap(lambda a: a.sum(), torch.ones(4, 2), out_axes=1),
                              ValueError, r"out_axes=1 is out of range for out"),
    "sharded layouts differ": (_pmap(lambda a, b: a, fdp.scatter(torch.ones(8), M4),
                                     fdp.scatter(torch.ones(7), M4)),
                               ValueError, r"different layouts"),
    "sharded in_axes None": (_pmap(lambda a: a, fdp.scatter(torch.ones(8), M4), in_axes=None),
                             ValueError, r"args\[0\] is Sharded .* in_axes is None"),
    "params not a dict": (lambda: fdp.value_and_grad(_loss, M4)([torch.ones(3)], torch.ones(4,
                                                                                         3)),
                          TypeError, r"params must be a dict of tensors"),
    "params leaf not tensor": (lambda: fdp.value_and_grad(_loss, M4)({"w": [1.0]},
                                                                    torch.ones(4, 3)),
                               TypeError, r"params\['w'\] is a list"),
    "integer params": (lambda: fdp.value_and_grad(_loss, M4)({"w": torch.ones(3, dtype=int)},
                                                            torch.ones(4, 3)),
                       TypeError, r"params\['w'\] is torch.int64"),
    "loss not scalar": (lambda: fdp.value_and_grad(lambda p, b: b * p["w"], M4)(
        P, torch.ones(4, 3)), ValueError, r"loss_fn must return a scalar .* \(1, 3\)"),
    "has_aux without aux": (lambda: fdp.value_and_grad(_loss, M4, has_aux=True)(
        P, torch.ones(4, 3)), TypeError, r"has_aux=True, loss_fn must return \(loss, aux\)"),
    "gather needs split_loss": (lambda: fdp.value_and_grad(_loss, M4, strategy="gather"),
                                TypeError, r"fdp.split_loss\(forward, criterion\)"),
    "unknown strategy": (lambda: fdp.value_and_grad(_loss, M4, strategy="avg"), ValueError,
                         r"strategy='avg'"),
    "unknown reduction": (lambda: fdp.value_and_grad(_loss, M4, reduction="max"), ValueError,
                          r"reduction='max'"),
    "vg unknown split": (lambda: fdp.value_and_grad(_loss, M4, split="pad"), ValueError,
                         r"split='pad'"),
    "vg sharded batch": (lambda: fdp.value_and_grad(_loss, M4)(P, fdp.scatter(torch.ones(4, 3),
                                                                              M4)),
                         TypeError, r"pass the full batch"),
    "all_reduce op": (lambda: fdp.all_reduce(torch.ones(4), M4, "prod"), ValueError,
                      r"unknown op='prod'"),
    "all_reduce weights op": (lambda: fdp.all_reduce(torch.ones(4), M4, "sum", weights=[1] * 4),
                              ValueError, r"weights only apply to op='mean'"),
    "all_reduce weights shape": (lambda: fdp.all_reduce(torch.ones(4), M4, weights=[1, 2]),
                                 ValueError, r"weights has shape \(2,\).*\(4,\)"),
    "all_reduce negative weights": (lambda: fdp.all_reduce(torch.ones(4), M4,
                                                           weights=[1, -1, 1, 1]),
                                    ValueError, r"non-negative"),
    "all_reduce int mean": (lambda: fdp.all_reduce({"c": torch.ones(4, dtype=int)}, M4),
                            TypeError, r"tree\['c'\] is torch.int64"),
    "all_reduce no replica axis": (lambda: fdp.all_reduce({"a": torch.ones(3)}, M4),
                                   ValueError, r"tree\['a'\] has shape \(3,\).*size 4"),
    "all_reduce python leaf": (lambda: fdp.all_reduce({"a": 1.0}, M4), TypeError,
                               r"tree\['a'\] is a float"),
    "gather no replica axis": (lambda: fdp.gather({"o": torch.ones(2, 3)}, M4), ValueError,
                               r"outs\['o'\] has shape \(2, 3\)"),
    "gather scalar per replica": (lambda: fdp.gather(torch.ones(4), M4), ValueError,
                                  r"dim=0 is out of range for outs.*all_reduce"),
    "gather wrong mesh": (lambda: fdp.gather(fdp.scatter(torch.ones(4), fdp.Mesh(2)), M4),
                          ValueError, r"split over 2 replicas but the mesh has 4"),
    "unreplicate wrong size": (lambda: fdp.unreplicate({"w": torch.ones(3, 2)}, M4),
                               ValueError, r"tree\['w'\] has shape \(3, 2\)"),
    "replicate numpy": (lambda: fdp.replicate({"w": np.ones(2)}, M4), TypeError,
                        r"tree\['w'\] is a ndarray"),
    "functionalize non-module": (lambda: fdp.functionalize(lambda x: x), TypeError,
                                 r"module must be a torch.nn.Module"),
    "apply wrong keys": (lambda: fdp.functionalize(nn.Linear(2, 2)).apply({"weight":
                                                                           torch.ones(2, 2)},
                                                                          {}, torch.ones(1, 2)),
                         ValueError, r"params does not match the module: missing \['bias'\]"),
    "apply wrong shape": (lambda: fdp.functionalize(nn.Linear(2, 3)).apply(
        {"weight": torch.ones(2, 3), "bias": torch.ones(3)}, {}, torch.ones(1, 2)), ValueError,
        r"params\['weight'\] has shape \(2, 3\) but the module's is \(3, 2\)"),
    "vg empty params": (lambda: fdp.value_and_grad(_loss, M4)({}, torch.ones(4, 3)), ValueError,
                        r"params is empty"),
    "vg aux not tensor": (lambda: fdp.value_and_grad(lambda p, b: (_loss(p, b), 3), M4,
                                                     has_aux=True)(P, torch.ones(4, 3)),
                          TypeError, r"aux is a int.*torch.tensor"),
    "gather forward scalar": (lambda: fdp.value_and_grad(
        fdp.split_loss(lambda p, b: (b * p["w"]).sum(), lambda o, b: o.sum()), M4,
        strategy="gather")(P, torch.ones(4, 3)), ValueError,
        r"forward returned \(\) at out .* per-example outputs"),
    "vg wrong device": (lambda: fdp.value_and_grad(_loss, M4)(
        {"w": torch.ones(3, device="meta")}, torch.ones(4, 3)), ValueError,
        r"params\['w'\] is on meta but the mesh's replicas live on cpu"),
    "pmap wrong device": (_pmap(lambda a: a, torch.ones(4, device="meta")), ValueError,
                          r"args\[0\] is on meta"),
    "unreplicate sharded": (lambda: fdp.unreplicate(fdp.scatter(torch.ones(4), M4), M4),
                            TypeError, r"tree is an fdp.Sharded .*fdp.gather"),
    "out_axes structure": (_pmap(lambda a: (a, a), torch.ones(4), out_axes=(0, 0, 0)),
                           ValueError, r"does not match the structure of the outputs"),
    "sharded in_axes 1": (_pmap(lambda a: a, fdp.scatter(torch.ones(8), M4), in_axes=1),
                          ValueError, r"in_axes is 1"),
    "all_gather axis": (_pmap(lambda x: fdp.all_gather(x, "dp", axis=3), torch.ones(4)),
                        ValueError, r"axis=3 is out of range"),
    "psum_scatter size": (_pmap(lambda x: fdp.psum_scatter(x, "dp"), torch.ones(4, 3)),
                          ValueError, r"psum_scatter: dimension scatter_dimension=0 has size 3"),
    "psum_scatter groups": (_pmap(lambda x: fdp.psum_scatter(
        x, "dp", axis_index_groups=[[0, 1], [2, 3]]),
                                  torch.ones(4, 4)),
                            ValueError, r"psum_scatter: axis_index_groups is not supported"),
    "ppermute repeat": (_pmap(lambda x: fdp.ppermute(x, "dp", [(0, 1), (2, 1)]), torch.ones(4)),
                        ValueError, r"ppermute: perm\[1\]=\(2, 1\) repeats"),
    "axis tuple repeat": (_pmap(lambda x: fdp.psum(x, ("dp", "dp")), torch.ones(4)),
                          ValueError, r"psum: axis_name=\('dp', 'dp'\) names an axis more"),
    "pmap fn not callable": (lambda: fdp.pmap(3, M4), TypeError, r"fn must be callable"),
    "ravel non-tensor": (lambda: fdp.tree.ravel({"a": 1.0}), TypeError,
                         r"tree\['a'\] is a float"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case):
    call, exc, pattern = CASES[case]
    with pytest.raises(exc, match=pattern):
        call()


def test_there_are_many_distinct_cases():
    assert len(CASES) >= 15
