"""Sequence-parallel forms: ``ulysses``, ``ring`` and ``sp`` (Ulysses inside ring), one rewrite for all.

The per-rank program takes this rank's shard of the sequence (``distributed.Layout``: R ring
positions of U Ulysses ranks). Around every canonical attention:

- Ulysses part (U > 1): an all-to-all per q, k, v scatters heads and gathers the ring shard, and the
  inverse all-to-all restores the rank's shard afterwards. KV heads are scattered as they are
  (Hkv % U == 0) or, when U > Hkv and U % Hkv == 0, each is first repeated U/Hkv times so every rank
  receives the one its query heads read; GQA heads are never repeated beyond that.
- Ring part (R > 1): attention becomes ``longctx::ring_attention``: K/V blocks circulate around the
  ring, partial outputs merge by log-sum-exp (``ops/ring.py``). Zigzag shards balance causal work.
- Key padding and the positions that define documents are all-gathered once, in token order.
RoPE needs no change because the per-rank program takes global position ids (``Layout.shard``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ...errors import LccError
from ...fx import COPIED_META, fake_call, is_call, new_call, val
from ...ops.layout import Layout
from ...ops.schema import Call
from ...ops.sharding import ULYSSES
from ...pipeline import PassResult, Program, Stage, register

A2A = torch.ops.longctx.seq_all_to_all.default
GATHER = torch.ops.longctx.seq_all_gather.default
SLICE = torch.ops.longctx.seq_head_slice.default
RING = torch.ops.longctx.ring_attention.default
CANONICAL = torch.ops.longctx.attention.default
HEADS, SEQ = 1, 2  # dims of [B, H, T, D]


@dataclass
class UlyssesConfig:
    """``--opt degree=P``: the number of ranks that share one sequence."""

    degree: int = 2

    def check(self) -> None:
        """The values that need no graph (``options.build`` calls this before the model loads)."""
        if self.degree < 1:
            raise LccError(f"sequence-parallel degree must be at least 1, got {self.degree}")

    def check_model(self, config: Any) -> None:
        """Against the model's config, before capture: the degree must fit its heads."""
        heads = model_heads(config)
        if heads:
            check_heads(*heads, self.degree, "the model")


@dataclass
class RingConfig:
    """``--opt degree=P [zigzag=false]``: ring size, and whether shards are zigzag (balanced causal work)."""

    degree: int = 2
    zigzag: bool = True

    def check(self) -> None:
        """The values that need no graph (``options.build`` calls this before the model loads)."""
        if self.degree < 2:
            raise LccError(f"ring degree must be at least 2, got {self.degree}")


@dataclass
class SpConfig:
    """``--opt degree=P`` (the form picks) or ``--opt hybrid=UxR`` (Ulysses degree U inside ring degree R).

    ``objective``: the bytes the pick minimises: ``forward`` (the (g+1)/P model) or a training ``step``
    (adds the inverse all-to-alls and the ring's backward passes with fp32 dK/dV).
    """

    degree: int | None = None
    hybrid: str | None = None
    zigzag: bool = True
    objective: Literal["forward", "step"] = "forward"

    def check(self) -> None:
        """The values that need no graph (``options.build`` calls this before the model loads)."""
        if self.hybrid:
            U, R = parse_hybrid(self.hybrid)
            if self.degree is not None and self.degree != U * R:
                raise LccError(f"--opt hybrid={self.hybrid} makes {U * R} ranks, but degree={self.degree}")
        elif self.degree is not None and self.degree < 2:
            raise LccError(f"sequence-parallel degree must be at least 2, got {self.degree}")

    def check_model(self, config: Any) -> None:
        """Against the model's config, before capture: a hybrid's Ulysses degree must fit the heads."""
        heads = model_heads(config)
        if heads and self.hybrid:
            check_heads(*heads, parse_hybrid(self.hybrid)[0], "the model")


def model_heads(config: Any) -> tuple[int, int] | None:
    """(query heads, KV heads) from a Hugging Face config, or None when it does not say."""
    hq = getattr(config, "num_attention_heads", None)
    if not isinstance(hq, int):
        return None
    hkv = getattr(config, "num_key_value_heads", None)
    return hq, hkv if isinstance(hkv, int) else hq


def check_heads(hq: int, hkv: int, degree: int, where: str) -> None:
    """Refuse, in one line naming the numbers, a Ulysses degree that does not fit the heads."""
    if degree < 1:
        raise LccError(f"sequence-parallel degree must be at least 1, got {degree}")
    if hq % degree:
        raise LccError(f"{where}: {hq} query heads are not divisible by the sequence-parallel degree {degree}")
    if hkv % degree and degree % hkv:
        raise LccError(f"{where}: {hkv} KV heads and degree {degree}: neither divides the other")


def heads_fit(hq: int, hkv: int, degree: int) -> bool:
    return hq % degree == 0 and (hkv % degree == 0 or degree % hkv == 0)


def forward_bytes(facts: dict[str, Any], layout: Layout, tokens: int, batch: int = 1) -> dict[str, int]:
    """Bytes one rank sends per layer in the forward, by tensor, for a global length ``tokens``.

    An all-to-all over U ranks keeps 1/U of its input: (U-1)/U · (tokens/W) · heads · dim. The ring
    passes its K/V block R-1 times: (R-1) · (tokens/R) · heads on the rank · (d + dv).
    """
    U, R, W = layout.ulysses, layout.ring, layout.degree
    eb, d, dv = facts["dtype_bytes"], facts["head_dim"], facts.get("v_dim", facts["head_dim"])
    local = batch * tokens // W
    share = lambda heads, dim: (U - 1) * local * heads * dim * eb // U  # noqa: E731
    kv_heads = max(facts["hkv"], U)  # KV heads entering the all-to-all (replicated when U > Hkv)
    sent = {}
    if U > 1:
        sent.update(q=share(facts["hq"], d), k=share(kv_heads, d), v=share(kv_heads, dv), out=share(facts["hq"], dv))
    if R > 1:
        sent["kv"] = (R - 1) * (batch * tokens // R) * (kv_heads // U) * (d + dv) * eb
    return sent


def step_bytes(facts: dict[str, Any], layout: Layout, tokens: int, batch: int = 1) -> int:
    """Bytes one rank sends per layer in a training step (forward + backward).

    Each all-to-all's gradient is the inverse all-to-all (same bytes); the ring's backward passes
    the K/V block R-1 times and its fp32 dK/dV accumulator R times (the last one home).
    """
    fwd = forward_bytes(facts, layout, tokens, batch)
    total = 2 * sum(b for name, b in fwd.items() if name != "kv")
    if "kv" in fwd:
        R = layout.ring
        total += 2 * fwd["kv"] + R * fwd["kv"] // (R - 1) * 4 // facts["dtype_bytes"]
    return total


def comm_bytes(facts: dict[str, Any], tokens: int, batch: int = 1) -> dict[str, int]:
    """:func:`forward_bytes` of a rewritten site, from the layout its facts record."""
    return forward_bytes(facts, Layout.from_list(facts["layout"]), tokens, batch)


def _sites(program: Program, ring: int = 1) -> list[torch.fx.Node]:
    """The attention sites, each one the layout can shard: a ring needs canonical attention; Ulysses alone runs any
    op whose arguments ``ops.sharding`` declares (a form's attention, such as HSA's or MSA's, unchanged inside it)."""
    nodes = program.attention_nodes()
    for node in nodes:
        facts = node.meta["lcc"]
        where = f"layer {facts['layer']} ({facts['module']})"
        if node.target is not CANONICAL and (ring > 1 or node.target not in ULYSSES):
            how = "only Ulysses (--sp ulysses) shards it" if node.target in ULYSSES else "sequence parallelism rewrites canonical attention"
            raise LccError(f"{where}: this site is {node.target.name()}; {how}")
        roles = ULYSSES[node.target].roles
        call = Call.of(node)
        if any(call[name] is not None for name, role in roles.items() if role == "absent"):
            raise LccError(f"{where}: an arbitrary mask tensor cannot be sharded over the sequence")
    return nodes


def _inputs(graph: torch.fx.Graph, node: torch.fx.Node, spec: list[int], gathered: dict) -> tuple[Call, int]:
    """The site's call with each argument as the per-rank program needs it (``ops.sharding``), and the all-to-alls
    inserted. Ulysses: per-head tensors all-to-all'd to all tokens of this rank's heads (K/V repeated first where
    the op allows and KV heads are fewer than U), per-head weights sliced. Any layout: per-token inputs and
    documents gathered, once for every site that reads them."""
    U = spec[0]
    facts, call = node.meta["lcc"], Call.of(node)
    where = f"layer {facts['layer']} ({facts['module']})"
    sharding = ULYSSES[node.target]
    changes, exchanged = {}, 0
    for name, role in sharding.roles.items():
        x = call[name]
        if x is None or role in ("local", "absent") or (U == 1 and role in ("heads", "head_weights")):
            continue
        if role == "heads":
            heads = int(val(x).shape[HEADS])
            if heads < U and not sharding.repeat_kv:
                raise LccError(f"{where}: {node.target.name()} shares its selection over a KV head's query heads; {heads} heads cannot be split over {U} ranks")
            if heads < U:
                x = new_call(graph, torch.ops.aten.repeat_interleave.self_int, x, U // heads, HEADS, like=node)
            changes[name], exchanged = new_call(graph, A2A, x, HEADS, SEQ, spec, like=node), exchanged + 1
        elif role == "head_weights":
            changes[name] = new_call(graph, SLICE, x, 0, spec, like=node)
        else:
            if x not in gathered:
                gathered[x] = new_call(graph, GATHER, x, 1, spec) if role == "tokens" else _gather_documents(graph, x, spec)
            changes[name] = gathered[x]
    return call.replace(**changes), exchanged


def rewrite(program: Program, layout: Layout, form: str, why: str = "") -> PassResult:
    """Make every attention site the per-rank program of ``layout``."""
    U, R = layout.ulysses, layout.ring
    spec = layout.to_list()
    graph = program.gm.graph
    nodes = _sites(program, R)
    for node in nodes:
        facts = node.meta["lcc"]
        check_heads(facts["hq"], facts["hkv"], U, f"layer {facts['layer']} ({facts['module']})")
    gathered: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in nodes:
        facts = node.meta["lcc"]
        before = len(gathered)
        with graph.inserting_before(node):
            call, exchanged = _inputs(graph, node, spec, gathered)
        if R > 1:
            with graph.inserting_before(node):
                site = new_call(graph, RING, *call.to(RING, layout=spec).args(), like=node)
                out = graph.call_function(operator.getitem, (site, 0))
            out.meta.update(val=site.meta["val"][0], **{key: node.meta[key] for key in COPIED_META if key in node.meta})
            site.meta["lcc"] = facts
            site.meta["lcc_from"] = out.meta["lcc_from"] = [node.name]
        else:
            node.args, node.kwargs = call.args(), {}
            node.meta["val"] = fake_call(node.target, *node.args)
            out = node
        result = out
        if U > 1:
            with graph.inserting_after(out):
                result = new_call(graph, A2A, out, SEQ, HEADS, spec, like=node)
        node.replace_all_uses_with(result, delete_user_cb=lambda user, result=result: user is not result)
        if R > 1:
            graph.erase_node(node)
        facts.update(
            v_dim=int(val(call.v).shape[-1]),
            dtype_bytes=val(call.q).element_size(),
            form=form if node.target is CANONICAL else facts["form"],  # a form's site stays that form's, now sharded
            degree=layout.degree,
            layout=spec,
            kv_replicated=U // facts["hkv"] if facts["hkv"] < U else 1,
            # gathers are shared by every site that reads the same padding or documents: counted where inserted
            collectives={"all_to_all": exchanged + (U > 1), "all_gather": len(gathered) - before, "send_recv": R - 1},
        )
    program.signature["sequence_parallel"] = {"form": form, "degree": layout.degree, "ulysses": U, "ring": R, "zigzag": layout.zigzag}
    if why:
        program.signature["sequence_parallel"]["why"] = why
    parts = ([f"4 all-to-alls over {U} ranks"] if U > 1 else []) + ([f"a ring of {R} ({R - 1} K/V passes forward)"] if R > 1 else [])
    return PassResult(matches=len(nodes), notes=[f"{len(nodes)} sites: {' and '.join(parts)}", *([why] if why else [])])


@register("ulysses", Stage.FORM, UlyssesConfig)
def ulysses(program: Program, cfg: UlyssesConfig) -> PassResult:
    """Wrap each attention in all-to-alls (heads ↔ sequence) and gather its key padding and documents."""
    return rewrite(program, Layout(ulysses=cfg.degree), "ulysses")


@register("ring", Stage.FORM, RingConfig)
def ring(program: Program, cfg: RingConfig) -> PassResult:
    """Replace each attention by ring attention over ``degree`` ranks (zigzag shards by default)."""
    cfg.check()
    return rewrite(program, Layout(ring=cfg.degree, zigzag=cfg.zigzag), "ring")


@register("sp", Stage.FORM, SpConfig)
def sp(program: Program, cfg: SpConfig) -> PassResult:
    """Pick Ulysses, ring or Ulysses-inside-ring from the heads and the bytes each moves, and say why."""
    cfg.check()
    layout, why = choose(_sites(program), cfg)
    return rewrite(program, layout, "sp", why)


def parse_hybrid(text: str) -> tuple[int, int]:
    """``"2x4"`` -> (Ulysses degree 2, ring degree 4)."""
    left, sep, right = text.lower().partition("x")
    if not sep or not left.strip().isdigit() or not right.strip().isdigit() or int(left) < 1 or int(right) < 1:
        raise LccError(f"invalid --opt hybrid={text}: expected ULYSSES_DEGREExRING_DEGREE, e.g. 2x4")
    return int(left), int(right)


def choose(nodes: list[torch.fx.Node], cfg: SpConfig) -> tuple[Layout, str]:
    """The layout for ``sp``: the user's hybrid, or of those the heads allow, the one sending fewest bytes.

    Per layer, Ulysses sends (2Hq + 2Hkv)(P-1)/P and a ring 2Hkv(P-1) head-rows of a shard, a ratio
    of (g+1)/P with g = Hq/Hkv: the ring wins for small P and large GQA groups. Ties go to more
    Ulysses (whole-sequence attention kernels, no causal imbalance).
    """
    if not nodes:
        raise LccError("the model has no attention to make sequence-parallel")
    calls = [Call.of(n) for n in nodes]
    facts = [dict(n.meta["lcc"], v_dim=int(val(c.v).shape[-1]), dtype_bytes=val(c.q).element_size()) for n, c in zip(nodes, calls, strict=True)]
    hq, hkv = facts[0]["hq"], facts[0]["hkv"]
    if cfg.hybrid:
        U, R = parse_hybrid(cfg.hybrid)
        return Layout(U, R, cfg.zigzag and R > 1), f"hybrid {U}x{R} as asked"
    P = 2 if cfg.degree is None else cfg.degree
    tokens = 1 << 16  # bytes scale linearly in length: any length ranks the options the same
    options = []
    for U in (u for u in range(P, 0, -1) if P % u == 0):
        if all(heads_fit(f["hq"], f["hkv"], U) for f in facts):
            layout = Layout(U, P // U, cfg.zigzag and P // U > 1)
            options.append((sum(_cost(f, layout, tokens, cfg.objective) for f in facts), -U, layout))
    cost, _, best = min(options, key=lambda o: o[:2])
    listed = ", ".join(f"{_name(lay)} {c / (1 << 20):.1f} MiB" for c, _, lay in options)
    what = "forward" if cfg.objective == "forward" else "training-step"
    why = f"{_name(best)}: Hq={hq}, Hkv={hkv} (g={hq // hkv}), P={P}; {what} bytes per rank over all layers at {tokens:,} tokens: {listed}"
    return best, why


def _cost(facts: dict[str, Any], layout: Layout, tokens: int, objective: str) -> int:
    return sum(forward_bytes(facts, layout, tokens).values()) if objective == "forward" else step_bytes(facts, layout, tokens)


def _name(layout: Layout) -> str:
    if layout.ring == 1:
        return "ulysses"
    return "ring" if layout.ulysses == 1 else f"hybrid {layout.ulysses}x{layout.ring}"


def _gather_documents(graph: torch.fx.Graph, doc_ids: torch.fx.Node, spec: list[int]) -> torch.fx.Node:
    """Documents come from position resets over the whole sequence: gather the positions, then number them."""
    if not is_call(doc_ids, torch.ops.longctx.doc_ids):
        raise LccError("packed-document masks under sequence parallelism need document ids computed from position_ids")
    positions = new_call(graph, GATHER, doc_ids.args[0], 1, spec)
    return new_call(graph, torch.ops.longctx.doc_ids.default, positions)
