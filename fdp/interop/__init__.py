"""Bridges between fdp and other array libraries.

Each bridge is a submodule that imports its library only when one of its functions is called, so
``import fdp`` and ``import fdp.interop`` never import an optional dependency:

- :mod:`fdp.interop.jax`: :func:`~fdp.interop.jax.to_jax` / :func:`~fdp.interop.jax.from_jax`,
  zero-copy pytree exchange with JAX through DLPack (``pip install "fdp[jax]"``).

Example:
    >>> import fdp.interop.jax
    >>> callable(fdp.interop.jax.to_jax)
    True
"""

__all__: list[str] = []
