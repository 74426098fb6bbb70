"""Peak memory of one ``lcc train`` step on a real model: plain, tiled head and loss, per-layer recomputation, both.

Each setting runs one forward and backward (objective ``lm``, ``--trainable norms``: every layer's backward runs,
while the parameter side — fp32 copies, gradients — stays a few KiB, so what is measured is activations) in a
process of its own; the figure is the process's peak resident memory minus its resident memory after loading.

Beside it, the ALST-style account the measurement is checked against, for L layers, T tokens, hidden size h,
vocabulary V, tile t, H query heads, and a(T) the bytes autograd keeps for one layer (measured with saved-tensor
hooks on the plain program at ``--probe`` tokens and scaled linearly in T — the attention keeps O(T), not O(T²),
state), all plus S = 3·H·T²·4, the scores, probabilities and their gradient one attention backward of the CPU
reference materialises (the Triton kernels' backward is O(T)):

    plain      L·a(T)          + 3·T·V·4  + S    (logits, their log-softmax, and its gradient, fp32)
    tiled      L·a(T)          + 3·t·V·4 + T·h·4 + S
    recompute  L·T·h·4 + a(T)  + 3·T·V·4  + S    (one input per layer kept, one layer live in its backward)
    both       L·T·h·4 + a(T)  + 3·t·V·4 + T·h·4 + S

On P ranks (``--nproc P``) each rank holds T/P tokens: 1/P of the activations and logits (a tile stays t rows),
ALST's per-GPU account. The attention term differs by layout: under Ulysses a rank attends all T tokens for H/P
heads (S/P); a zigzag ring computes one pair of T/2P-token chunks at a time for all heads (3·H·(T/2P)²·4).

    python bench/train_memory.py SMOLLM2.lcc --tokens 8192 --tile 1024 --settings tiled,both --nproc 2 --sp ring
    # SmolLM2's 9 heads: Ulysses needs P | 9 (and P | T), so 2 ranks run a ring
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from rich.table import Table

SETTINGS = {"plain": {}, "tiled": {"tile": True}, "recompute": {"recompute": True}, "both": {"tile": True, "recompute": True}}


def _trainer(path: str, tokens: int, tile: int = 0, recompute: bool = False, layout=None):
    from longctx_compile import artifact
    from longctx_compile.runtime.train import ProgramTrainer, TrainConfig

    manifest = artifact.read_manifest(path)
    ep = artifact.read_model_program(path, manifest).ep
    if layout is not None:  # this rank's program
        from longctx_compile.forms.sp.train import shard_program

        shard_program(ep, manifest["signature"], layout)
    cfg = TrainConfig(objective="lm", trainable="norms", length=tokens, tile=tile, recompute=recompute)
    return ProgramTrainer(ep, manifest["signature"], cfg, manifest.get("form", "dense"), layout), manifest


def _rss() -> int:
    """This process's resident bytes now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one(path: str, tokens: int, tile: int, setting: str, layout=None) -> dict:
    """One step of ``setting`` in this process (this rank's, with a ``layout``): the peak resident memory above the
    loaded state (sampled every 2 ms, after the allocator returned what loading freed), and seconds."""
    import ctypes
    import gc
    import threading
    import time

    options = SETTINGS[setting]
    trainer, _ = _trainer(path, tokens, tile if options.get("tile") else 0, options.get("recompute", False), layout)
    leaves = trainer.leaves()
    ids = torch.randint(0, trainer.signature["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # else the step reuses memory loading freed, and its peak reads low
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:  # a failing step must stop the sampler too, or its thread keeps the rank's process (and the launch) alive
        start = time.perf_counter()
        loss = trainer.loss(ids)
        torch.autograd.grad(loss, list(leaves.values()))
        seconds = time.perf_counter() - start
    finally:
        done.set()
        sampler.join()
    return {"setting": setting, "peak_mib": (peak[0] - base) / 2**20, "seconds": seconds, "loss": loss.item()}


def _rank(path: str, payload: dict, degree: int, rank: int) -> list[dict]:
    """One rank of a sequence-parallel step; every rank's figures, gathered on rank 0."""
    result = one(path, payload["tokens"], payload["tile"], payload["setting"], payload["layout"])
    everyone = [None] * degree
    torch.distributed.all_gather_object(everyone, result)
    return everyone


def _layout(nproc: int, sp: str):
    from longctx_compile.ops.layout import Layout

    return Layout(ulysses=nproc) if sp == "ulysses" else Layout(ring=nproc, zigzag=True)


def on_ranks(path: str, tokens: int, tile: int, setting: str, nproc: int, sp: str) -> dict:
    """The step on ``nproc`` gloo processes: the largest rank's peak, the slowest rank's time."""
    from longctx_compile.distributed.ranks import spawn

    ranks = spawn(_rank, path, nproc, dict(tokens=tokens, tile=tile, setting=setting, layout=_layout(nproc, sp)), loaded=False)
    return {
        "setting": f"{setting} · {sp} ×{nproc}",
        "peak_mib": max(r["peak_mib"] for r in ranks),
        "seconds": max(r["seconds"] for r in ranks),
        "loss": sum(r["loss"] for r in ranks),  # each rank's share of the batch's mean
        "ranks": nproc,
    }


def kept_per_layer(path: str, tokens: int) -> float:
    """a(tokens): the bytes autograd keeps for the backward of the plain program, per layer (distinct storages)."""
    from longctx_compile.runtime.interpret import attention_sites

    trainer, _ = _trainer(path, tokens)
    leaves = trainer.leaves()
    weights = {t.untyped_storage().data_ptr() for t in trainer.state.values()}  # resident anyway: not activations
    vocab = trainer.signature["vocab_size"]
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and t.shape[-1:] != (vocab,):  # the head's logits are their own term of the account
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.loss(ids)
    del loss, leaves
    return sum(storages.values()) / len(attention_sites(trainer.ep))


def predicted(a_T: float, layers: int, tokens: int, hidden: int, heads: int, vocab: int, tile: int, nproc: int = 1, sp: str = "ulysses") -> dict[str, float]:
    """The account above for one rank of ``nproc``, in MiB: its T/P tokens' terms (a(T) and the logits scale with
    them; a tile does not), and the attention backward's scores — of H/P heads over all T tokens under Ulysses, of one
    pair of zigzag chunks (T/2P tokens each, all heads) around a ring, which computes pair by pair."""
    local = tokens // nproc
    logits, tiled = 3 * local * vocab * 4, 3 * tile * vocab * 4 + local * hidden * 4
    kept = layers * local * hidden * 4 + a_T / nproc
    chunk = tokens // (2 * nproc) if sp == "ring" and nproc > 1 else tokens
    scores = 3 * heads * chunk * chunk * 4 / (nproc if sp == "ulysses" else 1)
    terms = {"plain": layers * a_T / nproc + logits, "tiled": layers * a_T / nproc + tiled, "recompute": kept + logits, "both": kept + tiled}
    return {k: (v + scores) / 2**20 for k, v in terms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", help="an artifact of the model (e.g. lcc convert SMOLLM2 --to dense -o smol.lcc)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--probe", type=int, default=512, help="tokens at which a(T) is measured, then scaled")
    parser.add_argument("--settings", type=lambda t: t.split(","), default=list(SETTINGS), help="which of plain,tiled,recompute,both to run")
    parser.add_argument("--nproc", type=int, default=1, help="also run each setting on this many ranks")
    parser.add_argument("--sp", choices=("ulysses", "ring"), default="ulysses")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--kept", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = (
            one(args.artifact, args.tokens, args.tile, args.one)
            if args.nproc == 1
            else on_ranks(args.artifact, args.tokens, args.tile, args.one, args.nproc, args.sp)
        )
        print(json.dumps(result))
        return
    if args.kept:
        print(json.dumps(kept_per_layer(args.artifact, args.probe)))
        return
    from longctx_compile import artifact
    from longctx_compile.errors import LccError
    from longctx_compile.runtime.interpret import attention_sites

    try:  # before any run: a length the ranks cannot split is one line, not a failed launch
        _layout(args.nproc, args.sp).check(args.tokens)
    except LccError as e:
        sys.exit(str(e))
    manifest = artifact.read_manifest(args.artifact)
    ep = artifact.read_program(args.artifact, manifest)
    layers = len(attention_sites(ep))
    vocab, heads = manifest["signature"]["vocab_size"], manifest["sites"][0]["hq"]
    hidden = heads * manifest["sites"][0]["head_dim"]
    del ep

    def run(*extra: str, nproc: int = 1) -> str:
        common = ["--tokens", str(args.tokens), "--tile", str(args.tile), "--probe", str(args.probe), "--nproc", str(nproc), "--sp", args.sp]
        done = subprocess.run([sys.executable, __file__, args.artifact, *common, *extra], capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
        return done.stdout.strip().splitlines()[-1]

    a_T = json.loads(run("--kept")) * args.tokens / args.probe
    from longctx_compile.console import out as console  # as wide as its table when written to a file

    rows = []
    unknown = set(args.settings) - set(SETTINGS)
    if unknown:
        sys.exit(f"unknown setting {sorted(unknown)[0]}; choose from {', '.join(SETTINGS)}")
    chosen = [s for s in SETTINGS if s in args.settings]
    runs = [(setting, 1) for setting in chosen] + ([(s, args.nproc) for s in chosen] if args.nproc > 1 else [])
    for setting, nproc in runs:
        rows.append({"ranks": 1, **json.loads(run("--one", setting, nproc=nproc))})
        rows[-1]["account"] = predicted(a_T, layers, args.tokens, hidden, heads, vocab, args.tile, nproc, args.sp)[setting]
        console.print(f"{rows[-1]['setting']}: {rows[-1]['peak_mib']:.0f} MiB, {rows[-1]['seconds']:.1f} s")
    table = Table(
        title=f"{args.artifact}: one training step at {args.tokens:,} tokens (lm, trainable norms), tile {args.tile}; a(T) = {a_T / 2**20:.0f} MiB per layer"
    )
    for column in ("setting", "peak MiB per rank (measured)", "× plain", "MiB (account)", "measured / account", "seconds", "loss"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    plain = rows[0]["peak_mib"]  # the first row run: plain unless --settings leaves it out
    for r in rows:
        expect = r["account"]
        table.add_row(
            r["setting"],
            f"{r['peak_mib']:,.0f}",
            f"{r['peak_mib'] / plain:.2f}",
            f"{expect:,.0f}",
            f"{r['peak_mib'] / expect:.2f}",
            f"{r['seconds']:.1f}",
            f"{r['loss']:.4f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
