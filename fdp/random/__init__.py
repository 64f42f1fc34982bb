"""``fdp.random``: explicit, counter-based random numbers (JAX-style keys).

A *key* is a small int64 tensor (two 32-bit words). Random values are a pure function of the
key and a *counter*: :func:`uniform`, :func:`bernoulli` and :func:`normal` hash them with
Philox-4x32-10 (the generator behind torch's and cuRAND's CUDA RNG), written with integer
tensor ops only. So draws do not depend on a global generator, a device, a backend or how a
batch is split: they are identical on CPU and CUDA, inside ``torch.func.vmap`` (a batched key
or counter included) and under ``torch.compile``.

For per-example randomness (dropout) the counter is the example's row in the *full* batch
(:func:`row_index`), so every replica of a data-parallel run draws exactly what a
single-device run draws for the same example. Layers find the step's key through
:func:`key_context`; see ``docs/randomness.md``.

32-bit words live in int64 carriers; no operation overflows int64 (a product of a word and a
multiplier is formed as ``x * (m - 2**32)``, which fits), and every result is masked to 32 bits.
"""

from fdp.random._context import key_context, next_key, row_index, with_key
from fdp.random._keys import _key_words as _key_words  # checks keys (value_and_grad, ...)
from fdp.random._keys import fold_in, key, split
from fdp.random._sample import bernoulli, bits, normal, uniform

__all__ = ["bernoulli", "bits", "fold_in", "key", "key_context", "next_key", "normal",
           "row_index", "split", "uniform", "with_key"]
