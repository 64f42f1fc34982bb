"""``fdp.testing``: check that your own model trains identically under data parallelism.

* :func:`assert_dp_equivalent` compares data-parallel training with single-device training
  and, when they differ, names the layer, buffer or loss that breaks equivalence.
* :mod:`fdp.testing.strategies` (needs ``hypothesis``): meshes, uneven batch sizes and splits,
  pytrees of tensors and small models for property tests.

See ``docs/testing.md``.
"""

from fdp.testing._equivalence import assert_dp_equivalent
from fdp.testing._models import MLP, KwargsNet, ModelCase, SmallCNN
from fdp.testing._spec import Args

__all__ = ["MLP", "Args", "KwargsNet", "ModelCase", "SmallCNN", "assert_dp_equivalent"]


def __getattr__(name: str) -> object:
    if name == "strategies":  # imported on first use: it needs hypothesis
        import importlib

        return importlib.import_module("fdp.testing.strategies")
    raise AttributeError(f"module 'fdp.testing' has no attribute {name!r}")
