"""Running a sequence-parallel artifact on P local ranks for checks: gloo, one process each, or threads of this process.

:func:`train_step` starts the ranks, runs one forward and backward of the per-rank program on each
rank's slice of a batch (labels shifted before slicing, token-weighted loss, gradients summed over
the group), and returns what a single process would have computed: full logits, the loss and
parameter gradients. :func:`forward` returns the full logits of several batches from one launch.
``lcc verify`` and the tests compare these with the single-process model.

``ranks="processes"`` (the default) starts P gloo processes from a forkserver that has imported lcc once.
``ranks="threads"`` (:func:`train_step`) runs the same task on P threads over a :class:`~..ops.groups.LocalWorld`: the same
program, collectives and reductions, without a process, an import or gloo per rank (the tests' fast tier).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, degree: int, port: int, task: str, path: str, payload, out: str, loaded: bool = True) -> None:
    import torch.distributed as dist

    from ..loaded import load

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=degree)
    try:
        result = task(load(path) if loaded else path, payload, degree, rank)
        if rank == 0:
            torch.save(result, out)
        dist.barrier()  # leave together: a rank tearing gloo down while a peer still talks to it can abort the peer
    finally:
        dist.destroy_process_group()
    # a finished rank exits at once: gloo's threads can abort the process in interpreter teardown (SIGABRT,
    # "terminate called without an active exception") after the work and its result are complete
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _train_step(model, batch: dict, degree: int, rank: int) -> dict:
    """One step; with ``batch["tile"]`` the loss is ``model.loss`` (tiled head, no logits returned)."""
    from .. import distributed

    module = model.module
    for p in module.parameters():
        p.requires_grad_(True)
    layout = distributed.Layout.of(model.signature)
    labels = batch["input_ids"] if batch.get("labels") is None else batch["labels"]
    local = distributed.shard_batch(batch["input_ids"], labels, batch.get("attention_mask"), batch.get("position_ids"), layout=layout, rank=rank)
    shift_labels = local.pop("shift_labels")
    logits = None
    if batch.get("tile"):
        loss = distributed.global_mean(*model.loss(**local, shift_labels=shift_labels, tile=batch["tile"]))
    else:
        logits = model(**local)
        loss = distributed.token_loss(logits, shift_labels)
    loss.backward()
    distributed.reduce_gradients(module)
    return {
        "logits": None if logits is None else distributed.gather(logits.detach(), dim=1, layout=layout),
        "loss": distributed.all_reduce_sum(loss),
        "grads": {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None},
    }


def _forward(model, batches: list[dict], degree: int, rank: int) -> list[torch.Tensor]:
    from .. import distributed

    layout = distributed.Layout.of(model.signature)
    outputs = []
    with torch.no_grad():
        for inputs in batches:
            local = {name: distributed.shard(t, layout, rank) for name, t in inputs.items()}
            outputs.append(distributed.gather(model(**local), dim=1, layout=layout))
    return outputs


def _profile(model, batch: dict, degree: int, rank: int) -> dict:
    """A training step's collective traffic and the peak resident memory it added on this rank."""
    import resource

    from .. import distributed

    distributed.TRAFFIC.clear()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _train_step(model, batch, degree, rank)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_rank = [None] * degree
    torch.distributed.all_gather_object(per_rank, {"traffic": dict(distributed.TRAFFIC), "peak_kib": peak, "base_kib": before}, group=distributed.group())
    return {"ranks": per_rank}


def spawn(task: Callable, path: str | Path, degree: int, payload, ranks: str = "processes", loaded: bool = True):
    """``task(loaded artifact, payload, degree, rank)`` on ``degree`` local ranks; rank 0's result. With processes, ``task``
    is a module-level function, so each rank's process can import it. ``loaded=False``: the task gets the path and
    reads what it needs itself."""
    if ranks == "threads":
        return _in_threads(task, path, degree, payload, loaded)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.set_forkserver_preload(["longctx_compile.loaded"])  # each rank forks from a process that imported lcc once
        args = (degree, _free_port(), task, str(path), payload, out, loaded)
        mp.start_processes(_rank_main, args=args, nprocs=degree, join=True, start_method="forkserver")
        return torch.load(out)


def _in_threads(task: Callable, path: str | Path, degree: int, payload, loaded: bool = True):
    import threading

    from ..loaded import load
    from ..ops import groups

    world = groups.LocalWorld(degree)
    models = [load(path) if loaded else str(path) for _ in range(degree)]  # each rank holds its own parameters and gradients
    results, errors = [None] * degree, []

    def rank_main(rank: int) -> None:
        groups.bind_local(world, rank)
        try:
            results[rank] = task(models[rank], payload, degree, rank)
        except BaseException as e:  # noqa: BLE001  (re-raised below, in the caller's thread)
            errors.append(e)
            world.abort()
        finally:
            groups.bind_local(None)

    threads = [threading.Thread(target=rank_main, args=(rank,), name=f"lcc-rank-{rank}") for rank in range(degree)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results[0]


def train_step(path: str | Path, degree: int, batch: dict[str, torch.Tensor], ranks: str = "processes") -> dict:
    """Logits [B, T, V], loss and summed parameter gradients of one step on ``degree`` local ranks."""
    return spawn(_train_step, path, degree, batch, ranks)


def profile(path: str | Path, degree: int, batch: dict[str, torch.Tensor]) -> dict:
    """Per rank: collective calls and bytes sent in one training step, and peak resident memory (KiB): needs processes."""
    return spawn(_profile, path, degree, batch)


def forward(path: str | Path, degree: int, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Full logits of each batch (full-length inputs, sliced per rank) on ``degree`` local ranks."""
    return spawn(_forward, path, degree, batches)
