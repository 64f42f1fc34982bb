"""Train an MLP on scikit-learn's digits with one replica per process (torch.distributed).

    torchrun --nproc-per-node 2 examples/torchrun_mlp.py          # CPU: gloo
    torchrun --nproc-per-node 8 examples/torchrun_mlp.py          # GPUs: NCCL, unchanged

Every process loads the same data, builds the model from the same seed and walks through the
same global batches; ``fdp.data_parallel_step`` on ``fdp.Mesh.distributed()`` makes each rank
compute on its own rows and sums the gradients, so every rank ends with the same params. Rank 0
also trains on one device from the same start and prints the largest parameter difference.
Without torchrun, ``python examples/torchrun_mlp.py`` runs a world of one process.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

import fdp


def init() -> None:
    """Joins the process group that torchrun describes (or a one-process group)."""
    if "RANK" not in os.environ:  # plain `python examples/torchrun_mlp.py`
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128, help="global batch (all ranks)")
    args = parser.parse_args()
    init()
    try:
        train(args.epochs, args.batch)
    finally:
        dist.destroy_process_group()


def train(epochs: int, batch_size: int) -> None:
    mesh = fdp.Mesh.distributed()  # one replica per rank of the default group
    device = mesh.devices[0]  # this process's device: cpu, or cuda:<LOCAL_RANK>
    rank = dist.get_rank()
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32, device=device) / 16.0
    y = torch.tensor(digits.target, device=device)
    torch.manual_seed(0)  # the same initial params on every rank
    model = fdp.functionalize(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
                              .to(device))

    def loss_fn(params: dict, batch: dict) -> torch.Tensor:
        logits, _ = model.apply(params, model.buffers, batch["x"])
        return nn.functional.cross_entropy(logits, batch["y"])

    optimizer = fdp.optim.sgd(0.1, momentum=0.9)
    step = fdp.data_parallel_step(loss_fn, optimizer, mesh)
    state = reference = fdp.TrainState.create(model.params, optimizer)
    generator = torch.Generator().manual_seed(0)  # the same batches on every rank
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=generator).to(device)
        for idx in order.split(batch_size):  # the last batch is uneven: still exact
            batch = {"x": x[idx], "y": y[idx]}
            state, metrics = step(state, batch)
            if rank == 0:
                reference = single_device_step(loss_fn, optimizer, reference, batch)
        if rank == 0 and epoch in (0, epochs - 1):
            print(f"epoch {epoch + 1}: loss {metrics['loss'].item():.4f}")
    if rank == 0:
        logits, _ = model.apply(state.params, model.buffers, x)
        accuracy = (logits.argmax(1) == y).float().mean().item()
        diff = max((state.params[k] - reference.params[k]).abs().max().item()
                   for k in state.params)
        print(f"{mesh.size} processes ({dist.get_backend()}), train accuracy {accuracy:.3f}")
        print(f"max |parameter difference| vs one device = {diff:.2e}")


def single_device_step(loss_fn, optimizer, state: fdp.TrainState, batch: dict):
    grads = torch.func.grad(loss_fn)(state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return state._replace(params=fdp.optim.apply_updates(state.params, updates),
                          opt_state=opt_state)


if __name__ == "__main__":
    main()
