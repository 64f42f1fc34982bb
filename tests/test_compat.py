"""The private torch APIs behind ``fdp._compat`` still behave as fdp needs (a torch upgrade
that moves one fails here, by name)."""

from __future__ import annotations

import torch
from torch import nn

from fdp import _compat


def test_prefix_broadcasting():
    tree = ({"a": 1, "b": 2}, 3)
    assert _compat.broadcast_prefix_and_flatten((0, None), tree) == [0, 0, None]
    assert _compat.broadcast_prefix_and_flatten(({"a": 1, "b": 0}, 2), tree) == [1, 0, 2]
    assert _compat.broadcast_prefix_and_flatten((0, None, 1), tree) is None
    assert _compat.broadcast_prefix_and_flatten(({"a": 1}, 2), tree) is None


def test_cycle_free_pytrees_equal_torchs():
    import torch.utils._pytree as torch_pytree

    tree = {"a": [torch.ones(1), (2, None)], "b": {"c": 5.0}}
    leaves, spec = _compat.tree_flatten(tree)
    assert (leaves, spec) == torch_pytree.tree_flatten(tree)
    assert _compat.tree_flatten_with_path(tree) == torch_pytree.tree_flatten_with_path(tree)
    assert _compat.tree_structure(tree) == spec
    doubled = _compat.tree_map(lambda x, y: None if x is None else x + y, tree, tree)
    assert _compat.tree_flatten(doubled)[0] == [None if x is None else x + x for x in leaves]
    assert _pytree_garbage(lambda: torch_pytree.tree_flatten(tree))  # the check can fail
    assert not _pytree_garbage(lambda: (_compat.tree_flatten(tree),
                                        _compat.tree_map(lambda x: x, tree),
                                        _compat.broadcast_prefix_and_flatten(0, tree)))


def _pytree_garbage(walk):
    """The functions of pytree walks that ``walk`` left in reference cycles."""
    import gc

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(5):
            walk()
        gc.collect()
        return [o for o in gc.garbage if callable(o) and getattr(o, "__module__", None)
                in ("torch.utils._pytree", "fdp._compat")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_functorch_transform_detection():
    seen = []

    def f(x):
        seen.append(_compat.in_functorch_transform())
        seen.append(_compat.is_functorch_wrapped(x))
        return x

    assert not _compat.in_functorch_transform()
    assert not _compat.is_functorch_wrapped(torch.ones(2))
    torch.func.vmap(f)(torch.ones(3, 2))
    torch.func.grad(lambda x: f(x).sum())(torch.ones(2))
    assert seen == [True, True, True, True]


def test_forward_ad_transform_detection():
    seen = []

    def f(x):
        seen.append(_compat.in_forward_ad())
        return x.sin()

    x = torch.ones(2)
    f(x)
    torch.func.grad(lambda t: f(t).sum())(x)
    torch.func.jvp(f, (x,), (x,))
    torch.func.vmap(lambda r: torch.func.jvp(f, (r,), (r,))[1])(torch.ones(3, 2))
    torch.func.jacfwd(f)(x)
    assert seen == [False, False, True, True, True]


def test_compiling_is_per_thread_and_true_only_where_traced():
    """``compiling()`` is True in traced code (also under fullgraph), False in eager code, in
    a frame dynamo fell back from, and in a thread other than the one compiling."""
    import threading

    def guarded(x):  # as fdp's collectives' guard: the raise makes dynamo fall back
        if _compat.compiling():
            raise RuntimeError("traced")
        return x - 1

    x = torch.ones(2)
    assert not _compat.compiling()
    assert torch.equal(torch.compile(lambda t: t + 1 if _compat.compiling() else t,
                                     fullgraph=True)(x), x + 1)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(guarded)(x), x - 1)
    seen: list[bool] = []

    class Exported(nn.Module):
        def forward(self, t):
            seen.append(_compat.compiling())
            return t.sin()

    torch.export.export(Exported(), (x,), strict=False)
    started, release = threading.Event(), threading.Event()

    def slow_backend(gm, example_inputs):
        started.set()
        release.wait(30)
        return gm

    other = threading.Thread(target=lambda: torch.compile(lambda t: t.cos(),
                                                          backend=slow_backend)(x))
    other.start()
    try:
        assert started.wait(30)
        seen += [torch.compiler.is_compiling(), _compat.compiling()]
    finally:
        release.set()
        other.join(30)
        torch._dynamo.reset()
    assert seen == [True, True, False]


def test_batchnorm_base_and_lazy_modules():
    for layer in (nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.SyncBatchNorm(3)):
        assert isinstance(layer, _compat.BatchNormBase)
    lazy = nn.LazyLinear(2)
    assert isinstance(lazy.weight, _compat.UninitializedTensorMixin)
    lazy(torch.ones(1, 3))
    assert not isinstance(lazy.weight, _compat.UninitializedTensorMixin)


def test_add_note():
    error = ValueError("boom")
    _compat.add_note(error, "where")
    assert "where" in (getattr(error, "__notes__", None) or [str(error)])[-1]



def test_storage_use_count_counts_every_tensor_on_the_memory():
    from fdp._compat import storage_use_count

    flat = torch.empty(10)
    alone = storage_use_count(flat)
    view = flat[2:5]
    alias = flat.detach()
    assert storage_use_count(flat) == alone + 2
    del view, alias
    assert storage_use_count(flat) == alone
    array = flat[:3].numpy()  # the array keeps the view alive
    assert storage_use_count(flat) == alone + 1
    del array
    capsule = torch.utils.dlpack.to_dlpack(flat[1:])
    assert storage_use_count(flat) == alone + 1
    del capsule
    assert storage_use_count(flat) == alone
    # torch caches one storage object per storage, so holding it does not count here (the
    # step's recycler holds that object and watches its reference count instead)
    storage = flat.untyped_storage()
    assert flat[1:].untyped_storage() is storage


def test_functorch_kinds_names_the_active_transforms_outermost_first():
    from fdp._compat import functorch_kinds

    seen = []

    def f(x):
        seen.append(functorch_kinds())
        return x.sum()

    assert functorch_kinds() == ()
    torch.func.grad(lambda x: torch.func.vmap(f)(x).sum())(torch.ones(2, 3))
    assert seen == [("Grad", "Vmap")]


def test_compile_counter_counts_compiled_frames():
    from fdp._compat import compile_counter

    torch.compiler.reset()
    counter = compile_counter()
    compiled = torch.compile(lambda x: x + 1, backend=counter)
    assert torch.equal(compiled(torch.ones(2)), torch.full((2,), 2.0))
    compiled(torch.ones(2))
    assert counter.frame_count == 1
    torch.compiler.reset()
