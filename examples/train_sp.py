"""Train a converted model for a few steps with sequence parallelism (run under torchrun).

    lcc convert tiny-llama --to sp --opt degree=2 -o tiny-llama.sp.lcc     # or --to ulysses / ring
    torchrun --nproc-per-node 2 examples/train_sp.py tiny-llama.sp.lcc --steps 20

Every rank loads the same per-rank program, takes its shard of each sequence under the program's
layout (labels shifted first), and sums its gradient share over the group before the optimizer
step; rank 0 prints the global token-weighted loss. Uses gloo on CPU and NCCL when CUDA is available.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import longctx_compile as lcc
from longctx_compile import distributed as sp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--tile", type=int, default=0, help="rows per tile of the tiled LM head + loss (0: full logits)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    rank = sp.init()  # torch.distributed, gloo on CPU and NCCL with CUDA (see sp.init for why not init_process_group)
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    model = lcc.load(args.artifact, device=device if cuda else None)
    params = list(model.module.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    vocab = model.signature["vocab_size"]
    layout = sp.Layout.of(model.signature)  # how the program splits a sequence over the ranks
    # a learnable synthetic task: a fixed random sequence of 16 tokens, repeated
    pattern = torch.randint(0, vocab, (16,), generator=torch.Generator().manual_seed(0))
    ids = pattern.repeat(args.seq // 16 + 1)[: args.seq][None].to(device)
    for step in range(args.steps):
        local = sp.shard_batch(ids, labels=ids, layout=layout, rank=rank)
        shift_labels = local.pop("shift_labels")
        if args.tile:  # tile_loss: the head and cross-entropy a tile at a time, full logits never exist
            loss = sp.global_mean(*model.loss(**local, shift_labels=shift_labels, tile=args.tile))
        else:
            loss = sp.token_loss(model(**local), shift_labels)
        optimizer.zero_grad()
        loss.backward()
        sp.reduce_gradients(model.module)
        optimizer.step()
        total = sp.all_reduce_sum(loss)
        if rank == 0:
            print(f"step {step:3d}  loss {float(total):.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
