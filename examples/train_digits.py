"""Train an MLP on scikit-learn's digits, data-parallel over N virtual replicas and on one device.

Both runs start from the same initialization and see the same batches (the last batch of each
epoch is uneven). The script prints both test accuracies and the largest parameter difference,
and writes a PNG of both loss curves.

Run: python examples/train_digits.py [--replicas 8] [--epochs 40] [--out digits_loss.png]
"""

from __future__ import annotations

import argparse
import time

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.func import grad_and_value
from tqdm import tqdm

import fdp


def load_data() -> tuple[dict, dict]:
    digits = load_digits()  # 1797 8x8 images, bundled with scikit-learn (offline)
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return {"x": x_tr, "y": y_tr}, {"x": x_te, "y": y_te}


def single_device_step(loss_fn, optimizer):
    """The reference: plain torch.func gradients on the whole batch, same optimizer."""
    grad_fn = grad_and_value(loss_fn)

    def step(state: fdp.TrainState, batch: dict):
        grads, loss = grad_fn(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = fdp.optim.apply_updates(state.params, updates)
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), loss

    return step


def batches(data: dict, state: fdp.TrainState, batch_size: int):
    """Shuffles with the generator state kept in the TrainState (so checkpoints resume it)."""
    generator = torch.Generator()
    generator.set_state(state.rng)
    order = torch.randperm(data["y"].shape[0], generator=generator)
    parts = [{k: v[idx] for k, v in data.items()} for idx in order.split(batch_size)]
    return parts, generator.get_state()


def accuracy(model: fdp.Model, params: dict, data: dict) -> float:
    logits, _ = model.apply(params, model.buffers, data["x"])
    return (logits.argmax(1) == data["y"]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--lr", type=float, default=None, help="default: 0.1 sgd, 3e-3 adam")
    parser.add_argument("--out", default="digits_loss.png")
    args = parser.parse_args()

    train, test = load_data()
    torch.manual_seed(0)
    model = fdp.functionalize(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)))

    def loss_fn(params, batch):
        logits, _ = model.apply(params, model.buffers, batch["x"])
        return nn.functional.cross_entropy(logits, batch["y"])

    steps_per_epoch = -(-train["y"].shape[0] // args.batch)
    lr = args.lr or (0.1 if args.optimizer == "sgd" else 3e-3)
    schedule = fdp.optim.cosine_decay_schedule(lr, decay_steps=args.epochs * steps_per_epoch)
    if args.optimizer == "sgd":
        optimizer = fdp.optim.sgd(schedule, momentum=0.9, nesterov=True)
    else:
        optimizer = fdp.optim.adam(schedule)
    mesh = fdp.Mesh(args.replicas)
    dp_step = fdp.data_parallel_step(loss_fn, optimizer, mesh)
    ref_step = single_device_step(loss_fn, optimizer)
    dp = ref = fdp.TrainState.create(model.params, optimizer, seed=0)
    curves: dict[str, list[float]] = {"data-parallel": [], "single device": []}

    start = time.perf_counter()
    progress = tqdm(range(args.epochs), desc=f"training on {mesh.size} replicas", unit="epoch")
    for _ in progress:
        parts, rng = batches(train, dp, args.batch)
        for batch in parts:
            dp, metrics = dp_step(dp, batch)
            ref, ref_loss = ref_step(ref, batch)
            curves["data-parallel"].append(metrics["loss"].item())
            curves["single device"].append(ref_loss.item())
        dp, ref = dp._replace(rng=rng), ref._replace(rng=rng)
        progress.set_postfix(loss=f"{curves['data-parallel'][-1]:.4f}")
    elapsed = time.perf_counter() - start

    diff = max((dp.params[k] - ref.params[k]).abs().max().item() for k in dp.params)
    print(f"trained {int(dp.step)} steps in {elapsed:.1f} s; last batch of each epoch: "
          f"{parts[-1]['y'].shape[0]} rows over {mesh.size} replicas")
    print(f"test accuracy  data-parallel {accuracy(model, dp.params, test):.4f}   "
          f"single device {accuracy(model, ref.params, test):.4f}")
    print(f"max |parameter difference| = {diff:.2e}")

    plt.switch_backend("Agg")  # files only, no display needed
    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, values), style in zip(curves.items(), ("-", "--"), strict=True):
        ax.plot(values, style, label=name, linewidth=1.2)
    ax.set(xlabel="step", ylabel="training loss (cross-entropy)", yscale="log",
           title=f"digits MLP: data-parallel over {mesh.size} replicas vs one device")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"loss curves written to {args.out}")


if __name__ == "__main__":
    main()
