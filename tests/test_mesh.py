"""fdp.Mesh."""

from __future__ import annotations

import torch

import fdp


def test_mesh_surface():
    mesh = fdp.Mesh(3, axis_name="batch")
    assert (mesh.size, mesh.axis_name, mesh.backend_name) == (3, "batch", "vmap")
    assert mesh.devices == (torch.device("cpu"),) * 3
    assert mesh == fdp.Mesh(3, axis_name="batch") and hash(mesh) == hash(fdp.Mesh(3,
                                                                          axis_name="batch"))
    assert mesh != fdp.Mesh(3)
    assert "size=3" in repr(mesh)


def test_pmap_default_axis_name_is_the_mesh_s():
    mesh = fdp.Mesh(2, axis_name="batch")
    out = fdp.pmap(lambda x: fdp.psum(x, "batch"), mesh)(torch.ones(2))
    assert out.tolist() == [2.0, 2.0]
