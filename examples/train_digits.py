"""Train an MLP on scikit-learn's digits, data-parallel over N virtual replicas and on one device.

Both runs start from the same initialization and see the same batches (the last batch of each
epoch is uneven). After every step the script compares the two runs (loss and largest parameter
difference), and after every epoch it measures both test accuracies. It prints the final test
accuracies and differences, and writes a figure with three panels: both training-loss curves,
the per-step difference between the runs on a log scale, and both test accuracies per epoch.

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

FLOAT32_EPS = torch.finfo(torch.float32).eps


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


def max_param_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


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
    losses: dict[str, list[float]] = {"data-parallel": [], "single device": []}
    accuracies: dict[str, list[float]] = {"data-parallel": [], "single device": []}
    loss_diffs: list[float] = []
    param_diffs: list[float] = []

    start = time.perf_counter()
    progress = tqdm(range(args.epochs), desc=f"training on {mesh.size} replicas", unit="epoch")
    for _ in progress:
        parts, rng = batches(train, dp, args.batch)
        for batch in parts:
            dp, metrics = dp_step(dp, batch)
            ref, ref_loss = ref_step(ref, batch)
            losses["data-parallel"].append(metrics["loss"].item())
            losses["single device"].append(ref_loss.item())
            loss_diffs.append(abs(losses["data-parallel"][-1] - losses["single device"][-1]))
            param_diffs.append(max_param_diff(dp.params, ref.params))
        dp, ref = dp._replace(rng=rng), ref._replace(rng=rng)
        accuracies["data-parallel"].append(accuracy(model, dp.params, test))
        accuracies["single device"].append(accuracy(model, ref.params, test))
        progress.set_postfix(loss=f"{losses['data-parallel'][-1]:.4f}")
    elapsed = time.perf_counter() - start

    print(f"trained {int(dp.step)} steps in {elapsed:.1f} s; last batch of each epoch: "
          f"{parts[-1]['y'].shape[0]} rows over {mesh.size} replicas")
    print(f"test accuracy  data-parallel {accuracies['data-parallel'][-1]:.4f}   "
          f"single device {accuracies['single device'][-1]:.4f}")
    print(f"max |loss difference| over all steps = {max(loss_diffs):.2e}")
    print(f"max |parameter difference| = {param_diffs[-1]:.2e} "
          f"(largest after any step: {max(param_diffs):.2e})")

    plot(args.out, mesh.size, steps_per_epoch, losses, loss_diffs, param_diffs, accuracies)
    print(f"figure written to {args.out}: training loss, per-step difference between the runs, "
          "test accuracy per epoch")


def plot(out: str, replicas: int, steps_per_epoch: int, losses: dict[str, list[float]],
         loss_diffs: list[float], param_diffs: list[float],
         accuracies: dict[str, list[float]]) -> None:
    plt.switch_backend("Agg")  # files only, no display needed
    epochs = len(accuracies["data-parallel"])
    step_x = [(i + 1) / steps_per_epoch for i in range(len(loss_diffs))]  # in epochs
    fig, (ax_loss, ax_diff, ax_acc) = plt.subplots(
        3, 1, figsize=(8, 10), sharex=True, height_ratios=[1.2, 1, 1])
    fig.suptitle(f"digits MLP: data-parallel over {replicas} virtual replicas vs one device,\n"
                 "same initialization, same batches", fontsize=12)
    colors = {"data-parallel": "tab:blue", "single device": "tab:orange"}
    styles = {"data-parallel": "-", "single device": (0, (4, 3))}

    # (a) training loss: raw per step (faint) and averaged over the last epoch
    for name, values in losses.items():
        ax_loss.plot(step_x, values, color=colors[name], alpha=0.2, linewidth=0.7)
        ax_loss.plot(step_x, moving_average(values, steps_per_epoch), color=colors[name],
                     linestyle=styles[name], linewidth=1.8, label=f"{name} (1-epoch average)")
    ax_loss.plot([], [], color="grey", alpha=0.4, linewidth=0.7, label="raw, per step")
    ax_loss.set(yscale="log", ylabel="training loss\n(cross-entropy)",
                title="(a) training loss: the two curves lie on top of each other")
    ax_loss.legend(loc="upper right")

    # (b) how far apart the runs are after each step; exact zeros cannot sit on a log axis, so
    # they are drawn as triangles at the bottom
    floor = 1e-10
    nonzero = [(x, d) for x, d in zip(step_x, loss_diffs, strict=True) if d > 0]
    zero_x = [x for x, d in zip(step_x, loss_diffs, strict=True) if d == 0]
    ax_diff.plot(*zip(*nonzero, strict=True), ".", color="tab:green", markersize=3,
                 label="|loss difference|")
    ax_diff.plot(zero_x, [floor * 1.6] * len(zero_x), "v", color="tab:green", markersize=3,
                 alpha=0.5, label="|loss difference| = 0 (exactly equal)")
    ax_diff.plot(step_x, [d if d > 0 else float("nan") for d in param_diffs],
                 color="tab:purple", linewidth=1.5, label="max |parameter difference|")
    zero_x = [x for x, d in zip(step_x, param_diffs, strict=True) if d == 0]
    ax_diff.plot(zero_x, [floor * 1.6] * len(zero_x), "v", color="tab:purple", markersize=4,
                 label="max |parameter difference| = 0")
    ax_diff.axhline(FLOAT32_EPS, color="black", linestyle=":", linewidth=1,
                    label="float32 machine epsilon (1.2e-7)")
    top = max(1e-4, 30 * max(max(loss_diffs), max(param_diffs)))  # room for the legend
    ax_diff.set(yscale="log", ylim=(floor, top), ylabel="|data-parallel - one device|",
                title="(b) difference between the runs after each step: float rounding only")
    ax_diff.legend(loc="upper right", ncols=2, fontsize=8.5)

    # (c) test accuracy after each epoch
    epoch_x = list(range(1, epochs + 1))
    for name, values in accuracies.items():
        ax_acc.plot(epoch_x, values, color=colors[name], linestyle=styles[name],
                    marker="o" if name == "data-parallel" else "x", markersize=4, label=name)
    final = ", ".join(f"{name} {values[-1]:.4f}" for name, values in accuracies.items())
    ax_acc.set(xlabel=f"epoch ({steps_per_epoch} steps each)", ylabel="test accuracy",
               title=f"(c) test accuracy after each epoch (final: {final})")
    ax_acc.legend(loc="lower right")

    for ax in (ax_loss, ax_diff, ax_acc):  # epoch boundaries
        ax.set_xticks(range(0, epochs + 1), minor=True)
        ax.grid(which="minor", axis="x", color="0.92", linewidth=0.6)
        ax.grid(which="major", color="0.8", linewidth=0.8)
    ax_acc.set_xlim(0, epochs)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
