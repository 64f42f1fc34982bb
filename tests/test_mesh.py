"""fdp.Mesh."""

from __future__ import annotations

import pytest
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


def test_devices_accepts_any_iterable_and_refuses_none():
    assert fdp.Mesh(devices=(d for d in ["cpu", "cpu"])).size == 2
    with pytest.raises(TypeError, match=r"devices\[1\]"):
        fdp.Mesh(devices=["cpu", None])
    with pytest.raises(ValueError, match=r"devices\[0\]='cpx' is not a device"):
        fdp.Mesh(devices=["cpx"])
    with pytest.raises(TypeError, match="n must be an int"):
        fdp.Mesh(True, devices=["cpu"])


def test_meshes_pickled_by_fdp_0_1_still_load():
    import pickle

    from fdp import _mesh

    class Old:  # what fdp 0.1's Mesh.__reduce__ wrote
        def __init__(self, fn, args):
            self.fn, self.args = fn, args

        def __reduce__(self):
            return (self.fn, self.args)

    vmap = pickle.loads(pickle.dumps(Old(_mesh._rebuild_vmap, (3, "b", "cpu"))))
    threads = pickle.loads(pickle.dumps(Old(_mesh._rebuild_threads, (["cpu"] * 2, "dp", 9.0))))
    assert vmap == fdp.Mesh(3, axis_name="b")
    assert (threads.size, threads.backend_name, threads.backend.timeout) == (2, "threads", 9.0)
