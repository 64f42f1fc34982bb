"""fdp quick start: data-parallel gradients over N virtual replicas equal single-device ones.

Run: python examples/quickstart.py [--replicas 8] [--batch 37]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.func import grad_and_value

import fdp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--batch", type=int, default=37, help="need not divide evenly")
    args = parser.parse_args()

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    model = fdp.functionalize(module)  # a pure apply + params/buffers dicts

    def loss_fn(params, batch):  # the loss you would write for one device
        logits, _ = model.apply(params, model.buffers, batch["x"])
        return nn.functional.cross_entropy(logits, batch["y"])

    batch = {"x": torch.randn(args.batch, 64), "y": torch.randint(0, 10, (args.batch,))}
    mesh = fdp.Mesh(args.replicas)
    sizes = fdp.scatter(batch, mesh).layout.sizes
    print(f"{mesh}: batch of {args.batch} split as {list(sizes)}")

    dp_loss, dp_grads = fdp.value_and_grad(loss_fn, mesh)(model.params, batch)
    ref_grads, ref_loss = grad_and_value(loss_fn)(model.params, batch)

    worst = max((dp_grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
    print(f"loss  data-parallel {dp_loss.item():.7f}   single-device {ref_loss.item():.7f}")
    print(f"value_and_grad over {len(ref_grads)} tensors: max |grad difference| = {worst:.2e}")

    # The same equality through pmap and a named-axis collective:
    def local_grads(params, shard, mask):
        def masked_sum(p):
            logits, _ = model.apply(p, model.buffers, shard["x"])
            per_example = nn.functional.cross_entropy(logits, shard["y"], reduction="none")
            return (per_example * mask).sum()

        grads = torch.func.grad(masked_sum)(params)
        return fdp.psum(grads, "dp")  # sum over replicas

    shards = fdp.scatter(batch, mesh)
    summed = fdp.pmap(local_grads, mesh, in_axes=(None, 0, 0), out_axes=None)(
        model.params, shards, shards.mask)
    worst_pmap = max((summed[k] / args.batch - ref_grads[k]).abs().max().item()
                     for k in ref_grads)
    print(f"pmap + psum of masked per-replica grads: max |grad difference| = {worst_pmap:.2e}")


if __name__ == "__main__":
    main()
