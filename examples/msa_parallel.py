"""Answer a question from a sharded memory bank with Memory Parallel (run under torchrun).

    lcc convert tiny-llama --to msa --opt pool=2 -o tiny-llama.msa.lcc
    lcc memory encode tiny-llama.msa.lcc --docs docs.jsonl -o bank
    torchrun --nproc-per-node 2 examples/msa_parallel.py tiny-llama.msa.lcc bank --question-ids 5,6,7 -n 8

Every rank loads the model (replicated) and keeps its share of the bank's documents (balanced by
chunk count); each routed layer's routing runs the Memory Parallel collectives, and decoding needs
none. Rank r answers the r-th ``--question-ids`` (all ranks the last one when there are fewer), so
the ranks serve different queries at once. Rank 0 prints every rank's routing and answer as JSON.
Uses gloo on CPU and NCCL when CUDA is available.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

import longctx_compile as lcc
from longctx_compile import distributed as sp
from longctx_compile.forms.msa import bank as memory_bank
from longctx_compile.forms.msa.parallel import ParallelMemory
from longctx_compile.forms.msa.runtime import MsaModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("bank")
    parser.add_argument("--question-ids", action="append", required=True, help="comma-separated ids; repeat for one question per rank")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    rank = sp.init()  # torch.distributed, gloo on CPU and NCCL with CUDA (see sp.init for why not init_process_group)
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    loaded = lcc.load(args.artifact, device=device if cuda else None)
    model = MsaModel(loaded.program, loaded.signature)
    bank = memory_bank.load(args.bank, model=model.facts)
    # the tiers: router keys beside the model, pooled K/V in pinned host memory (only the selected chunks move)
    memory = ParallelMemory.share(bank.placed(router=device, kv="cpu", pin=cuda), kernels=model.kernels)
    question = args.question_ids[min(rank, len(args.question_ids) - 1)]
    ids = torch.tensor([[int(t) for t in question.split(",")]], device=device)
    tokens, result = model.generate(memory, ids, args.max_new_tokens)
    mine = {
        "rank": rank,
        "documents": len(memory.owned),
        "routed": {str(k): [bank.docs[d] for d in v[0].tolist()] for k, v in result.docs.items()},
        "answer_ids": tokens[0],
    }
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if rank == 0:
        print(json.dumps(every))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
