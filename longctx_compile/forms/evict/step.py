"""One evict decode token as a program: every layer's cache an explicit tensor, the new key written at its slot.

Per attention site, in graph order, the step takes the parts :func:`parts` names, each with the keys along
one dimension: K and V ``[B, Hkv, C, D]``, which keys are real ``real [B, C]`` and, at an evicting layer,
the policy's running importance ``score [B, G, C]`` (learned, oracle), the indexer keys ``idx_k
[B, G, C, Di]`` (learned) and the latent memory ``M [B, Hkv, m, Dv]``, ``b [B, Hkv, m]`` (memory on). C
is the site's capacity; ``slots[site]`` [B] is where the new key goes (the filled keys end there). The
step writes the new key, runs attention over the real keys (adding the memory's readout), folds the new
query into the scores and returns ``(logits [B, 1, V], every written part, the new query per snapkv
layer)``. M and b are read only. What leaves the cache, and when, stays in Python between steps
(:meth:`EvictModel.evict`): a compaction is rare, a token is every step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.export import Dim

from ...ops.attention import empty_sdpa_layout, sdpa_layout_forward
from ...ops.cache import scatter_key
from ...ops.evict import indexer_importance, memory_readout, teacher_importance
from ...ops.schema import Call
from ...runtime.interpret import attention_sites, export_program, flat_inputs, last_position_logits, logits_index, with_site_hooks
from ...runtime.steps import drop_asserts, drop_noop_casts

ATTENTION = torch.ops.longctx.attention.default
EVICT = torch.ops.longctx.evict_attention.default
WRITTEN = ("k", "v", "real", "score", "idx_k")  # what a step changes; the memory is only read


def parts(policy: str, memory: bool, evicting: bool) -> tuple[str, ...]:
    """The cache tensors of one site, in the order the step takes them."""
    names = ["k", "v", "real"]
    if evicting:
        names += ["score"] if policy in ("learned", "oracle") else []
        names += ["idx_k"] if policy == "learned" else []
        names += ["M", "b"] if memory else []
    return tuple(names)


class EvictStep(torch.nn.Module):
    """The evict model program as a one-token decode step over explicit per-site caches.

    ``fast`` (the runtime's own use): capture-time asserts and no-op casts are dropped, attention runs
    without the dispatcher and the writes go into the caches in place. Exported, it stays functional.
    """

    def __init__(self, ep: torch.export.ExportedProgram, names: list[str], policy: str, memory: bool, groups: dict[int, int], fast: bool = False):
        super().__init__()
        self.ep, self.names, self.policy, self.groups, self.fast = ep, names, policy, groups, fast
        gm = last_position_logits(ep.graph_module, logits_index(ep))
        if fast:
            drop_asserts(gm)
            drop_noop_casts(gm)
        self.graph_module = with_site_hooks(gm, self._site)
        self.index = logits_index(ep)
        self.parts = [parts(policy, memory, n.target is EVICT) for n in attention_sites(ep)]
        self.offsets = [sum(len(p) for p in self.parts[:i]) for i in range(len(self.parts) + 1)]
        self.written = [[name for name in p if name in WRITTEN] for p in self.parts]  # what each site returns, in order
        self.observed_from = 1 + sum(len(w) for w in self.written)  # outputs: logits, the written parts, then the queries
        self._step: tuple | None = None

    def _site(self, site: int, call: Call) -> torch.Tensor:
        caches, slots, written, observed = self._step
        cache = dict(zip(self.parts[site], caches[self.offsets[site] : self.offsets[site + 1]], strict=True))
        slot, fast = slots[site], self.fast
        q, G = call.q, self.groups.get(site, 1)
        new = {"k": call.k, "v": call.v, "real": torch.ones_like(slot[:, None], dtype=torch.bool)}
        if "idx_k" in cache:
            new["idx_k"] = call.idx_k[:, None].expand(q.shape[0], G, *call.idx_k.shape[1:])
        if "score" in cache:
            new["score"] = torch.full_like(cache["score"][:, :, :1], float("-inf"))
        for name, value in new.items():
            cache[name] = scatter_key(cache[name], value, slot, fast, dim=cache[name].dim() - 1 if name in ("real", "score") else 2)
        attend = call.to(ATTENTION, k=cache["k"], v=cache["v"], key_padding=cache["real"], causal=False, window=0)
        out = sdpa_layout_forward(*attend.args()) if fast else attend.run()
        if "M" in cache:
            total = empty_sdpa_layout(q, call.v)
            total.copy_(out + memory_readout(q, cache["M"], cache["b"], call.phi, call.gate_w, call.gate_b).to(out.dtype))
            out = total
        if "score" in cache:
            if fast:  # the reference functions themselves, without the dispatcher
                learned = self.policy == "learned"
                seen = (
                    indexer_importance(call.idx_q, cache["idx_k"], call.idx_w, G, need_arg=False)[0]
                    if learned
                    else teacher_importance(q, cache["k"], call.scale, G)
                )
            elif self.policy == "learned":  # one node each when exported
                seen = torch.ops.longctx.evict_importance(call.idx_q, cache["idx_k"], call.idx_w, None, G)
            else:
                seen = torch.ops.longctx.evict_teacher_importance(q, cache["k"], call.scale, G)
            cache["score"] = cache["score"].copy_(torch.maximum(cache["score"], seen)) if fast else torch.maximum(cache["score"], seen)
        if self.policy == "snapkv" and call.op is EVICT:
            observed.append(q)
        written += [cache[name] for name in self.written[site]]
        return out

    def forward(self, state: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], caches: list[torch.Tensor], slots: list[torch.Tensor]) -> tuple:
        written: list[torch.Tensor] = []
        observed: list[torch.Tensor] = []
        self._step = (caches, slots, written, observed)
        try:
            logits = self.graph_module(*flat_inputs(self.ep, self.names, state, inputs))[self.index]
        finally:
            self._step = None
        return (logits, *written, *observed)


def export_decode(model: Any) -> torch.export.ExportedProgram:
    """The decode step of ``model`` (an :class:`~.runtime.EvictModel`) exported functional, with dynamic batch and a
    dynamic capacity per site, weights taken as ``state`` (example caches from a short prompt's prefill)."""
    ids = torch.arange(2 * 8).view(2, 8) % int(model.signature["vocab_size"])
    _, cache = model.prefill(ids)
    inputs, caches, slots = model.step_inputs(cache, ids[:, :1])
    caches = [t.clone() for t in caches]  # tensors of their own, not views into the runtime's buffers
    step = EvictStep(model.ep, model.names, model.policy.policy, model.policy.memory, model.groups)
    batch = Dim("batch", max=1024)
    keys = [Dim(f"keys_{site}", min=2, max=int(model.signature["max_len"]) + 1) for site in range(len(step.parts))]
    where = {"k": 2, "v": 2, "real": 1, "score": 2, "idx_k": 2}  # the keys' dimension of each part (M and b have none)
    cache_dims = [{0: batch, **({where[name]: keys[site]} if name in where else {})} for site, names in enumerate(step.parts) for name in names]
    dims = {
        "state": {name: None for name in model.state},
        "inputs": {name: {0: batch} for name in inputs},
        "caches": cache_dims,
        "slots": [{0: batch}] * len(slots),
    }
    return export_program(step, (model.state, inputs, caches, slots), dims)
