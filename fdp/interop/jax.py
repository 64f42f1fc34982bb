"""Zero-copy exchange of pytrees of tensors between PyTorch and JAX, through DLPack.

:func:`to_jax` turns every ``torch.Tensor`` leaf of a tree into a ``jax.Array``;
:func:`from_jax` does the reverse. JAX is an optional dependency (``pip install "fdp[jax]"``):
this module imports it only when one of these functions runs.

What each conversion does, exactly:

- **Memory.** The result shares memory with its input when DLPack allows it: a tensor whose
  elements are dense (contiguous, or any permutation of a contiguous layout such as ``.t()``)
  and, on CPU, whose data pointer is 64-byte aligned (true for every tensor torch allocates;
  a view at an offset may not be). Anything else is copied: strided slices (``x[::2]``),
  broadcast views (``expand``), tensors with the conjugate/negative bit, and every conversion
  with ``copy=True``. Shared memory means that writing into the torch tensor in place changes
  the JAX array (which JAX assumes immutable): pass ``copy=True`` when you will mutate.
- **Autograd.** Tensors that require grad are detached; no gradient flows across the bridge.
- **dtypes** are kept: ``bool``, ``uint8/16/32/64``, ``int8/16/32/64``, ``float16``,
  ``bfloat16``, ``float32``, ``float64``, ``complex64/128`` and the float8 types both libraries
  know (:data:`SUPPORTED_DTYPES`). Others (``complex32``, quantized, bit and sub-byte types)
  raise ``TypeError`` naming the leaf.
- **64-bit types without JAX's x64 mode.** JAX would silently narrow ``int64``, ``uint64``,
  ``float64`` and ``complex128`` to 32 bits. :func:`to_jax` refuses instead (``TypeError``),
  unless you pass ``downcast=True``: then floats are rounded (``.to(torch.float32)``) and
  integers are converted after a range check (``ValueError`` if a value does not fit). Enable
  x64 with ``jax.config.update("jax_enable_x64", True)`` to keep 64 bits.
- **Trees** may nest dicts, lists, tuples, NamedTuples and ``None``. Leaves are matched by key
  path, never by position: JAX flattens dicts in sorted key order while torch keeps insertion
  order. The result has its input's containers (dict order included); ``from_jax(tree,
  like=ref)`` returns ``ref``'s containers and order instead, after checking that key paths,
  shapes and dtypes agree.
- **Devices.** The data stays where it is (a CUDA tensor needs a JAX with CUDA). A JAX array
  sharded over several devices (a ``jax.pmap`` output) is not one buffer: :func:`from_jax`
  takes a fully replicated one from its first device and raises for a sharded one.

Errors name the key path of the leaf (``tree['layers'][0].weight``) and say how to fix it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fdp import _tree

__all__ = ["SUPPORTED_DTYPES", "from_jax", "to_jax"]

PyTree = Any

_DTYPE_NAMES = (
    "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
)
_BY_NAME: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)
}
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(_BY_NAME.values())
"""The torch dtypes that cross the bridge unchanged (the 64-bit ones need JAX's x64 mode)."""

_NARROW = {torch.int64: torch.int32, torch.uint64: torch.uint32,
           torch.float64: torch.float32, torch.complex128: torch.complex64}
_X64_FIX = ('enable JAX\'s 64-bit mode (jax.config.update("jax_enable_x64", True), or '
            '"with jax.enable_x64(True):"), cast the tensor yourself, or pass downcast=True')


def _jax() -> Any:
    try:
        import jax
        import jax.numpy
    except ImportError as e:
        raise ImportError(
            f"fdp.interop.jax needs JAX, which could not be imported ({e}): "
            f'pip install "fdp[jax]" (or pip install jax)'
        ) from e
    return jax


def _x64(jax: Any) -> bool:
    """Whether JAX keeps 64-bit types right now (respects ``jax.enable_x64`` contexts)."""
    return np.dtype(jax.dtypes.canonicalize_dtype(np.int64)) == np.dtype(np.int64)


def to_jax(tree: PyTree, *, copy: bool = False, downcast: bool = False) -> PyTree:
    """Converts every tensor in ``tree`` to a ``jax.Array`` (zero-copy where possible).

    Args:
        tree: a pytree (dicts, lists, tuples, NamedTuples, ``None``) whose leaves are
            ``torch.Tensor`` s. Tensors that require grad are detached.
        copy: always copy, so the JAX arrays never alias the tensors (use it when the tensors
            will be written in place later).
        downcast: when JAX's x64 mode is off, convert ``int64``/``uint64`` to 32 bits (after
            checking every value fits) and ``float64``/``complex128`` to single precision,
            instead of raising. Has no effect when x64 is on.

    Returns:
        The same tree (containers and dict order kept) with ``jax.Array`` leaves of the same
        shapes and dtypes, on the tensors' devices.

    Raises:
        ImportError: JAX is not installed.
        TypeError: a leaf is not a tensor, has a dtype JAX cannot receive, is sparse, or is a
            64-bit tensor while x64 is off and ``downcast=False``.
        ValueError: ``downcast=True`` and an integer does not fit in 32 bits, or DLPack could
            not export the tensor (e.g. a device JAX does not have).

    Example:
        >>> import pytest; jnp = pytest.importorskip("jax.numpy")  # skipped without JAX
        >>> from fdp.interop.jax import to_jax
        >>> params = {"w": torch.ones(2, 3, requires_grad=True), "b": torch.zeros(3)}
        >>> arrays = to_jax(params)
        >>> list(arrays), arrays["w"].shape, arrays["w"].dtype
        (['w', 'b'], (2, 3), dtype('float32'))
        >>> arrays["w"].unsafe_buffer_pointer() == params["w"].data_ptr()  # no copy
        True
    """
    jax = _jax()
    x64 = _x64(jax)

    def convert(path: str, leaf: Any) -> Any:
        if leaf is None:  # an empty subtree for JAX, a leaf for torch's pytree
            return None
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"to_jax: {path} is a {type(leaf).__name__}, not a torch.Tensor; every leaf "
                f"must be a tensor (wrap numbers with torch.tensor(...), or leave them out of "
                f"the tree)"
            )
        return _tensor_to_jax(jax, path, leaf, copy=copy, downcast=downcast, x64=x64)

    return _tree.map_with_path(convert, tree, root="tree")


def _tensor_to_jax(
    jax: Any, path: str, x: torch.Tensor, *, copy: bool, downcast: bool, x64: bool
) -> Any:
    if x.layout != torch.strided:
        raise TypeError(f"to_jax: {path} is a {x.layout} tensor; DLPack carries dense tensors "
                        f"only: convert it with .to_dense() first")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"to_jax: {path} has dtype {x.dtype}, which JAX cannot receive through DLPack; "
            f"cast it first (e.g. .float()). Supported: {_names(SUPPORTED_DTYPES)}"
        )
    t = x.detach()
    if t.dtype in _NARROW and not x64:
        if not downcast:
            raise TypeError(
                f"to_jax: {path} is {t.dtype}, but JAX's 64-bit mode is off, so JAX would "
                f"silently make it {_NARROW[t.dtype]}; {_X64_FIX}"
            )
        t = _narrowed(t, path)
    t = t.resolve_conj().resolve_neg()
    if t.numel() == 0 or not _dense(t):
        t = t.contiguous()
    elif copy:  # on the torch side: jnp.from_dlpack(copy=True) may still alias on CPU
        t = t.clone()
    try:
        return jax.numpy.from_dlpack(t)
    except Exception as e:
        raise ValueError(
            f"to_jax: {path} ({t.dtype} on {t.device}) could not be exported through DLPack: "
            f"{str(e).rstrip('.')}. Tensors inside torch.func transforms or torch.compile "
            f"cannot be exported; for a device JAX does not have, move the tensor first "
            f"(e.g. .cpu())"
        ) from e


def _narrowed(t: torch.Tensor, path: str) -> torch.Tensor:
    target = _NARROW[t.dtype]
    if not t.is_floating_point() and not t.is_complex() and t.numel():
        info = torch.iinfo(target)
        # uint64 has no comparison kernels: read its bits as int64 (values >= 2**63 go negative)
        v = t.view(torch.int64) if t.dtype == torch.uint64 else t
        lo, hi = int(v.min()), int(v.max())
        span = f"[{lo}, {hi}]"
        if t.dtype == torch.uint64 and lo < 0:  # some value is >= 2**63
            lo, hi, span = 0, 2**63, "≥ 2**63"
        if lo < info.min or hi > info.max:
            raise ValueError(
                f"to_jax: {path} is {t.dtype} with values {span}, which do not fit "
                f"{target} (downcast=True, JAX's 64-bit mode off); enable x64 instead: "
                f'jax.config.update("jax_enable_x64", True)'
            )
    return t.to(target)


def _dense(t: torch.Tensor) -> bool:
    """Contiguous up to a permutation of the dimensions (what DLPack consumers accept)."""
    if t.is_contiguous():
        return True
    order = sorted(range(t.dim()), key=lambda d: t.stride()[d], reverse=True)
    return t.permute(order).is_contiguous()


def from_jax(tree: PyTree, *, like: PyTree = None, copy: bool = False) -> PyTree:
    """Converts every ``jax.Array`` in ``tree`` to a ``torch.Tensor`` (zero-copy).

    Args:
        tree: a pytree (dicts, lists, tuples, NamedTuples, ``None``) of concrete
            ``jax.Array`` s, e.g. what a jitted function returned.
        like: optional reference tree (e.g. the torch params). The result then has ``like``'s
            containers and dict order, and every leaf must have the key path, shape and dtype
            of ``like``'s leaf: use it to bring JAX's sorted dicts back to torch's order.
        copy: return tensors that own their memory. By default they share the JAX arrays'
            buffers, which JAX treats as immutable: do not write into them in place.

    Returns:
        The tree with ``torch.Tensor`` leaves of the same shapes and dtypes on the arrays'
        devices (``requires_grad=False``).

    Raises:
        ImportError: JAX is not installed.
        TypeError: a leaf is not a ``jax.Array`` (or is a tracer, inside a JAX
            transformation), or has a dtype torch does not have.
        ValueError: the tree does not match ``like`` (key paths, shapes or dtypes); an array is
            sharded over several devices or was deleted (donated).

    Example:
        >>> import pytest; jnp = pytest.importorskip("jax.numpy")  # skipped without JAX
        >>> from fdp.interop.jax import from_jax
        >>> params = {"w": torch.zeros(2), "b": torch.zeros(1)}   # insertion order: w, b
        >>> grads = {"b": jnp.ones(1), "w": jnp.full(2, 2.0)}      # e.g. from jax.grad
        >>> out = from_jax(grads, like=params)
        >>> list(out), out["w"]
        (['w', 'b'], tensor([2., 2.]))
    """
    jax = _jax()

    def convert(path: str, leaf: Any) -> torch.Tensor | None:
        return None if leaf is None else _array_to_torch(jax, path, leaf, copy)

    if like is None:
        return _tree.map_with_path(convert, tree, root="tree")
    found = dict(_tree.leaves_with_path(tree, "tree"))
    wanted = [p for p, _ in _tree.leaves_with_path(like, "tree")]
    if found.keys() != set(wanted):
        missing = sorted(set(wanted) - found.keys())[:5]
        extra = sorted(found.keys() - set(wanted))[:5]
        raise ValueError(
            f"from_jax: tree does not have the key paths of like: missing {missing}, "
            f"unexpected {extra}; pass a like with the tree's structure, or like=None"
        )

    def matched(path: str, ref: Any) -> torch.Tensor | None:
        if (found[path] is None) != (ref is None) or not (
            ref is None or isinstance(ref, torch.Tensor)
        ):
            raise ValueError(
                f"from_jax: {path} is {type(found[path]).__name__} but like has "
                f"{type(ref).__name__}; like must hold a tensor where the tree holds an array, "
                f"and None where it holds None"
            )
        out = convert(path, found[path])
        if (out is not None and isinstance(ref, torch.Tensor)
                and (out.shape != ref.shape or out.dtype != ref.dtype)):
            hint = ('; enable JAX\'s 64-bit mode (jax.config.update("jax_enable_x64", True)) '
                    "so that JAX computes in 64 bits"
                    if ref.dtype in _NARROW and out.dtype == _NARROW[ref.dtype]
                    and not _x64(jax) else "")
            raise ValueError(
                f"from_jax: {path} is {out.dtype}{list(out.shape)} but like has "
                f"{ref.dtype}{list(ref.shape)}{hint}"
            )
        return out

    return _tree.map_with_path(matched, like, root="tree")


def _array_to_torch(jax: Any, path: str, a: Any, copy: bool) -> torch.Tensor:
    if isinstance(a, jax.core.Tracer):
        raise TypeError(f"from_jax: {path} is a JAX tracer ({type(a).__name__}): from_jax ran "
                        f"inside jax.jit/grad/vmap; call it on the concrete results, outside "
                        f"the transformation")
    if not isinstance(a, jax.Array):
        hint = ("use torch.from_numpy for NumPy arrays" if isinstance(a, np.ndarray)
                else "wrap values with jnp.asarray(...), or leave them out of the tree")
        raise TypeError(f"from_jax: {path} is a {type(a).__name__}, not a jax.Array; {hint}")
    if a.is_deleted():
        raise ValueError(f"from_jax: {path} was deleted (donated to a jitted function?); "
                         f"convert it before it is donated")
    dtype = _BY_NAME.get(np.dtype(a.dtype).name)
    if dtype is None:
        raise TypeError(
            f"from_jax: {path} has dtype {a.dtype}, which torch has no counterpart for; "
            f"cast it in JAX first (e.g. x.astype(jnp.float32)). Supported: "
            f"{_names(SUPPORTED_DTYPES)}"
        )
    devices = a.sharding.device_set
    if len(devices) > 1:
        if not a.is_fully_replicated:
            raise ValueError(
                f"from_jax: {path} is sharded over {len(devices)} devices (e.g. a jax.pmap "
                f"output), and DLPack exchanges one buffer; take one replica (x[0]) or "
                f"move it to one device (jax.device_put(x, jax.devices()[0])) first"
            )
        a = a.addressable_shards[0].data
    try:
        t = torch.from_dlpack(a)
    except Exception as e:
        raise ValueError(
            f"from_jax: {path} ({a.dtype} on {next(iter(devices))}) could not be imported "
            f"through DLPack: {e}; for a device this torch build lacks, move the array first "
            f"(jax.device_put(x, jax.devices('cpu')[0]))"
        ) from e
    return t.clone() if copy else t


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)
