"""One training step on each of P ranks, for ``distributed.ranks.spawn``: this rank's loss and gradients summed over
the group as ``lcc train`` sums them, to compare with one process's."""

from __future__ import annotations

from longctx_compile import artifact
from longctx_compile.runtime.train import _summed


def summed_step(trainer, batch) -> tuple[float, dict]:
    """The loss and each leaf's gradient of one step of ``trainer``, summed over the group."""
    leaves = trainer.leaves()
    loss = trainer.loss(batch)
    loss.backward()
    return _summed(leaves, loss.item()), {name: leaf.grad for name, leaf in leaves.items()}


def _program(path):
    manifest = artifact.read_manifest(path)
    return manifest, artifact.read_model_program(path, manifest).ep


def sharded_step(path, payload, degree, rank):
    """A window trainer on the per-rank program of ``payload["layout"]``."""
    from longctx_compile.forms.sp.train import shard_program
    from longctx_compile.runtime.train import ProgramTrainer

    manifest, ep = _program(path)
    shard_program(ep, manifest["signature"], payload["layout"])
    return summed_step(ProgramTrainer(ep, manifest["signature"], payload["cfg"], manifest["form"], payload["layout"]), payload["ids"])


def memory_parallel_step(path, payload, degree, rank):
    """An msa trainer whose examples' banks are sharded over the ``degree`` ranks."""
    from longctx_compile.forms.msa.train import MsaTrainer

    manifest, ep = _program(path)
    return summed_step(MsaTrainer(ep, manifest["signature"], payload["cfg"], payload["opts"], degree), payload["batch"])
