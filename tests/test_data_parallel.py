"""fdp.DataParallel: nn.DataParallel's interface; training with torch.optim equals one device."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import fdp
from fdp._data_parallel import DataParallel
from tests.helpers import F64_REL, assert_close, assert_unchanged, snapshot, splits

F64 = torch.float64
_THREADS: dict[int, fdp.Mesh] = {}  # one threads mesh per size: its worker threads persist


BACKENDS = ["vmap", "threads"]


def _mesh(backend: str, n: int) -> fdp.Mesh:
    if backend == "vmap":
        return fdp.Mesh(n)
    if n not in _THREADS:
        _THREADS[n] = fdp.Mesh(devices=["cpu"] * n)
    return _THREADS[n]


backends = st.sampled_from(["vmap", "threads"])
sizes = st.integers(1, 4)


def _mlp(seed: int, bn: bool = False, d: int = 3, h: int = 5, c: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(d, h, bias=not bn), *([nn.BatchNorm1d(h)] if bn else []), nn.Tanh(),
              nn.Linear(h, c)]  # a bias before BatchNorm gets a zero gradient: rounding noise
    return nn.Sequential(*layers).double()


def _optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    return torch.optim.Adam(params, lr=1e-2)


def _chunk_reference(net: nn.Module, x: torch.Tensor, n: int, dim: int = 0) -> tuple:
    """nn.DataParallel on CPU: replica 0 is ``net`` itself on the first torch.chunk piece (its
    buffers are updated in place); the other replicas share its parameters and run on copies
    of its buffers. Returns the gathered output and every replica's new buffers."""
    params = dict(net.named_parameters())
    initial = {k: v.clone() for k, v in net.named_buffers()}
    chunks = x.chunk(n, dim)
    outs, per_replica = [net(chunks[0])], [dict(net.named_buffers())]
    for chunk in chunks[1:]:
        buffers = {k: v.clone() for k, v in initial.items()}
        outs.append(functional_call(net, (params, buffers), (chunk,)))
        per_replica.append(buffers)
    return torch.cat(outs, dim), per_replica


# --- training equals single-device training ---------------------------------------------------

@given(backend=backends, n=sizes, data=st.data(), steps=st.integers(1, 3),
       kind=st.sampled_from(["sgd", "adam"]), seed=st.integers(0, 100))
def test_torch_optim_training_equals_single_device(backend, n, data, steps, kind, seed):
    net = _mlp(seed)
    ref = copy.deepcopy(net)
    dp = DataParallel(net, _mesh(backend, n), split=data.draw(st.sampled_from(["chunk", "even"])))
    opt, ref_opt = _optimizer(kind, dp.parameters()), _optimizer(kind, ref.parameters())
    for _ in range(steps):
        b = data.draw(st.integers(1, 9), label="batch")
        x, y = torch.randn(b, 3, dtype=F64), torch.randint(0, 3, (b,))
        out, ref_out = dp(x), ref(x)
        assert_close(out, ref_out, F64_REL)
        for o, optim in ((out, opt), (ref_out, ref_opt)):
            optim.zero_grad()
            nn.functional.cross_entropy(o, y).backward()
            optim.step()
        assert_close(dict(net.named_parameters()), dict(ref.named_parameters()), F64_REL)


@given(backend=backends, n=sizes, b=st.integers(1, 9), data=st.data())
def test_explicit_split_grads_equal_single_device(backend, n, b, data):
    net = _mlp(0)
    ref = copy.deepcopy(net)
    x = torch.randn(b, 3, dtype=F64)
    dp = DataParallel(net, _mesh(backend, n), split=data.draw(splits(b, n)))
    dp(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert_close({k: p.grad for k, p in net.named_parameters()},
                 {k: p.grad for k, p in ref.named_parameters()}, F64_REL)


# --- buffer policies -------------------------------------------------------------------------

@given(backend=backends, n=sizes, b=st.integers(2, 12), seed=st.integers(0, 100))
def test_replica0_is_nn_data_parallel(backend, n, b, seed):
    """Outputs, gradients and kept BatchNorm statistics equal nn.DataParallel's semantics,
    including its error for a one-row piece in training."""
    net = _mlp(seed, bn=True)
    ref = copy.deepcopy(net)
    dp = DataParallel(net, _mesh(backend, n))
    for _ in range(2):
        x = torch.randn(b, 3, dtype=F64)
        try:
            expected, _ = _chunk_reference(ref, x, n)
        except ValueError:  # BatchNorm: a replica with one row
            with pytest.raises(ValueError, match=r"DataParallel: the BatchNorm1d layer .*1 row"):
                dp(x)
            return
        out = dp(x)
        assert_close(out, expected, F64_REL)
        out.square().sum().backward()
        expected.square().sum().backward()
        assert_close({k: p.grad for k, p in net.named_parameters()},
                     {k: p.grad for k, p in ref.named_parameters()}, F64_REL)
        assert_close(dict(net.named_buffers()), dict(ref.named_buffers()), F64_REL)


@given(backend=backends, n=st.integers(2, 4), b=st.integers(4, 12))
def test_mean_policy_weights_replicas_by_rows(backend, n, b):
    net = _mlp(1, bn=True)
    x = torch.randn(b, 3, dtype=F64)
    chunks = x.chunk(n)
    if min(c.shape[0] for c in chunks) < 2:
        return
    _, per_replica = _chunk_reference(copy.deepcopy(net), x, n)
    DataParallel(net, _mesh(backend, n), buffer_policy="mean")(x)
    got = dict(net.named_buffers())
    for key in ("1.running_mean", "1.running_var"):
        expected = sum(c.shape[0] * r[key] for c, r in zip(chunks, per_replica, strict=True)) / b
        assert_close(got[key], expected, F64_REL)
    assert int(got["1.num_batches_tracked"]) == 1


@given(backend=backends, n=sizes, b=st.integers(2, 12), seed=st.integers(0, 100))
def test_sync_policy_equals_single_device(backend, n, b, seed):
    net = _mlp(seed, bn=True)
    ref = copy.deepcopy(net)
    synced = fdp.nn.convert_sync_batchnorm(net)
    dp = DataParallel(synced, _mesh(backend, n), buffer_policy="sync")
    x = torch.randn(b, 3, dtype=F64)
    out, expected = dp(x), ref(x)
    assert_close(out, expected, F64_REL)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert_close({k: p.grad for k, p in synced.named_parameters()},
                 {k: p.grad for k, p in ref.named_parameters()}, F64_REL)
    assert_close(dict(synced.named_buffers()), dict(ref.named_buffers()), F64_REL)


def test_sync_policy_needs_converted_layers():
    net = _mlp(0, bn=True)
    before = snapshot(dict(net.named_buffers()))
    with pytest.raises(ValueError, match="convert_sync_batchnorm"):
        DataParallel(net, fdp.Mesh(2), buffer_policy="sync")(torch.randn(4, 3, dtype=F64))
    assert_unchanged(before, dict(net.named_buffers()))


@pytest.mark.parametrize("backend", ["vmap", "threads"])
def test_eval_mode_and_no_grad(backend):
    net = _mlp(0, bn=True)
    dp = DataParallel(net, _mesh(backend, 3))
    dp(torch.randn(6, 3, dtype=F64))  # train: running stats move
    dp.eval()
    buffers = snapshot(dict(net.named_buffers()))
    x = torch.randn(5, 3, dtype=F64)
    out = dp(x)
    assert_close(out, net(x), F64_REL)
    out.sum().backward()  # eval-mode stats saved for backward were not written to
    with torch.no_grad():
        plain = dp(x)
    assert not plain.requires_grad
    assert_close(plain, net(x), F64_REL)
    assert_unchanged(buffers, dict(net.named_buffers()))
    dp.train()
    dp(torch.randn(6, 3, dtype=F64))
    assert int(net[1].num_batches_tracked) == 2


# --- calling conventions ---------------------------------------------------------------------

class _Kwargs(nn.Module):
    """Nested inputs, a tensor keyword argument with a batch dim, and a Python one."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, inputs: dict, *, mask: torch.Tensor, scale: float = 1.0,
                tag: str = "a") -> dict:
        h = torch.tanh(self.enc(inputs["x"]) * scale) * mask.unsqueeze(-1)
        logits = self.head(h + inputs["aux"][0])
        return {"logits": logits, "parts": (h, None), "tag": tag}


@given(backend=backends, n=sizes, b=st.integers(1, 9))
def test_kwargs_nested_inputs_and_outputs(backend, n, b):
    torch.manual_seed(0)
    net = _Kwargs().double()
    ref = copy.deepcopy(net)
    inputs = {"x": torch.randn(b, 4, dtype=F64), "aux": (torch.randn(b, 6, dtype=F64),)}
    mask = (torch.rand(b, dtype=F64) > 0.3).double()
    call = ((inputs,), {"mask": mask, "scale": 0.7, "tag": "b"})
    before = snapshot(call)
    out = DataParallel(net, _mesh(backend, n))(inputs, mask=mask, scale=0.7, tag="b")
    expected = ref(inputs, mask=mask, scale=0.7, tag="b")
    assert out["tag"] == "b" and out["parts"][1] is None
    assert_close(out["logits"], expected["logits"], F64_REL)
    assert_close(out["parts"][0], expected["parts"][0], F64_REL)
    (out["logits"].sum() + out["parts"][0].sum()).backward()
    (expected["logits"].sum() + expected["parts"][0].sum()).backward()
    assert_close({k: p.grad for k, p in net.named_parameters()},
                 {k: p.grad for k, p in ref.named_parameters()}, F64_REL)
    assert_unchanged(before, call)


@given(backend=backends, n=sizes, b=st.integers(1, 9), dim=st.sampled_from([1, -2]))
def test_sequence_first_batches(backend, n, b, dim):
    net = nn.Linear(3, 2).double()
    ref = copy.deepcopy(net)
    x = torch.randn(4, b, 3, dtype=F64)  # [T, B, features]
    out = DataParallel(net, _mesh(backend, n), dim=dim)(x)
    assert_close(out, ref(x), F64_REL)
    out.square().sum().backward()
    ref(x).square().sum().backward()
    assert_close(net.weight.grad, ref.weight.grad, F64_REL)


def test_state_dict_matches_nn_data_parallel_and_default_mesh():
    net = _mlp(0, bn=True)
    dp = DataParallel(net)
    assert list(dp.state_dict()) == list(nn.DataParallel(net).state_dict())
    assert (dp.mesh.size, dp.mesh.backend_name) == (1, "vmap")  # a CPU module: itself, one replica
    x = torch.randn(4, 3, dtype=F64)
    assert_close(dp(x), copy.deepcopy(net)(x), F64_REL)
    assert DataParallel(net, fdp.Mesh(2), output_device="cpu")(x).device.type == "cpu"


@pytest.mark.parametrize("backend", ["vmap", "threads"])
def test_train_eval_switch_reaches_every_replica(backend):
    """Replica copies of the module follow .eval()/.train() between calls (the collective
    keeps all replica threads inside the module at once, so the threads mesh uses copies)."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), _Center()).double()
    dp = DataParallel(net, _mesh(backend, 3))
    x = torch.randn(6, 3, dtype=F64)
    dp(x)
    dp.eval()
    h = net[0](x)  # eval: dropout is the identity, _Center subtracts the batch mean
    assert_close(dp(x), h - h.mean(0), F64_REL)


# --- randomness ------------------------------------------------------------------------------

def test_dropout_draws_per_replica_and_reproducibly():
    net = nn.Dropout(0.5)
    x = torch.ones(4, 64)
    torch.manual_seed(1)
    first = DataParallel(net, fdp.Mesh(2))(x)
    torch.manual_seed(1)
    assert torch.equal(DataParallel(net, fdp.Mesh(2))(x), first)
    assert not torch.equal(first[:2], first[2:])  # "different": each replica its own mask
    same = DataParallel(net, fdp.Mesh(2), randomness="same")(x)
    assert torch.equal(same[:2], same[2:])
    with pytest.raises(ValueError, match=r"DataParallel: .*randomness='different'"):
        DataParallel(net, fdp.Mesh(2), randomness="error")(x)


# --- collectives inside the module -----------------------------------------------------------

class _Center(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - fdp.pmean(x.mean(0), "dp")


def test_collective_in_module():
    x = torch.arange(8.0, dtype=F64).unsqueeze(1)
    out = DataParallel(_Center(), fdp.Mesh(2))(x)  # even: one group, the collective runs
    assert_close(out, x - x.mean(), F64_REL)
    assert_close(DataParallel(_Center(), _mesh("threads", 3))(x[:7]).shape, (7, 1), 0)
    with pytest.raises(ValueError, match="calls a collective"):
        DataParallel(_Center(), fdp.Mesh(3))(x[:7])  # vmap, uneven: groups run apart
    for mesh in (fdp.Mesh(3), _mesh("threads", 3)):  # 3, 3, 1 rows: replicas 0, 1, 2
        index = DataParallel(_Index(), mesh)(x[:7]).squeeze(1)
        assert index.tolist() == [0, 0, 0, 1, 1, 1, 2]


class _Index(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0 + fdp.axis_index("dp")


# --- errors ----------------------------------------------------------------------------------

def test_option_errors():
    net = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module"):
        DataParallel(lambda x: x)
    with pytest.raises(TypeError, match=r"mesh must be an fdp.Mesh.*devices=\['cuda:0'"):
        DataParallel(net, [0, 1])
    with pytest.raises(TypeError, match="dim must be an int"):
        DataParallel(net, dim=0.0)
    with pytest.raises(ValueError, match="unknown split"):
        DataParallel(net, split="random")
    with pytest.raises(ValueError, match="unknown buffer_policy"):
        DataParallel(net, buffer_policy="first")
    with pytest.raises(ValueError, match="unknown randomness"):
        DataParallel(net, randomness="per-row")


def test_call_errors():
    dp = DataParallel(nn.Linear(3, 2), fdp.Mesh(2))
    with pytest.raises(TypeError, match="must be Tensor"):  # no tensor: the module runs it
        dp(3.0)
    with pytest.raises(TypeError, match=r"inputs\[0\] is a ndarray.*torch\.as_tensor"):
        dp(torch.ones(2, 3).numpy())
    with pytest.raises(ValueError, match=r"inputs\[0\] has 4 rows but kwargs\['mask'\] has 3"):
        DataParallel(_Masked(), fdp.Mesh(2))(torch.randn(4, 3), mask=torch.ones(3))
    with pytest.raises(TypeError, match=r"not a torch\.Tensor; convert it"):
        DataParallel(_Masked(), fdp.Mesh(2))(torch.randn(4, 3), mask=torch.ones(4).numpy())
    with pytest.raises(ValueError, match=r"inputs\[1\] has shape \(\), without a dim=0"):
        dp(torch.randn(4, 3), torch.tensor(2.0))
    with pytest.raises(ValueError, match="empty"):
        dp(torch.randn(0, 3))
    with pytest.raises(ValueError, match="split=\\[1, 2\\] sums to 3"):
        DataParallel(nn.Linear(3, 2), fdp.Mesh(2), split=[1, 2])(torch.randn(4, 3))
    with pytest.raises(ValueError, match="returned a scalar"):
        DataParallel(_Sum(), fdp.Mesh(2))(torch.randn(4, 3))
    with pytest.raises(ValueError, match="on cpu but the mesh's first replica is on meta"):
        DataParallel(nn.Linear(3, 2), fdp.Mesh(2, device="meta"))(torch.randn(4, 3))


class _Masked(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x * mask.unsqueeze(-1)


class _Sum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


def test_forward_is_pure_in_its_inputs_and_parameters():
    net = _mlp(0, bn=True)
    x = torch.randn(8, 3, dtype=F64)  # 3, 3, 2 rows
    before = snapshot((x, dict(net.named_parameters())))
    DataParallel(net, fdp.Mesh(3))(x)
    assert_unchanged(before, (x, dict(net.named_parameters())))


@pytest.mark.parametrize("backend", ["vmap", "threads"])
def test_deepcopy_is_an_independent_module_on_the_same_mesh(backend):
    dp = DataParallel(_mlp(0, bn=True), _mesh(backend, 2))
    x = torch.randn(6, 3, dtype=F64)
    dp(x)
    clone = copy.deepcopy(dp)
    assert clone.mesh is dp.mesh and clone.module[0].weight is not dp.module[0].weight
    assert_close(clone(x), dp(x), F64_REL)  # both take one more step of running statistics
    clone.module[0].weight.data.zero_()
    assert not torch.equal(clone(x), dp(x))


def test_pickles_with_a_vmap_mesh(tmp_path):
    dp = DataParallel(_mlp(0), fdp.Mesh(2))
    x = torch.randn(5, 3, dtype=F64)
    dp(x)
    torch.save(dp, tmp_path / "dp.pt")
    loaded = torch.load(tmp_path / "dp.pt", weights_only=False)
    assert_close(loaded(x), dp(x), F64_REL)


# --- the nn.DataParallel contract: the corners ------------------------------------------------

def _lstm(layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.LSTM(3, 4, num_layers=layers, batch_first=True).double()


@pytest.mark.filterwarnings("ignore::fdp.FallbackWarning")
@pytest.mark.parametrize(("backend", "layers", "rows"), [
    ("vmap", 3, 5), ("vmap", 3, 6), ("threads", 3, 5), ("threads", 3, 6),
    ("vmap", 2, 5),  # shards of 2, 2, 1 rows: the groups tell h_n's batch dim from its layers
])
def test_rnn_outputs_are_gathered_along_their_own_batch_dim(backend, layers, rows):
    lstm = _lstm(layers)
    x = torch.randn(rows, 7, 3, dtype=torch.float64)
    out, (h, c) = DataParallel(lstm, _mesh(backend, 3))(x)
    ref_out, (ref_h, ref_c) = lstm(x)
    assert h.shape == ref_h.shape == (layers, rows, 4)  # the batch at dim 1
    for a, b in ((out, ref_out), (h, ref_h), (c, ref_c)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    (out.sum() + h.square().sum()).backward()
    grads = {k: p.grad.clone() for k, p in lstm.named_parameters()}
    lstm.zero_grad()
    (ref_out.sum() + ref_h.square().sum()).backward()
    for k, p in lstm.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_module_without_tensor_arguments_runs_as_itself(backend):
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, scale=2.0):
            return self.w * scale

    module = Constant()
    out = DataParallel(module, _mesh(backend, 2))()
    assert torch.equal(out, 2 * torch.ones(3))
    out.sum().backward()
    assert torch.equal(module.w.grad, 2 * torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffers_that_require_grad_get_their_gradient(backend):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.full((3,), 2.0, dtype=torch.float64,
                                                     requires_grad=True))

        def forward(self, x):
            return x * self.scale

    module = Scaled()
    x = torch.randn(5, 3, dtype=torch.float64)
    out = DataParallel(module, _mesh(backend, 2))(x)
    assert out.requires_grad
    out.sum().backward()
    torch.testing.assert_close(module.scale.grad, x.sum(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_gradients(backend):
    emb = nn.Embedding(10, 3, sparse=True).double()
    ids = torch.tensor([1, 2, 2, 7, 9])
    DataParallel(emb, _mesh(backend, 2))(ids).square().sum().backward()
    got = emb.weight.grad
    emb.weight.grad = None
    emb(ids).square().sum().backward()
    assert got.is_sparse
    torch.testing.assert_close(got.to_dense(), emb.weight.grad.to_dense())


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_grad_inside_the_forward_warns_and_keeps_the_gradients(backend):
    class Clearing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            self.zero_grad()
            return self.fc(x)

    module = Clearing()
    module.fc.weight.grad = torch.ones(2, 3)
    with pytest.warns(UserWarning, match=r"zero_grad\(\) from a module created with"):
        DataParallel(module, _mesh(backend, 2))(torch.randn(4, 3))
    assert torch.equal(module.fc.weight.grad, torch.ones(2, 3))


def test_lazy_modules_get_a_clear_error():
    with pytest.raises(ValueError, match=r"lazy parameters \['weight', 'bias'\].*module\("):
        DataParallel(nn.LazyLinear(2), fdp.Mesh(2))(torch.randn(4, 3))
    with pytest.raises(ValueError, match="lazy parameters"):
        fdp.functionalize(nn.LazyLinear(2))


def test_a_forward_leaves_no_reference_cycles_of_fdps():
    """nn.DataParallel leaves none. Neither do fdp's functions, nor, on a threads mesh, the
    pytree walks; on the vmap backend torch.func's own pytree walks leave some (torch's code,
    outside fdp's reach)."""
    import gc

    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    for mesh in (fdp.Mesh(devices=["cpu"] * 2), fdp.Mesh(2)):
        dp = DataParallel(net, mesh)
        dp(torch.randn(5, 3))
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            dp(torch.randn(5, 3))
            gc.collect()
            functions = [(o.__module__, o.__qualname__) for o in gc.garbage
                         if type(o).__name__ == "function"]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert not [f for f in functions if f[0].startswith("fdp")], functions[:5]
        if mesh.backend_name == "threads":
            assert not [f for f in functions if f[0] == "torch.utils._pytree"], functions[:5]
