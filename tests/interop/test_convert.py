"""fdp.interop.jax: round trips are bitwise, memory is shared where promised, errors are clear."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from fdp.interop.jax import SUPPORTED_DTYPES, from_jax, to_jax  # noqa: E402

SIXTY_FOUR = (torch.int64, torch.uint64, torch.float64, torch.complex128)
LAYOUTS = ("contiguous", "transposed", "permuted", "strided", "expanded", "offset",
           "requires_grad", "conj")


class Pair(NamedTuple):
    first: torch.Tensor
    second: list


def _random(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random bit patterns (NaN payloads, negative zeros, subnormals included)."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape).bool()
    size = torch.empty((), dtype=dtype).element_size()
    count = int(np.prod(shape, dtype=np.int64))
    raw = torch.randint(0, 256, (count * size,), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1)
    if layout == "permuted" and x.dim() >= 3:
        return x.permute(1, 2, 0, *range(3, x.dim()))
    if layout == "strided" and x.dim() >= 1:
        return torch.cat([x, x], 0)[::2]
    if layout == "expanded":
        return x.unsqueeze(0).expand(3, *x.shape)
    if layout == "offset" and x.numel():
        return torch.cat([x.reshape(-1)[:1], x.reshape(-1)])[1:].view(x.shape)
    if layout == "requires_grad" and (x.is_floating_point() or x.is_complex()):
        return x.clone().requires_grad_(x.element_size() > 1)  # no grad for float8
    if layout == "conj" and x.is_complex():
        return x.conj()
    return x


def _bytes(x: torch.Tensor) -> bytes:
    if x.numel() == 0:
        return b""
    flat = x.detach().resolve_conj().clone(memory_format=torch.contiguous_format).reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def _jax_bytes(a) -> bytes:
    return np.ascontiguousarray(np.asarray(a)).reshape(-1).view(np.uint8).tobytes()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@given(dtype=st.sampled_from(SUPPORTED_DTYPES),
       shape=st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple),
       layout=st.sampled_from(LAYOUTS))
def test_round_trip_is_bitwise(dtype, shape, layout):
    x = _layout(_random(shape, dtype), layout)
    with jax.enable_x64(True):
        a = to_jax({"x": x})["x"]
        back = from_jax({"x": a})["x"]
    assert a.shape == tuple(x.shape) and np.dtype(a.dtype).name == _name(dtype)
    assert _jax_bytes(a) == _bytes(x)  # JAX sees the same logical array
    assert back.dtype == dtype and back.shape == x.shape and not back.requires_grad
    assert _bytes(back) == _bytes(x)


@given(dtype=st.sampled_from(SUPPORTED_DTYPES),
       shape=st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple))
def test_jax_to_torch_to_jax_is_bitwise_and_shares_memory(dtype, shape):
    values = np.frombuffer(_bytes(_random(shape, dtype)), jnp.dtype(_name(dtype))).reshape(shape)
    with jax.enable_x64(True):
        a = jnp.copy(jnp.asarray(values))  # a buffer XLA allocated (numpy's may be unaligned)
        t = from_jax(a)
        again = to_jax(t)
    assert _jax_bytes(again) == _jax_bytes(a) and again.dtype == a.dtype
    if t.numel():
        assert t.data_ptr() == a.unsafe_buffer_pointer() == again.unsafe_buffer_pointer()


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES, ids=_name)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "permuted", "requires_grad"])
def test_dense_tensors_share_memory_both_ways(dtype, layout):
    x = _layout(_random((2, 3, 4), dtype), layout)
    with jax.enable_x64(True):
        a = to_jax([x])[0]
        back = from_jax(a)
    assert a.unsafe_buffer_pointer() == x.data_ptr()
    assert back.data_ptr() == x.data_ptr() and back.stride() == x.stride()


@pytest.mark.parametrize("layout", ["strided", "expanded", "conj"])
def test_non_dense_tensors_are_copied_with_the_right_values(layout):
    x = _layout(torch.randn(4, 3, dtype=torch.complex64), layout)
    a = to_jax(x)
    assert a.unsafe_buffer_pointer() != x.data_ptr()
    assert _jax_bytes(a) == _bytes(x)


def test_copy_true_never_aliases_and_default_does():
    x = torch.zeros(4)
    shared, owned = to_jax(x), to_jax(x, copy=True)
    x[0] = 5.0  # documented: an in-place write shows through a zero-copy array
    assert float(shared[0]) == 5.0 and float(owned[0]) == 0.0
    t = from_jax(jnp.arange(3.0), copy=True)
    assert t.data_ptr() != 0 and t.tolist() == [0.0, 1.0, 2.0]
    a = jnp.arange(3.0)
    assert from_jax(a, copy=True).data_ptr() != a.unsafe_buffer_pointer()


def test_requires_grad_is_detached_without_copy():
    w = torch.randn(3, 2, requires_grad=True)
    loss_input = w * 2  # a non-leaf in a graph
    arrays = to_jax({"w": w, "h": loss_input})
    assert arrays["w"].unsafe_buffer_pointer() == w.data_ptr()
    assert np.array_equal(np.asarray(arrays["h"]), (w * 2).detach().numpy())
    assert w.grad is None and w.requires_grad


def test_bfloat16_bool_zero_dim_and_empty_keep_dtype_and_shape():
    tree = {"bf16": torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
            "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5),
            "empty": torch.zeros(0, 3, dtype=torch.int32)}
    arrays = to_jax(tree)
    assert arrays["bf16"].dtype == jnp.bfloat16 and arrays["bf16"].tolist() == [1.5, -2.25]
    assert arrays["bool"].dtype == jnp.bool_ and arrays["bool"].tolist() == [True, False, True]
    assert arrays["scalar"].shape == () and float(arrays["scalar"]) == 3.5
    assert arrays["empty"].shape == (0, 3) and arrays["empty"].dtype == jnp.int32
    back = from_jax(arrays)
    assert {k: (v.dtype, v.shape) for k, v in back.items()} == {
        k: (v.dtype, v.shape) for k, v in tree.items()}


# --- 64-bit types without x64 ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", SIXTY_FOUR, ids=_name)
def test_sixty_four_bit_without_x64_raises_naming_the_path(dtype):
    tree = {"params": {"w": torch.zeros(2, dtype=dtype)}}
    with jax.enable_x64(False), pytest.raises(
        TypeError, match=rf"to_jax: tree\['params'\]\['w'\] is {dtype}, but JAX's 64-bit mode "
                         rf"is off.*jax_enable_x64.*downcast=True"):
        to_jax(tree)


def test_downcast_converts_after_a_range_check():
    with jax.enable_x64(False):
        out = to_jax({"i": torch.tensor([-(2**31), 2**31 - 1]), "f": torch.tensor([0.1],
                      dtype=torch.float64), "c": torch.tensor([1 + 2j]),
                      "u": torch.tensor([0, 2**32 - 1], dtype=torch.uint64)}, downcast=True)
        assert out["i"].dtype == jnp.int32 and out["i"].tolist() == [-(2**31), 2**31 - 1]
        assert out["f"].dtype == jnp.float32 and float(out["f"][0]) == float(np.float32(0.1))
        assert out["c"].dtype == jnp.complex64 and complex(out["c"][0]) == 1 + 2j
        assert out["u"].dtype == jnp.uint32 and out["u"].tolist() == [0, 2**32 - 1]
        for bad in (torch.tensor([2**31]), torch.tensor([-(2**31) - 1]),
                    torch.tensor([2**32], dtype=torch.uint64),
                    torch.tensor([2**63], dtype=torch.uint64)):
            with pytest.raises(ValueError, match=r"tree\['x'\] is torch\.u?int64 with values "
                                                 r"(\[-?\d+, -?\d+\]|≥ 2\*\*63), which do not fit"):
                to_jax({"x": bad}, downcast=True)


def test_downcast_is_a_no_op_with_x64():
    with jax.enable_x64(True):
        a = to_jax(torch.tensor([2**40]), downcast=True)
    assert a.dtype == jnp.int64 and int(a[0]) == 2**40


# --- trees and key paths ------------------------------------------------------------------------

def test_nested_trees_keep_containers_order_and_key_paths():
    tree = {"z": [torch.ones(2), (torch.zeros(3), None)], "a": Pair(torch.arange(4.0),
                                                                     [torch.eye(2)])}
    arrays = to_jax(tree)
    assert list(arrays) == ["z", "a"] and isinstance(arrays["a"], Pair)
    assert isinstance(arrays["z"][1], tuple) and arrays["z"][1][1] is None
    # JAX flattens in sorted key order; each JAX key path holds the tensor at that path
    by_path = {jax.tree_util.keystr(p): v
               for p, v in jax.tree_util.tree_flatten_with_path(arrays)[0]}
    assert list(by_path) == ["['a'].first", "['a'].second[0]", "['z'][0]", "['z'][1][0]"]
    assert by_path["['a'].first"].tolist() == [0.0, 1.0, 2.0, 3.0]
    back = from_jax(arrays)
    assert list(back) == ["z", "a"] and torch.equal(back["a"].second[0], torch.eye(2))


def test_like_restores_torch_order_after_a_jax_transformation():
    params = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(2,
                                                                            dtype=torch.float64)}
    with jax.enable_x64(True):
        arrays = to_jax(params)
        grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2) + 3 * jnp.sum(p["b"]))(arrays)
        assert list(grads) == ["b", "w"]  # JAX rebuilt the dict sorted
        out = from_jax(grads, like=params)
    assert list(out) == ["w", "b"]
    assert torch.equal(out["w"], 2 * params["w"]) and torch.equal(out["b"], torch.full((2,), 3.0,
                                                                  dtype=torch.float64))


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("leaf, name", [(1.5, "float"), ("x", "str"), (np.ones(2), "ndarray"),
                                        (jnp.ones(2), "ArrayImpl")])
def test_to_jax_rejects_non_tensor_leaves(leaf, name):
    with pytest.raises(TypeError, match=rf"to_jax: tree\['a'\]\[1\] is a {name}, not a "
                                        rf"torch\.Tensor"):
        to_jax({"a": [torch.ones(1), leaf]})


@pytest.mark.parametrize("make", [lambda: torch.zeros(2, dtype=torch.complex32),
                                  lambda: torch.quantize_per_tensor(torch.zeros(2), 0.1, 0,
                                                                    torch.qint8)],
                         ids=["complex32", "qint8"])
@pytest.mark.filterwarnings("ignore::UserWarning")  # both dtypes are experimental/deprecated
def test_to_jax_rejects_unsupported_dtypes(make):
    with pytest.raises(TypeError, match=r"to_jax: tree\['q'\] has dtype .* which JAX cannot "
                                        r"receive.*Supported: bool"):
        to_jax({"q": make()})


def test_to_jax_rejects_sparse_and_transform_tensors():
    with pytest.raises(TypeError, match=r"tree\[0\] is a torch.sparse_coo tensor.*to_dense"):
        to_jax([torch.eye(2).to_sparse()])
    with pytest.raises(ValueError, match=r"tree\['x'\] .* torch.func transforms"):
        torch.func.vmap(lambda x: to_jax({"x": x}))(torch.ones(2, 3))


@pytest.mark.parametrize("leaf, match", [
    (np.ones(2), r"is a ndarray, not a jax\.Array; use torch\.from_numpy"),
    (3, r"is a int, not a jax\.Array"),
    (torch.ones(2), r"is a Tensor, not a jax\.Array"),
])
def test_from_jax_rejects_non_array_leaves(leaf, match):
    with pytest.raises(TypeError, match=r"from_jax: tree\['b'\] " + match):
        from_jax({"a": jnp.ones(1), "b": leaf})


def test_from_jax_rejects_dtypes_torch_lacks_and_tracers():
    with pytest.raises(TypeError, match=r"tree\['n'\] has dtype int4, which torch has no "
                                        r"counterpart"):
        from_jax({"n": jnp.ones(2, jnp.int4)})
    with pytest.raises(TypeError, match=r"tree is a JAX tracer .* outside the transformation"):
        jax.jit(from_jax)(jnp.ones(2))


def test_from_jax_like_mismatches_name_the_paths():
    like = {"w": torch.zeros(2), "b": [torch.zeros(1)]}
    with pytest.raises(ValueError, match=r"missing \[\"tree\['b'\]\[0\]\"\], unexpected "
                                         r"\[\"tree\['c'\]\"\]"):
        from_jax({"w": jnp.zeros(2), "c": jnp.zeros(1)}, like=like)
    with pytest.raises(ValueError, match=r"tree\['w'\] is torch.float32\[3\] but like has "
                                         r"torch.float32\[2\]"):
        from_jax({"w": jnp.zeros(3), "b": [jnp.zeros(1)]}, like=like)
    like64 = {"w": torch.zeros(2, dtype=torch.float64)}
    with jax.enable_x64(False), pytest.raises(ValueError, match=r"float32\[2\] but like has "
                                                                r"torch.float64\[2\].*x64"):
        from_jax({"w": jnp.zeros(2)}, like=like64)


def test_from_jax_rejects_deleted_arrays():
    a = jnp.ones(3)
    a.delete()
    with pytest.raises(ValueError, match=r"tree\[0\] was deleted"):
        from_jax([a])


def test_multi_device_arrays(host_devices):
    sharded = jax.pmap(lambda v: v * 2)(jnp.ones((len(host_devices), 3)))
    with pytest.raises(ValueError, match=r"tree\['g'\] is sharded over 8 devices .*\(x\[0\]\)"):
        from_jax({"g": sharded})
    assert from_jax({"g": sharded[0]})["g"].tolist() == [2.0, 2.0, 2.0]
    mesh = jax.sharding.Mesh(np.array(host_devices), ("d",))
    replicated = jax.device_put(jnp.arange(3.0), jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    assert from_jax(replicated).tolist() == [0.0, 1.0, 2.0]


def test_from_jax_like_must_match_none_and_tensor_leaves():
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(ValueError, match=r"tree\['a'\] is NoneType but like has Tensor"):
        from_jax({"a": None, "b": jnp.ones(2)}, like={"a": torch.zeros(2), "b": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"tree\['a'\] is .* but like has NoneType"):
        from_jax({"a": jnp.ones(2), "b": jnp.ones(2)}, like={"a": None, "b": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"tree\['a'\] is .* but like has int"):
        from_jax({"a": jnp.ones(2)}, like={"a": 3})
