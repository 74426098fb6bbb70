"""``lower``: bind every longctx op to the implementation the target runs, with its tile configs, per site.

On ``cpu`` the reference op stays. On Triton targets each ``longctx::attention`` becomes a
``longctx::flash_attention`` whose arguments carry the forward and backward tile configs chosen for
that target and shape (heuristic, ``--opt`` overrides, or autotuned on a matching GPU), and each
``longctx::hsa_attention`` a ``longctx::hsa_flash`` with its tiles.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import LccError
from ..fx import COPIED_META, fake_call, val
from ..ops.schema import Call
from ..pipeline import PassResult, Program, Stage, register
from ..targets import Target, get_target
from ..targets.configs import REPRESENTATIVE_LENGTH, AttentionConfigs, Shape, choose, override, unsupported
from ..targets.tiles import hsa_smem_bytes, hsa_tiles, hsa_unsupported

REFERENCE = "longctx.attention/reference"
TRITON = "longctx.flash_attention/triton"
HSA = torch.ops.longctx.hsa_attention.default
HSA_REFERENCE, HSA_TRITON = "longctx.hsa_attention/reference", "longctx.hsa_flash/triton"
# the forms' own attention ops that run their plain-torch definition on every target for now
FORM_OPS = {
    torch.ops.longctx.ring_attention.default: "longctx.ring_attention/reference",
    torch.ops.longctx.msa_attention.default: "longctx.msa_attention/reference",
    torch.ops.longctx.evict_attention.default: "longctx.evict_attention/reference",
}


@dataclass
class LowerConfig:
    """Target plus optional tile overrides (``--opt fwd_block_m=64`` …), autotuning and fallback."""

    target: str = "cpu"
    fwd_block_m: int | None = None
    fwd_block_n: int | None = None
    fwd_warps: int | None = None
    fwd_stages: int | None = None
    bwd_block_m: int | None = None
    bwd_block_n: int | None = None
    bwd_warps: int | None = None
    bwd_stages: int | None = None
    autotune: bool = False
    fallback: Literal["none", "reference"] = "none"

    def overrides(self) -> dict[str, dict[str, int]]:
        names = {"block_m": "block_m", "block_n": "block_n", "warps": "num_warps", "stages": "num_stages"}
        return {
            kind: {field: getattr(self, f"{kind}_{opt}") for opt, field in names.items() if getattr(self, f"{kind}_{opt}") is not None}
            for kind in ("fwd", "bwd")
        }


@register("lower", Stage.LOWER, LowerConfig)
def lower(program: Program, cfg: LowerConfig) -> PassResult:
    """Bind each longctx op to the target's kernel and tile configs (cpu: the reference op) and record them per site."""
    target = get_target(cfg.target)
    program.target = target.name
    # what a form's runtime runs beside the graph (msa's pooling and routing): the reference ops on cpu, kernels elsewhere
    program.signature["kernels"] = "reference" if target.kernels == "reference" else "triton"
    nodes, hsa_nodes = [], []
    for node in program.attention_nodes():
        if node.target in FORM_OPS:
            node.meta["lcc"].update(target=target.name, kernel=FORM_OPS[node.target])
        else:
            (hsa_nodes if node.target is HSA else nodes).append(node)
    if target.kernels == "reference":
        for node in nodes:
            node.meta["lcc"].update(target=target.name, kernel=REFERENCE)
        for node in hsa_nodes:
            node.meta["lcc"].update(target=target.name, kernel=HSA_REFERENCE)
        return PassResult(matches=len(nodes) + len(hsa_nodes), notes=[f"{len(nodes) + len(hsa_nodes)} sites keep the reference op on {target.name}"])
    notes = [note for node in hsa_nodes if (note := _lower_hsa(program.gm.graph, node, target, cfg))]  # a note: kept the reference
    hsa_lowered = len(hsa_nodes) - len(notes)
    chosen: dict[tuple, AttentionConfigs] = {}
    lowered = 0
    for node in nodes:
        facts = node.meta["lcc"]
        call = Call.of(node)
        q, v = val(call.q), val(call.v)
        length = min(int(program.signature["max_len"]), REPRESENTATIVE_LENGTH)
        shape = Shape(q.shape[-1], v.shape[-1], q.dtype, facts["hq"] // facts["hkv"], facts["hkv"], length)
        reason = unsupported(shape)
        if reason:
            if cfg.fallback != "reference":
                raise LccError(f"layer {facts['layer']} ({facts['module']}): {reason}; pass --opt fallback=reference to keep the reference op there")
            facts.update(target=target.name, kernel=REFERENCE, fallback=reason)
            notes.append(f"site {facts['site']} ({facts['module']}): reference op kept: {reason}")
            continue
        causal, window = call.causal, call.window
        key = (shape, causal, window, facts["mask"])
        if key not in chosen:
            chosen[key] = _configs(target, shape, cfg, causal, window, facts["mask"], notes)
        configs = chosen[key]
        flash = torch.ops.longctx.flash_attention.default
        _bind(program.gm.graph, node, flash, call.to(flash, fwd_config=configs.fwd.as_list(), bwd_config=configs.bwd.as_list()).args())
        facts.update(target=target.name, kernel=TRITON, config=chosen[key].to_json(shape))
        lowered += 1
    notes.insert(0, f"{lowered + hsa_lowered} of {len(nodes) + len(hsa_nodes)} sites bound to Triton kernels for {target.name}")
    return PassResult(matches=lowered + hsa_lowered, notes=notes)


def _lower_hsa(graph: torch.fx.Graph, node: torch.fx.Node, target: Target, cfg: LowerConfig) -> str | None:
    """Bind one ``hsa_attention`` site to ``hsa_flash(..., tiles)[0]``, or keep the reference (fallback) and say why."""
    facts = node.meta["lcc"]
    call = Call.of(node)
    q, v = val(call.q), val(call.v)
    chunk, topk, mode, select = call.chunk, call.topk, call.mode, call.select
    groups = q.shape[1] // val(call.k).shape[1]  # the query heads sharing a KV head (and a selection) in the op: 1 with heads=each
    tiles = hsa_tiles(chunk, groups, select)
    reason = hsa_unsupported(chunk, topk, mode, q.shape[-1], v.shape[-1], q.dtype)
    if reason is None and call.get("retrieval_pool") is not None:
        reason = "pooled landmarks (--opt landmarks=R) score a chunk by R summaries, where the HSA kernels take one"
    smem = hsa_smem_bytes(tiles, chunk, groups, q.shape[-1], v.shape[-1], q.dtype)
    if reason is None and smem > target.smem_per_block:
        reason = f"the HSA kernels need {smem} bytes of shared memory at chunk {chunk}, head dim {q.shape[-1]}; {target.name} has {target.smem_per_block}"
    if reason:
        if cfg.fallback != "reference":
            raise LccError(f"layer {facts['layer']} ({facts['module']}): {reason}; pass --opt fallback=reference to keep the reference op there")
        facts.update(target=target.name, kernel=HSA_REFERENCE, fallback=reason)
        return f"site {facts['site']} ({facts['module']}): reference op kept: {reason}"
    _bind(graph, node, torch.ops.longctx.hsa_flash.default, call.to(torch.ops.longctx.hsa_flash.default, tiles=tiles).args())
    facts.update(target=target.name, kernel=HSA_TRITON, config={"hsa": {"block_q": tiles[0], "block_l": tiles[1], "num_warps": tiles[2], "smem": smem}})
    return None


def _configs(target: Target, shape: Shape, cfg: LowerConfig, causal: bool, window: int, mask: str, notes: list[str]) -> AttentionConfigs:
    """Heuristic configs, replaced by autotuned ones when asked and possible, then by the user's overrides."""
    configs = choose(target, shape)
    if cfg.autotune:
        from ..targets import autotune

        reason = autotune.unavailable(target)
        if reason:
            notes.append(reason)
        else:
            key = autotune.cache_key(target, shape, mask, torch.cuda.get_device_name())
            configs, hit = autotune.tune(target, shape, key, autotune.gpu_bench(shape, causal, window))
            notes.append(f"autotune {shape.key()}: fwd {configs.fwd}, bwd {configs.bwd} ({'cached' if hit else 'measured'})")
    return override(configs, target, shape, cfg.overrides())


def _bind(graph: torch.fx.Graph, node: torch.fx.Node, op, args: tuple) -> None:
    """Replace ``node`` by ``op(*args)[0]`` (a kernel op returning its output first), keeping its metadata and facts."""
    with graph.inserting_before(node):
        flash = graph.call_function(op, args)
        out = graph.call_function(operator.getitem, (flash, 0))
    flash.meta["val"] = fake_call(op, *args)
    out.meta["val"] = flash.meta["val"][0]
    for key in COPIED_META:
        if key in node.meta:
            flash.meta[key] = out.meta[key] = node.meta[key]
    flash.meta["lcc"] = node.meta["lcc"]
    flash.meta["lcc_from"] = out.meta["lcc_from"] = [node.name]
    node.replace_all_uses_with(out)
    graph.erase_node(node)
