"""Running an ``evict`` program with a KV cache that is compacted to a budget (``passes/eviction.py`` marks the layers).

Each evicting layer keeps, per batch row, K (after RoPE), V, which keys are real, their positions, and
per policy what it ranks them by: the running max of the indexer's scores over the queries since the
last eviction (``learned``), of the true logits (``oracle``), the last ``observation`` queries
(``snapkv``: their attention, averaged over heads, summed, max-pooled over 7 keys), or nothing
(``streaming``: the most recent keys). Eviction keeps the first ``sinks`` real keys, the last
``window`` and the best of the rest up to the budget, and gathers them into new, smaller tensors (the
memory is really freed); the evicted K/V are written into the layer's latent memory, whose gated
readout is added to the attention output of later queries. It runs at the end of the prompt (or of
each prompt chunk) and every ``interval`` tokens after it. Layers the pass did not choose keep every key.
"""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import LccError, LccWarning
from ...ops.attention import empty_sdpa_layout
from ...ops.evict import POLICIES, dropped_positions, indexer_importance, keep_positions, memory_readout, memory_write, parse_budget, teacher_importance
from ...ops.schema import Call
from ...options import convert
from ...runtime.generate import Sampling, collect, pad_prompts, token_steps
from ...runtime.interpret import attention_sites, flat_inputs, last_position_logits, logits_index, step_state, with_site_hooks
from ...runtime.model import default_positions
from .step import EvictStep

EVICT = torch.ops.longctx.evict_attention.default
ATTENTION = torch.ops.longctx.attention.default
POOL = 7  # SnapKV's max-pooling width over neighbouring keys


@dataclasses.dataclass
class Policy:
    """When and what to evict: the artifact's ``signature["evict"]`` with any overrides (same names as ``--opt``)."""

    budget: float | int
    sinks: int
    window: int
    interval: int
    policy: str
    memory: bool
    granularity: str
    observation: int
    prefill_chunk: int

    @classmethod
    def of(cls, recorded: dict[str, Any], overrides: dict[str, Any]) -> Policy:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise LccError(f"unknown eviction setting {sorted(unknown)[0]!r}; settings are {', '.join(f.name for f in dataclasses.fields(cls))}")
        fields = {f.name: recorded[f.name] for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for name, value in overrides.items():  # typed as --opt values are: "256" is 256, "on" is True
            if name == "memory" and isinstance(value, str):
                value = convert(name, {"on": "true", "off": "false"}.get(value, value), bool)
            elif name != "budget":
                value = convert(name, value, hints[name])
            fields[name] = value
        policy = cls(**fields)
        if policy.policy not in POLICIES:
            raise LccError(f"unknown policy {policy.policy!r}; choose one of {', '.join(POLICIES)}")
        for name in ("sinks", "window", "observation", "prefill_chunk"):
            if getattr(policy, name) < 0:
                raise LccError(f"invalid {name}={getattr(policy, name)}: expected 0 or more")
        if "budget" in overrides:
            policy.budget = parse_budget(str(policy.budget), policy.sinks, policy.window)
        if policy.interval < 1:
            raise LccError(f"invalid interval {policy.interval}: evict every 1 or more tokens")
        return policy

    def resolve(self, prompt: int) -> int:
        """The kept keys per layer for a prompt of ``prompt`` tokens: the count, or the ratio of it (at least sinks + window,
        with a one-line warning when the ratio asks for no more: then every policy keeps what StreamingLLM keeps)."""
        if isinstance(self.budget, int):
            return self.budget
        asked, pinned = math.ceil(self.budget * prompt), self.sinks + self.window
        if asked <= pinned and prompt > pinned:
            warnings.warn(
                f"budget {self.budget:g} of a {prompt:,}-token prompt is {asked} keys, not more than sinks + window = {pinned}: "
                f"{pinned} are kept, the sinks and the recent window, so every policy evicts as StreamingLLM does here",
                LccWarning,
                stacklevel=2,
            )
        return max(asked, pinned)


# the per-key parts of a layer's cache and the dimension they grow along
KEYED = {"k": 2, "v": 2, "real": 1, "pos": 2, "idx_k": 2, "score": 2}


@dataclasses.dataclass
class SiteCache:
    """One layer's cache: K/V [B, Hkv, n, D], real keys [B, n], positions [B, G, n], and what eviction ranks by.

    The per-key parts live in buffers with spare room (``headroom`` keys after a compaction: the tokens
    until the next one), so a token is written in place rather than concatenated into a new copy."""

    headroom: int
    n: int = 0
    buffers: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    obs_q: torch.Tensor | None = None  # [B, Hq, o, D] the last queries (snapkv)
    obs_real: torch.Tensor | None = None
    M: torch.Tensor | None = None  # latent memory [B, Hkv, m, Dv] and its normaliser [B, Hkv, m]
    b: torch.Tensor | None = None
    params: tuple = ()
    scale: float = 1.0

    def part(self, name: str) -> torch.Tensor | None:
        """The filled view of a per-key part (None when the policy keeps none)."""
        buffer = self.buffers.get(name)
        return None if buffer is None else buffer.narrow(KEYED[name], 0, self.n)

    k = property(lambda self: self.part("k"))
    v = property(lambda self: self.part("v"))
    real = property(lambda self: self.part("real"))
    pos = property(lambda self: self.part("pos"))
    idx_k = property(lambda self: self.part("idx_k"))  # [B, G, n, Di] indexer keys (learned policy)
    score = property(lambda self: self.part("score"))  # [B, G, n] running importance since the last eviction

    def reserve(self, count: int, like: dict[str, torch.Tensor]) -> None:
        """Room for ``count`` more keys, growing the buffers when full (by ``headroom`` keys beyond a single token)."""
        room = min((b.shape[KEYED[name]] for name, b in self.buffers.items()), default=0)
        if self.n + count > room:
            self.reset({name: self.part(name) for name in self.buffers} or {name: t.narrow(KEYED[name], 0, 0) for name, t in like.items()}, extra=count)

    def append(self, parts: dict[str, torch.Tensor]) -> None:
        """Write new keys' parts after the filled ones."""
        count = next(iter(parts.values())).shape[KEYED[next(iter(parts))]]
        self.reserve(count, parts)
        for name, t in parts.items():
            self.buffers[name].narrow(KEYED[name], self.n, count).copy_(t)
        self.n += count

    def reset(self, parts: dict[str, torch.Tensor], extra: int = 0) -> None:
        """New buffers holding ``parts`` with room for ``extra`` more keys plus the headroom (what compaction keeps).
        The room is zeros, not garbage: a decode step reads it (masked, but NaN times a zero weight is NaN)."""
        n = next(iter(parts.values())).shape[KEYED[next(iter(parts))]]
        room = n + extra + (self.headroom if extra < self.headroom else 0)  # a whole chunk is compacted right after: no spare room
        buffers = {}
        for name, t in parts.items():
            shape = list(t.shape)
            shape[KEYED[name]] = room
            buffers[name] = t.new_zeros(shape)
            buffers[name].narrow(KEYED[name], 0, n).copy_(t)
        self.buffers, self.n = buffers, n

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.buffers.values(), self.obs_q, self.obs_real, self.M, self.b) if t is not None]


@dataclasses.dataclass
class EvictCache:
    """Every layer's cache of one batch, the budget it is compacted to, and what it held at most."""

    sites: dict[int, SiteCache] = dataclasses.field(default_factory=dict)
    budget: int = 0
    since: int = 0  # tokens fed since the last eviction
    next_positions: torch.Tensor | None = None
    peak_bytes: int = 0

    def bytes(self) -> int:
        """Bytes held now by every layer's cache tensors (K, V and the eviction state)."""
        return sum(t.numel() * t.element_size() for site in self.sites.values() for t in site.tensors())

    def kv_bytes(self) -> int:
        """Bytes of K and V alone."""
        return sum(t.numel() * t.element_size() for site in self.sites.values() for t in (site.k, site.v))

    def lengths(self) -> dict[int, int]:
        """Keys held per layer."""
        return {i: site.k.shape[2] for i, site in self.sites.items()}


def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t`` [B, H, n, ...] gathered along keys by ``index`` [B, G, m] (G = H, or 1 shared by every head): [B, H, m, ...]."""
    B, H = t.shape[:2]
    index = index.repeat_interleave(H // index.shape[1], dim=1)
    return t.gather(2, index.view(*index.shape, *[1] * (t.dim() - 3)).expand(B, H, index.shape[2], *t.shape[3:]))


class EvictModel:
    """An ``evict`` program (a :class:`Compiled`'s or a loaded artifact's) run with an evicting KV cache."""

    def __init__(self, ep: torch.export.ExportedProgram, signature: dict[str, Any], **overrides: Any):
        if "evict" not in signature:
            raise LccError("this program is not an evict form; convert it with --to evict")
        self.ep, self.signature = ep, signature
        self.policy = Policy.of(signature["evict"], overrides)
        self.state = step_state(ep)
        self.names = signature["inputs"]
        self.index = logits_index(ep)
        self._step: tuple | None = None  # (cache, positions) of the forward running now, read by the sites
        full = ep.graph_module
        self.graphs = {last: with_site_hooks(gm, self._site) for last, gm in ((False, full), (True, last_position_logits(full, self.index)))}
        sites = attention_sites(ep)
        self.evicting = {i for i, n in enumerate(sites) if n.target is EVICT}
        self.groups = {}
        for i, node in enumerate(sites):
            call = Call.of(node)
            if call.get("doc_ids") is not None or call.get("mask") is not None or not call.causal:
                raise LccError(f"attention site {i} is not plain causal attention: it cannot be continued from a cache")
            hkv, heads = int(call.k.meta["val"].shape[1]), int(call.idx_q.meta["val"].shape[1]) if i in self.evicting else 0
            self.groups[i] = 1 if self.policy.granularity == "layer" else hkv
            if i in self.evicting and heads % self.groups[i]:
                raise LccError(f"per-KV-head eviction needs the indexer's {heads} heads split evenly over the {hkv} KV heads; convert with granularity=kv_head")
        if self.policy.memory and not signature["evict"]["memory"]:
            raise LccError("this artifact was converted with memory=off: it has no latent memory to turn on")
        self.step = EvictStep(ep, self.names, self.policy.policy, self.policy.memory, self.groups, fast=True)

    # one forward over new tokens

    def forward(self, cache: EvictCache, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, last: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (``last``: [B, 1, V]) of new tokens ``ids`` [B, T] after the cache, which they join."""
        inputs = {"input_ids": ids, "attention_mask": mask.long(), "position_ids": positions}
        self._step = (cache, positions.long())
        try:
            with torch.no_grad():
                logits = self.graphs[last](*flat_inputs(self.ep, self.names, self.state, inputs))[self.index]
        finally:
            self._step = None
        cache.peak_bytes = max(cache.peak_bytes, cache.bytes())
        cache.next_positions = positions[:, -1] + 1
        return logits

    def step_inputs(self, cache: EvictCache, ids: torch.Tensor) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]]:
        """(inputs, caches, slots) of :class:`EvictStep` for one new token per row ``ids`` [B, 1]: every site's buffers
        (with room for the token) and where it goes."""
        B = ids.shape[0]
        caches, slots = [], []
        for site, names in enumerate(self.step.parts):
            c = cache.sites[site]
            c.reserve(1, {})
            if "M" in names and c.M is None:  # no memory written yet: reading an empty one adds exactly zero
                Hkv, m = c.k.shape[1], c.params[0].shape[0]
                c.M, c.b = c.k.new_zeros(B, Hkv, m, c.v.shape[-1], dtype=torch.float32), c.k.new_zeros(B, Hkv, m, dtype=torch.float32)
            caches += [c.buffers[name].narrow(KEYED[name], 0, c.n + 1) if name in KEYED else getattr(c, name) for name in names]  # filled keys + the new one
            slots.append(torch.full((B,), c.n, dtype=torch.long, device=ids.device))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": cache.next_positions[:, None]}
        return inputs, caches, slots

    def decode(self, cache: EvictCache, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, V] of one new token per row ``ids`` [B, 1] through the decode step (:class:`EvictStep`), which
        writes it into the caches in place."""
        inputs, caches, slots = self.step_inputs(cache, ids)
        with torch.no_grad():
            outputs = self.step(self.state, inputs, caches, slots)
        B, positions = ids.shape[0], inputs["position_ids"]
        observed = iter(outputs[self.step.observed_from :])
        for site, c in sorted(cache.sites.items()):
            if "pos" in c.buffers:
                c.buffers["pos"].narrow(2, c.n, 1).copy_(positions[:, None].expand(B, c.buffers["pos"].shape[1], 1))
            c.n += 1
            if self.policy.policy == "snapkv" and site in self.evicting:
                self._remember(c, next(observed), torch.ones(B, 1, dtype=torch.bool, device=ids.device))
        cache.peak_bytes = max(cache.peak_bytes, cache.bytes())
        cache.next_positions = positions[:, -1] + 1
        return outputs[0]

    def _site(self, site: int, call: Call) -> torch.Tensor:
        return self._attend(*self._step, site, call)

    def _attend(self, cache: EvictCache, positions: torch.Tensor, site: int, call: Call) -> torch.Tensor:
        q, k, v, key_padding = call.q, call.k, call.v, call.key_padding
        B, Hq, T, _ = q.shape
        new_real = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_padding is None else key_padding.bool()
        c = cache.sites.get(site)
        if c is None:
            c = cache.sites[site] = SiteCache(headroom=max(self.policy.interval, self.policy.prefill_chunk))
        parts = {"k": k, "v": v, "real": new_real}
        if site not in self.evicting:
            c.append(parts)
            return call.replace(k=c.k, v=c.v, key_padding=c.real)()
        G = self.groups[site]
        parts["pos"] = positions[:, None].expand(B, G, T)
        if self.policy.policy in ("learned", "oracle"):  # what they rank by; snapkv and streaming keep no score
            parts["score"] = torch.full((B, G, T), float("-inf"), device=q.device)
        if self.policy.policy == "learned":
            idx_k = call.idx_k
            parts["idx_k"] = idx_k[:, None].expand(B, G, *idx_k.shape[1:])
        c.append(parts)
        out = ATTENTION(q, c.k, c.v, c.real, None, None, call.scale, True, 0)
        c.params, c.scale = (call.phi, call.gate_w, call.gate_b, call.decay, call.strength), call.scale
        if self.policy.memory and c.M is not None:
            total = empty_sdpa_layout(q, v)
            total.copy_(out + memory_readout(q, c.M, c.b, *c.params[:3]).to(out.dtype))
            out = total
        self._observe(c, site, call, new_real)
        return out

    def _observe(self, c: SiteCache, site: int, call: Call, new_real: torch.Tensor) -> None:
        """Update what the policy will rank the keys by with the new queries."""
        q, idx_q, idx_w = call.q, call.idx_q, call.idx_w
        G = self.groups[site]
        policy = self.policy.policy
        if policy == "learned":
            c.score.copy_(torch.maximum(c.score, indexer_importance(idx_q, c.idx_k, idx_w, G, query_real=new_real, need_arg=False)[0]))
        elif policy == "oracle":
            c.score.copy_(torch.maximum(c.score, teacher_importance(q, c.k, c.scale, G, query_real=new_real)))
        elif policy == "snapkv":
            self._remember(c, q, new_real)

    def _remember(self, c: SiteCache, q: torch.Tensor, new_real: torch.Tensor) -> None:
        """Keep the last ``observation`` queries (snapkv ranks the keys by their attention)."""
        keep = self.policy.observation
        c.obs_q = q[:, :, -keep:] if c.obs_q is None else torch.cat([c.obs_q, q], 2)[:, :, -keep:]
        c.obs_real = new_real[:, -keep:] if c.obs_real is None else torch.cat([c.obs_real, new_real], 1)[:, -keep:]

    # eviction

    def evict(self, cache: EvictCache) -> None:
        """Compact every evicting layer holding more than the budget (writing what leaves into its memory)."""
        with torch.no_grad():  # the memory's weights are parameters: no autograd graph may grow across compactions
            for site, c in cache.sites.items():
                if site in self.evicting and c.k.shape[2] > cache.budget:
                    self._compact(c, site, cache.budget)
        cache.since = 0

    def _ranking(self, c: SiteCache, site: int) -> torch.Tensor:
        """[B, G, n]: what the policy keeps the highest of."""
        B, Hkv, n, D = c.k.shape
        G = self.groups[site]
        if self.policy.policy in ("learned", "oracle"):
            return c.score
        if self.policy.policy == "streaming":
            return torch.arange(n, dtype=torch.float32, device=c.k.device).expand(B, G, n)
        o, Hq = c.obs_q.shape[2], c.obs_q.shape[1]
        logits = torch.einsum("bhgod,bhnd->bhgon", c.obs_q.float().view(B, Hkv, Hq // Hkv, o, D), c.k.float()) * c.scale
        allowed = torch.arange(n, device=c.k.device)[None, :] <= torch.arange(o, device=c.k.device)[:, None] + (n - o)
        allowed = allowed[None, None, None] & c.real[:, None, None, None, :]
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        votes = (probs * c.obs_real[:, None, None, :, None]).mean(2).sum(2)  # [B, Hkv, n]
        votes = votes.mean(1, keepdim=True) if G == 1 else votes
        return F.max_pool1d(votes, POOL, stride=1, padding=POOL // 2)

    def _compact(self, c: SiteCache, site: int, budget: int) -> None:
        B, _, n, _ = c.k.shape
        G = self.groups[site]
        real = c.real[:, None].expand(B, G, n)
        keep = keep_positions(self._ranking(c, site).reshape(B * G, n), self.policy.sinks, self.policy.window, budget, real.reshape(B * G, n)).view(B, G, -1)
        if self.policy.memory:
            gone = dropped_positions(keep, n)
            phi, _, _, decay, strength = c.params
            gone_real = take(real[..., None].float(), gone)
            phi_k = F.linear(take(c.k, gone).float(), phi.float()) * gone_real
            if c.M is None:
                c.M = phi_k.new_zeros(B, c.k.shape[1], phi.shape[0], c.v.shape[-1])
                c.b = phi_k.new_zeros(B, c.k.shape[1], phi.shape[0])
            c.M, c.b = memory_write(c.M, c.b, phi_k, take(c.v, gone), torch.sigmoid(decay.float()), F.softplus(strength.float()))
        kept = {"k": take(c.k, keep), "v": take(c.v, keep), "pos": c.pos.gather(2, keep)}
        if c.score is not None:
            kept["score"] = torch.full_like(keep, float("-inf"), dtype=torch.float32)
        kept["real"] = c.real.gather(1, keep[:, 0])  # padding leaves first in every head, so the real keys line up across heads
        if c.idx_k is not None:
            kept["idx_k"] = take(c.idx_k, keep)
        c.reset(kept)

    # prompt, continuation, generation

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None = None, budget: int | None = None, last: bool = True) -> tuple[torch.Tensor, EvictCache]:
        """(logits of the prompt's last position [B, 1, V], or of every position when not ``last``, and the compacted cache).

        The budget is resolved from the prompt length unless given; with ``prefill_chunk`` the prompt runs in
        chunks and the cache is compacted after each."""
        B, L = ids.shape
        mask = torch.ones_like(ids) if mask is None else mask
        positions = default_positions(mask, B, L, ids.device)
        cache = EvictCache(budget=self.policy.resolve(L) if budget is None else budget)
        step = self.policy.prefill_chunk or L
        outs = []
        for start in range(0, L, step):
            end = min(L, start + step)
            outs.append(self.forward(cache, ids[:, start:end], mask[:, start:end], positions[:, start:end], last=last))
            self.evict(cache)
        return (outs[-1] if last else torch.cat(outs, 1)), cache

    def extend(self, cache: EvictCache, ids: torch.Tensor, last: bool = False) -> torch.Tensor:
        """Logits of more tokens fed after the cache (one decode step, or several); evicts every ``interval`` tokens."""
        B, T = ids.shape
        if T == 1:
            logits = self.decode(cache, ids)
        else:
            positions = cache.next_positions[:, None] + torch.arange(T, device=ids.device)
            logits = self.forward(cache, ids, torch.ones_like(ids), positions, last=last)
        cache.since += T
        if cache.since >= self.policy.interval:
            self.evict(cache)
        return logits

    def stream(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, sampling: Sampling | None = None, pad_id: int = 0
    ) -> Iterator[list[int | None]]:
        """Yield each step's new token per prompt (None once a prompt has stopped), as ``runtime.generate``."""
        ids, mask = pad_prompts(prompts, max_new_tokens, pad_id, self.names, int(self.signature["max_len"]), int(self.signature["vocab_size"]))
        logits, cache = self.prefill(ids, mask)
        yield from token_steps(logits[:, -1], lambda token: self.extend(cache, token[:, None], last=True)[:, -1], max_new_tokens, sampling or Sampling())

    def generate(
        self, prompts, max_new_tokens: int = 32, pad_id: int = 0, stream: Callable[[list[int | None]], None] | None = None, **sampling: Any
    ) -> list[list[int]]:
        """The new tokens of each prompt (greedy unless ``sampling`` — keys of :class:`Sampling` — says otherwise)."""
        return collect(self.stream(prompts, max_new_tokens, Sampling(**sampling), pad_id), len(prompts), stream)
