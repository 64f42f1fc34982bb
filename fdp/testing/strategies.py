"""Hypothesis strategies for data-parallel property tests; needs ``hypothesis``.

``from fdp.testing import strategies as fst``, then ``fst.meshes()``, ``fst.mesh_batches()``,
``fst.splits(batch_size, n)``, ``fst.pytrees(batch_size)``, ``fst.model_cases()`` and
``fst.models()``. See ``docs/testing.md``.
"""

try:
    import hypothesis  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fdp.testing.strategies needs hypothesis: pip install hypothesis "
                      "(or fdp[test])") from e

from fdp.testing._models import ModelCase
from fdp.testing._strategies import (
    MeshBatch,
    mesh_batches,
    meshes,
    model_cases,
    models,
    pytrees,
    splits,
)

__all__ = ["MeshBatch", "ModelCase", "mesh_batches", "meshes", "model_cases", "models",
           "pytrees", "splits"]
