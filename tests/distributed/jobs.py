"""The programs the distributed tests run: the same code on every backend.

Each ``*_on`` function takes a mesh and returns plain tensors; the ``dist_*`` jobs build a
distributed mesh on the pool's group and call the same function, so that a test compares one
program across vmap, threads and distributed meshes. Jobs are module-level (picklable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import fdp
import fdp.launch

# --- models -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A small model and how it is trained (hashable, picklable, drawn by hypothesis)."""

    d: int = 3
    widths: tuple[int, ...] = (5,)
    out: int = 2
    act: str = "tanh"
    loss: str = "mse"  # "mse" | "ce"
    strategy: str = "weighted"  # "weighted" | "gather"
    split: Any = "chunk"
    opt: str = "sgd"  # "sgd" | "momentum" | "adam"


def module(spec: Spec) -> nn.Module:
    layers: list[nn.Module] = []
    d = spec.d
    for w in spec.widths:
        layers += [nn.Linear(d, w), nn.Tanh() if spec.act == "tanh" else nn.Sigmoid()]
        d = w
    layers.append(nn.Linear(d, spec.out))
    return nn.Sequential(*layers).double()


def loss_fn(spec: Spec) -> Any:
    model = fdp.functionalize(module(spec))

    def forward(params: dict, batch: dict) -> torch.Tensor:
        return model.apply(params, model.buffers, batch["x"])[0]

    def criterion(out: torch.Tensor, batch: dict) -> torch.Tensor:
        if spec.loss == "ce":
            return nn.functional.cross_entropy(out, batch["y"])
        return ((out - batch["t"]) ** 2).mean()

    if spec.strategy == "gather":
        return fdp.split_loss(forward, criterion)
    return lambda params, batch: criterion(forward(params, batch), batch)


def optimizer(spec: Spec) -> Any:
    if spec.opt == "adam":
        return fdp.optim.adam(0.05, eps=1e-3)  # eps keeps rounding noise in ~0 grads small
    return fdp.optim.sgd(0.1, momentum=0.9 if spec.opt == "momentum" else 0.0)


def train_on(mesh: fdp.Mesh, spec: Spec, params: dict, batches: list[dict]) -> dict:
    """First-batch loss and grads, then per-step losses and the params after the steps."""
    fn, opt = loss_fn(spec), optimizer(spec)
    loss, grads = fdp.value_and_grad(fn, mesh, strategy=spec.strategy,
                                     split=_split(spec.split))(params, batches[0])
    step = fdp.data_parallel_step(fn, opt, mesh, strategy=spec.strategy,
                                  split=_split(spec.split))
    state = fdp.TrainState.create(params, opt)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    return {"loss": loss, "grads": grads, "losses": torch.stack(losses), "params": state.params}


def train_single(spec: Spec, params: dict, batches: list[dict]) -> dict:
    """The same training on one device, with torch.func and no mesh."""
    fn, opt = loss_fn(spec), optimizer(spec)
    grad_fn = torch.func.grad_and_value(fn)
    grads, loss = grad_fn(params, batches[0])
    state, current, losses = opt.init(params), dict(params), []
    for batch in batches:
        g, step_loss = grad_fn(current, batch)
        updates, state = opt.update(g, state, current)
        current = fdp.optim.apply_updates(current, updates)
        losses.append(step_loss)
    return {"loss": loss, "grads": grads, "losses": torch.stack(losses), "params": current}


def _split(split: Any) -> Any:
    return list(split) if isinstance(split, tuple) else split


# --- collectives --------------------------------------------------------------------------------


def collectives_on(mesh: fdp.Mesh, x: torch.Tensor, rows: torch.Tensor, axis: int) -> dict:
    """Every collective inside pmap, under grad and vmap inside the replica too.

    ``x`` has a leading axis of this process's replicas; ``rows`` is a global batch that
    :func:`fdp.scatter` splits (unevenly when its size is not a multiple of the mesh size).
    """

    def body(v: torch.Tensor) -> dict:
        return {
            "psum": fdp.psum(v, "dp"), "pmean": fdp.pmean(v, "dp"),
            "pmax": fdp.pmax(v, "dp"), "pmin": fdp.pmin(v, "dp"),
            "all_gather": fdp.all_gather(v, "dp", axis=axis),
            "tiled": fdp.all_gather(v, "dp", tiled=True),
            "index": fdp.axis_index("dp"), "size": torch.tensor(fdp.axis_size("dp")),
            "psum_int": fdp.psum(torch.ones((), dtype=torch.int64), "dp"),
            "grad": torch.func.grad(lambda u: (fdp.psum(u, "dp") ** 2).sum()
                                    + fdp.pmax(u.sin(), "dp").sum())(v),
            "vmap": torch.func.vmap(lambda u: fdp.pmean(u * u, "dp"))(v),
        }

    out = fdp.pmap(body, mesh)(x)

    def masked(batch: torch.Tensor) -> torch.Tensor:
        mask = fdp._collectives.row_mask("dp")
        keep = torch.ones(batch.shape[0], dtype=batch.dtype) if mask is None \
            else mask.to(batch.dtype)
        total = fdp.psum((batch.sum(-1) * keep).sum(), "dp")
        return total / fdp.psum(keep.sum(), "dp") + batch * 0

    sharded = fdp.scatter(rows, mesh)
    out["masked"] = fdp.gather(fdp.pmap(masked, mesh)(sharded), mesh)
    out["gathered"] = fdp.gather(sharded, mesh)
    out["reduced"] = fdp.all_reduce(x, mesh, "mean", weights=sharded.layout.sizes)
    out["replicated"] = fdp.unreplicate(fdp.replicate({"r": rows}, mesh), mesh)["r"]
    return out


def exchange_on(mesh: fdp.Mesh, x: torch.Tensor, perm: tuple[int, ...]) -> dict:
    """The collectives that move parts of values (``x``: ``[replicas here, 2 * N, N]``), their
    gradients (``torch.func.grad`` inside the replica), and JAX's integer semantics."""
    n = mesh.size

    def body(v: torch.Tensor) -> dict:
        def moved(u: torch.Tensor) -> dict:
            return {
                "scatter": fdp.psum_scatter(u, "dp", scatter_dimension=1),
                "scatter_tiled": fdp.psum_scatter(u, "dp", tiled=True),
                "a2a": fdp.all_to_all(u, "dp", 1, 0),
                "a2a_tiled": fdp.all_to_all(u, "dp", 0, 1, tiled=True),
                "ppermute": fdp.ppermute(u, "dp", [(i, (i + 1) % n) for i in range(n - 1)]),
                "pshuffle": fdp.pshuffle(u, "dp", list(perm)),
            }

        out = moved(v)
        out["grad"] = torch.func.grad(
            lambda u: sum((t.sin() * (k + 1)).sum() for k, t in enumerate(moved(u).values())))(v)
        out["psum_int32"] = fdp.psum(torch.ones((), dtype=torch.int32), "dp")
        out["pmean_int"] = fdp.pmean(fdp.axis_index("dp"), "dp")
        out["number"] = torch.tensor(fdp.axis_size("dp"))
        return out

    return fdp.pmap(body, mesh)(x)


# --- jobs (run in the pool's workers) -----------------------------------------------------------


def mesh_here(**kwargs: Any) -> fdp.Mesh:
    return fdp.Mesh.distributed(fdp.launch.current_group(), timeout=30, **kwargs)


def dist_train(spec: Spec, params: dict, batches: list[dict], bucket_mb: float,
               overlap: bool, shared_memory: bool | None = None) -> dict:
    mesh = mesh_here(bucket_mb=bucket_mb, overlap=overlap, shared_memory=shared_memory)
    return train_on(mesh, spec, params, batches)


def dist_collectives(x: torch.Tensor, rows: torch.Tensor, axis: int) -> dict:
    mesh = mesh_here()
    rank = dist.get_rank(fdp.launch.current_group())
    return collectives_on(mesh, x[rank:rank + 1], rows, axis)


def dist_exchange(x: torch.Tensor, perm: tuple[int, ...]) -> dict:
    rank = dist.get_rank(fdp.launch.current_group())
    return exchange_on(mesh_here(), x[rank:rank + 1], perm)


# --- buffer policies and aux ------------------------------------------------------------------


def bn_case(seed: int, sync: bool) -> tuple:
    """A BatchNorm model (synchronized or not), its params and buffers, and a batch."""
    import fdp.nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    net = (fdp.nn.convert_sync_batchnorm(net) if sync else net).double().train()
    model = fdp.functionalize(net)
    gen = torch.Generator().manual_seed(seed)
    batch = {"x": torch.randn(11, 3, generator=gen, dtype=torch.float64),
             "y": torch.randn(11, 2, generator=gen, dtype=torch.float64)}
    return model, batch


def buffers_on(mesh: fdp.Mesh, seed: int, policy: str, split: Any) -> dict:
    """``value_and_grad`` with a buffer policy and aux (the per-replica loss), on any mesh."""
    model, batch = bn_case(seed, sync=policy == "sync")

    def loss_fn(params: dict, buffers: dict, b: dict) -> Any:
        out, new_buffers = model.apply(params, buffers, b["x"])
        loss = (out - b["y"]).pow(2).mean()
        return (loss, {"rows": torch.tensor(b["x"].shape[0])}), new_buffers

    (out, buffers), grads = fdp.value_and_grad(
        loss_fn, mesh, has_aux=True, buffer_policy=policy, split=_split(split))(
        model.params, model.buffers, batch)
    loss, aux = out
    # aux is stacked over the replicas with rows: here, this rank's ({} if it had none)
    rows = aux["rows"] if aux else torch.zeros(0, dtype=torch.int64)
    return {"loss": loss, "grads": grads, "buffers": buffers, "rows": rows}


def dist_buffers(seed: int, policy: str, split: Any) -> dict:
    return buffers_on(mesh_here(), seed, policy, split)


# --- keyed randomness -------------------------------------------------------------------------


def dropout_on(mesh: fdp.Mesh, seed: int, rows: int, microbatches: int) -> dict:
    """Keyed dropout training (``data_parallel_step(key=...)``): the same masks everywhere."""
    import fdp.nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), fdp.nn.Dropout(0.5), nn.Linear(6, 2))
    model = fdp.functionalize(net.double().train())

    def loss_fn(params: dict, batch: dict) -> torch.Tensor:
        out, _ = model.apply(params, model.buffers, batch["x"])
        return (out - batch["y"]).pow(2).mean()

    gen = torch.Generator().manual_seed(seed)
    batch = {"x": torch.randn(rows, 3, generator=gen, dtype=torch.float64),
             "y": torch.randn(rows, 2, generator=gen, dtype=torch.float64)}
    opt = fdp.optim.sgd(0.1)
    step = fdp.data_parallel_step(loss_fn, opt, mesh, key=fdp.random.key(seed),
                                  microbatches=microbatches)
    state = fdp.TrainState.create(model.params, opt)
    losses = []
    for _ in range(2):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    return {"losses": torch.stack(losses), "params": state.params}


def dist_dropout(seed: int, rows: int, microbatches: int) -> dict:
    return dropout_on(mesh_here(), seed, rows, microbatches)


# --- collectives inside the loss, with replicas that get no rows ------------------------------


def centered_loss_on(mesh: fdp.Mesh, split: Any) -> dict:
    """A loss that calls pmean over the mesh axis; replicas without rows do not take part."""
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    b = torch.arange(2.0 * sum(split), dtype=torch.float64).reshape(-1, 2)

    def loss(p: dict, x: torch.Tensor) -> tuple:
        info = torch.stack([fdp.axis_index("dp"), torch.tensor(fdp.axis_size("dp"))])
        return ((x - fdp.pmean(x.mean(0), "dp")) @ p["w"]).pow(2).mean(), info.double()

    (value, _), grads = fdp.value_and_grad(loss, mesh, has_aux=True, split=split)({"w": w}, b)
    return {"loss": value, "grads": grads}


def dist_centered_loss(split: Any) -> dict:
    return centered_loss_on(mesh_here(), split)


# --- fdp.DataParallel -------------------------------------------------------------------------


def data_parallel_on(mesh: fdp.Mesh, seed: int, sizes: tuple[int, ...], steps: int,
                     bn: bool) -> dict:
    """k torch.optim steps of fdp.DataParallel: params, last output and buffers."""
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 6)] + ([fdp.nn.SyncBatchNorm(6)] if bn else []) + \
        [nn.Tanh(), nn.Linear(6, 2)]
    net = nn.Sequential(*layers).double()
    dp = fdp.DataParallel(net, mesh, buffer_policy="sync" if bn else "replica0")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    out = None
    for rows in sizes[:steps]:
        x = torch.randn(rows, 3, dtype=torch.float64)
        y = torch.randn(rows, 2, dtype=torch.float64)
        opt.zero_grad()
        out = dp(x)
        ((out - y) ** 2).mean().backward()
        opt.step()
    return {"params": {k: v.detach() for k, v in net.named_parameters()},
            "buffers": dict(net.named_buffers()), "out": out.detach()}


def dist_data_parallel(seed: int, sizes: tuple[int, ...], steps: int, bn: bool) -> dict:
    return data_parallel_on(mesh_here(), seed, sizes, steps, bn)


def data_parallel_edges_on(mesh: fdp.Mesh) -> dict:
    """A module without parameters, an input gradient, and a scalar output's error."""
    x = torch.arange(10.0, dtype=torch.float64).reshape(5, 2).requires_grad_()
    relu = fdp.DataParallel(nn.ReLU(), mesh)(x - 4)
    torch.manual_seed(0)
    lin = nn.Linear(2, 3).double()
    (fdp.DataParallel(lin, mesh)(x) ** 2).sum().backward()
    try:
        fdp.DataParallel(_ScalarOut(), mesh)(torch.ones(4, 2))
        error = ""
    except ValueError as e:
        error = str(e)
    return {"relu": relu.detach(), "x_grad": x.grad, "error": "returned a scalar" in error}


class _ScalarOut(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


def dist_data_parallel_edges() -> dict:
    return data_parallel_edges_on(mesh_here())


def data_parallel_contract_on(mesh: fdp.Mesh) -> dict:
    """nn.DataParallel's corners: an LSTM's (out, (h_n, c_n)) with the batch at dim 1 of h_n,
    a buffer that requires grad, sparse gradients, a call without tensors."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=3, batch_first=True).double()
    x = torch.randn(7, 5, 3, dtype=torch.float64)
    out, (h, c) = fdp.DataParallel(lstm, mesh)(x)
    (out.sum() + h.square().sum() + c.sum()).backward()
    emb = nn.Embedding(10, 3, sparse=True).double()
    fdp.DataParallel(emb, mesh)(torch.tensor([1, 2, 2, 7, 9])).square().sum().backward()
    scaled = _Scaled()
    fdp.DataParallel(scaled, mesh)(x[:, 0]).sum().backward()
    const = fdp.DataParallel(_Constant(), mesh)()
    return {"out": out.detach(), "h": h.detach(), "c": c.detach(),
            **{f"grad.{k}": p.grad for k, p in lstm.named_parameters()},
            "sparse": emb.weight.grad.to_dense(), "buffer_grad": scaled.scale.grad,
            "constant": const.detach()}


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.full((3,), 2.0, dtype=torch.float64,
                                                 requires_grad=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class _Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self) -> torch.Tensor:
        return self.w * 2


def dist_data_parallel_contract() -> dict:
    return data_parallel_contract_on(mesh_here())


def frozen_training_on(mesh: fdp.Mesh) -> dict:
    """data_parallel_step with a frozen layer, a tied weight and an unused parameter, clipped
    AdamW, two microbatches."""
    from tests.test_frozen_and_unused import frozen_batches, frozen_training

    optimizer = fdp.optim.chain(fdp.optim.clip_by_global_norm(0.5),
                                fdp.optim.adamw(0.01, weight_decay=0.1))
    return frozen_training(mesh, optimizer, 2, frozen_batches())[0]


def dist_frozen_training() -> dict:
    return frozen_training_on(mesh_here())


def zoo_training_on(mesh: fdp.Mesh, name: str) -> dict:
    """A sequence model of the zoo: loss and gradients, then two SGD steps with momentum (Adam
    would turn the attention key bias's gradient, zero up to rounding, into full steps)."""
    import warnings

    from tests.zoo import functional_loss, sequence_case

    case = sequence_case(name, rows=7)
    model, loss_fn = functional_loss(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the vmap reference falls back, by design
        loss, grads = fdp.value_and_grad(loss_fn, mesh, split="even")(model.params, case.batch)
        optimizer = fdp.optim.sgd(0.1, momentum=0.9)
        step = fdp.data_parallel_step(loss_fn, optimizer, mesh, split="even")
        state = fdp.TrainState.create(model.params, optimizer)
        for _ in range(2):
            state, _ = step(state, case.batch)
    return {"loss": loss, **{f"grad.{k}": v for k, v in grads.items()},
            **{f"param.{k}": v for k, v in state.params.items()}}


def dist_zoo_training(name: str) -> dict:
    return zoo_training_on(mesh_here(), name)


# --- sharded optimizer state (ZeRO-1) -----------------------------------------------------------


def _tensor_bytes(tree: Any) -> int:
    return sum(x.numel() * x.element_size() for x in torch.utils._pytree.tree_leaves(tree)
               if isinstance(x, torch.Tensor))


def zero_training_on(mesh: fdp.Mesh, opt_name: str, microbatches: int) -> dict:
    """Unsharded and sharded training of the same run, and this process's optimizer state."""
    from tests.test_zero import zero_training

    want, want_losses = zero_training(mesh, opt_name, microbatches, shard=False)
    got, losses = zero_training(mesh, opt_name, microbatches, shard=True)
    return {"want": want.params, "got": got.params, "want_losses": torch.stack(want_losses),
            "losses": torch.stack(losses),
            "state_bytes": torch.tensor(_tensor_bytes(got.opt_state.slices)),
            "full_bytes": torch.tensor(_tensor_bytes(want.opt_state))}


def dist_zero_training(opt_name: str, microbatches: int) -> dict:
    return zero_training_on(mesh_here(), opt_name, microbatches)


def dist_zero_checkpoint(folder: str) -> dict:
    """Two sharded steps, a checkpoint (one file per process), a resumed run's next step."""
    from tests.test_zero import zero_checkpoint_run

    run = zero_checkpoint_run(mesh_here(), folder, steps=3)
    return {k: run[k] for k in ("name", "params", "resumed")}
