"""Each pass on a small hand-written program, TVM Relax style: ``before`` goes through the pass and must be
``expected`` call for call (ops, argument wiring and constants), and compute what it computes.

The programs are one attention block (embedding, q/k/v projections with 4 query and 2 key/value heads, the
attention under test, the output projection), written once with the attention as a parameter and exported
with a dynamic sequence length, as a model's capture is.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F

from longctx_compile.distributed import Layout
from longctx_compile.forms.hsa.rewrite import HsaConfig
from longctx_compile.forms.sp.rewrite import RingConfig, UlyssesConfig
from longctx_compile.passes.canonicalize import CanonicalizeConfig
from longctx_compile.passes.lower import LowerConfig
from longctx_compile.pipeline import PASSES, Program

L = torch.ops.longctx
HQ, HKV, D, WIDTH = 4, 2, 8, 32
SCALE = 1 / math.sqrt(D)  # what canonicalize records for the default scale


class Block(torch.nn.Module):
    """One decoder attention layer around ``attend(q [B, 4, T, 8], k [B, 2, T, 8], v, hidden, block)``; q and k are
    scaled by cos(position) (a stand-in for a rotary embedding: they depend on ``position_ids``). ``extra``: the
    parameters a pass adds (``a.b`` held as ``a_b``), in the order it adds them."""

    def __init__(self, attend, extra: dict[str, tuple[int, ...]] | None = None):
        super().__init__()
        self.q, self.k, self.v = torch.nn.Linear(WIDTH, HQ * D), torch.nn.Linear(WIDTH, HKV * D), torch.nn.Linear(WIDTH, HKV * D)
        self.o = torch.nn.Linear(HQ * D, WIDTH)
        self.added = torch.nn.Module()  # the parameters a pass adds, after the layer's own (where add_parameter puts them)
        for name, shape in (extra or {}).items():
            self.added.register_parameter(name.replace(".", "_"), torch.nn.Parameter(torch.zeros(shape)))
        self.attend = attend

    def forward(self, x, position_ids):
        B, T, _ = x.shape
        rot = torch.cos(position_ids.float())[:, None, :, None]
        q = self.q(x).view(B, T, HQ, D).transpose(1, 2) * rot
        k = self.k(x).view(B, T, HKV, D).transpose(1, 2) * rot
        v = self.v(x).view(B, T, HKV, D).transpose(1, 2)
        return self.o(self.attend(q, k, v, x, self).transpose(1, 2).reshape(B, T, HQ * D))


class Model(torch.nn.Module):
    """The embedding and one :class:`Block`; ``own_positions``: the layer is given ``arange(T)``, not ``position_ids``."""

    def __init__(self, attend, extra: dict[str, tuple[int, ...]] | None = None, own_positions: bool = False):
        super().__init__()
        torch.manual_seed(0)  # every variant holds the same weights
        self.embed = torch.nn.Embedding(64, WIDTH)
        self.layers = torch.nn.ModuleList([Block(attend, extra)])
        self.own_positions = own_positions

    def forward(self, input_ids, position_ids):
        if self.own_positions:
            position_ids = torch.arange(input_ids.shape[1]).expand(input_ids.shape)
        return self.layers[0](self.embed(input_ids), position_ids)


def repeat_kv(x):
    """transformers' GQA expansion: [B, Hkv, T, D] -> [B, Hq, T, D]."""
    B, H, T, _ = x.shape
    return x[:, :, None].expand(B, H, HQ // HKV, T, D).reshape(B, HQ, T, D)


def eager_causal(q, k, v, *_):
    T = q.shape[2]
    mask = torch.full((T, T), float("-inf")).triu(1)
    probs = torch.softmax(q @ repeat_kv(k).transpose(-1, -2) * SCALE + mask, dim=-1)
    return probs @ repeat_kv(v)


def sdpa_causal(q, k, v, *_):
    return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), is_causal=True)


def canonical(q, k, v, *_):
    return L.attention(q, k, v, None, None, None, SCALE, True, 0)


def program_of(attend, extra: dict[str, tuple[int, ...]] | None = None, max_len: int = 64, own_positions: bool = False) -> Program:
    ids = torch.randint(0, 64, (2, 12))
    T = torch.export.Dim("T", min=2, max=max_len)
    ep = torch.export.export(Model(attend, extra, own_positions), (ids, torch.arange(12).expand(2, 12)), dynamic_shapes=({1: T}, {1: T}), strict=False)
    return Program(ep, {"inputs": ["input_ids", "position_ids"], "max_len": max_len}, source={})


def run(program: Program, name: str, config) -> Program:
    PASSES[name].fn(program, config)
    program.gm.graph.lint()
    program.gm.recompile()
    return program


def structure(program: Program) -> list[tuple]:
    """The graph's nodes in order: kind, op and arguments (an op's omitted defaults filled in from its schema), an
    argument that is a node given as its position. An output of a multi-output op that nothing reads is left out."""
    nodes = [n for n in program.gm.graph.nodes if not (n.target is operator.getitem and not n.users)]
    where = {n: i for i, n in enumerate(nodes)}

    def arg(a):
        if isinstance(a, torch.fx.Node):
            return f"%{where[a]}"
        if isinstance(a, list | tuple):
            return type(a)(arg(x) for x in a)
        if isinstance(a, dict):
            return {key: arg(x) for key, x in a.items()}
        return a

    def args(n):
        if isinstance(n.target, torch._ops.OpOverload):
            return n.args + tuple(a.default_value for a in n.target._schema.arguments[len(n.args) :])
        return n.args

    return [(n.op, str(n.target) if n.op == "call_function" else n.op, arg(args(n)), arg(dict(n.kwargs))) for n in nodes]


def assert_program(got: Program, expected: Program) -> None:
    assert structure(got) == structure(expected)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(9).expand(2, 9)
    torch.testing.assert_close(got.ep.module()(ids, positions), expected.ep.module()(ids, positions))


@pytest.mark.parametrize("attend", [eager_causal, sdpa_causal], ids=["eager", "sdpa"])
def test_canonicalize(attend):
    """A softmax over q·kᵀ with a triu mask, or SDPA, over repeat_kv'd keys: one canonical attention on the
    un-repeated k and v, causal, the mask's computation gone."""
    got = run(program_of(attend), "canonicalize", CanonicalizeConfig())
    assert_program(got, program_of(canonical))
    (node,) = got.attention_nodes()
    facts = {"mask": "causal", "hq": HQ, "hkv": HKV, "head_dim": D, "matched": "eager" if attend is eager_causal else "sdpa"}
    assert node.meta["lcc"].items() >= facts.items()


def test_canonicalize_keeps_a_sliding_window():
    def windowed(q, k, v, *_):
        T = q.shape[2]
        i = torch.arange(T)
        keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 3)
        return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=keep)

    got = run(program_of(windowed), "canonicalize", CanonicalizeConfig())
    assert_program(got, program_of(lambda q, k, v, *_: L.attention(q, k, v, None, None, None, SCALE, True, 3)))


def canonical_program() -> Program:
    """A canonical program (the input of every form pass): ``canonicalize`` of the SDPA block."""
    return run(program_of(sdpa_causal), "canonicalize", CanonicalizeConfig())


def test_hsa():
    """The retrofit recipe: K/V repeated per query head (each head selects), bound scores reranked over 4·K candidates,
    joint fusion; with a shared selection and no reranking, the op reads the KV heads as they are."""

    def per_head(q, k, v, *_):
        G = q.shape[1] // k.shape[1]
        k, v = (t.unsqueeze(2).expand(-1, -1, G, -1, -1).flatten(1, 2) for t in (k, v))
        return L.hsa_attention(q, k, v, None, None, None, SCALE, 4, 2, 1, "bound", "token", False, "joint", None, None, 4)

    got = run(canonical_program(), "hsa", HsaConfig(chunk=4, topk="2", window=1))
    assert_program(got, program_of(per_head))
    assert not got.signature["exact"]
    got = run(canonical_program(), "hsa", HsaConfig(chunk=4, topk="2", window=1, heads="group", rerank=0))
    statics = (4, 2, 1, "bound", "token", False, "joint", None, None, 0)
    assert_program(got, program_of(lambda q, k, v, *_: L.hsa_attention(q, k, v, None, None, None, SCALE, *statics)))


def test_ulysses():
    """heads → sequence all-to-alls on q, k and v, attention, sequence → heads on its output."""
    layout = Layout(ulysses=2).to_list()

    def expected(q, k, v, *_):
        a2a = L.seq_all_to_all
        q, k, v = (a2a(x, 1, 2, layout) for x in (q, k, v))
        return a2a(L.attention(q, k, v, None, None, None, SCALE, True, 0), 2, 1, layout)

    got = run(canonical_program(), "ulysses", UlyssesConfig(degree=2))
    assert structure(got) == structure(program_of(expected))
    assert got.signature["sequence_parallel"] == {"form": "ulysses", "degree": 2, "ulysses": 2, "ring": 1, "zigzag": False}


def test_ring():
    layout = Layout(ring=2, zigzag=True).to_list()
    got = run(canonical_program(), "ring", RingConfig(degree=2))
    assert structure(got) == structure(program_of(lambda q, k, v, *_: L.ring_attention(q, k, v, None, None, SCALE, True, 0, layout)[0]))


def test_sp_hybrid():
    """Ulysses inside a ring: the all-to-alls around a ring attention that runs over the ring's half of the ranks."""
    from longctx_compile.forms.sp.rewrite import SpConfig

    layout = Layout(ulysses=2, ring=2, zigzag=True).to_list()

    def expected(q, k, v, *_):
        a2a = L.seq_all_to_all
        q, k, v = (a2a(x, 1, 2, layout) for x in (q, k, v))
        return a2a(L.ring_attention(q, k, v, None, None, SCALE, True, 0, layout)[0], 2, 1, layout)

    got = run(canonical_program(), "sp", SpConfig(hybrid="2x2"))
    assert structure(got) == structure(program_of(expected))
    assert got.signature["sequence_parallel"] == {"form": "sp", "degree": 4, "ulysses": 2, "ring": 2, "zigzag": True, "why": "hybrid 2x2 as asked"}


@pytest.mark.parametrize("target", ["cpu", "h100"])
def test_lower(target):
    """cpu keeps the reference op; a GPU target binds the flash kernel with its tile configs and reads output 0."""
    got = run(canonical_program(), "lower", LowerConfig(target=target))
    if target == "cpu":
        assert structure(got) == structure(canonical_program())
        return
    flash = next(n for n in got.gm.graph.nodes if n.target is L.flash_attention.default)
    fwd, bwd = flash.args[-2:]

    def expected(q, k, v, *_):
        return L.flash_attention(q, k, v, None, None, None, SCALE, True, 0, fwd, bwd)[0]

    assert structure(got) == structure(program_of(expected))
    assert [n.target for n in flash.users] == [operator.getitem]


def test_msa_and_doc_rope():
    """A router query and key projection of the layer's input per routed layer, as new parameters, into msa_attention;
    doc_rope then finds q and k rotated by position_ids."""
    from longctx_compile.errors import LccError
    from longctx_compile.forms.msa.rewrite import MsaConfig

    cfg = MsaConfig(routed_layers="all")
    got = run(canonical_program(), "msa", cfg)
    notes = PASSES["doc_rope"].fn(got, cfg).notes

    def expected(q, k, v, x, block):
        router = [F.linear(x, getattr(block.added, f"router_{side}_proj_weight")) for side in "qk"]
        return L.msa_attention(q, k, v, None, None, None, SCALE, True, 0, *router)

    assert structure(got) == structure(program_of(expected, {f"router_{side}_proj.weight": (HQ * D, WIDTH) for side in "qk"}))
    assert got.attention_nodes()[0].meta["lcc"]["doc_rope"] and got.signature["exact"] is False  # pool 64 by default
    assert got.ep.state_dict["layers.0.router_q_proj.weight"].shape == (HQ * D, WIDTH)
    # this model's rotation is not HF's rotate_half: auto keeps the paper's positions, and contiguous is refused
    assert got.signature["msa"]["positions"] == "global" and notes[1] == "positions=global (lcc cannot move this model's keys)"
    cfg = MsaConfig(routed_layers="all", positions="contiguous")
    with pytest.raises(LccError, match="positions=contiguous moves each document's keys by the model's own rotation"):
        run(run(canonical_program(), "msa", cfg), "doc_rope", cfg)


def test_doc_rope_refuses_positions_the_model_makes_itself():
    from longctx_compile.errors import LccError
    from longctx_compile.forms.msa.rewrite import MsaConfig

    program = run(program_of(sdpa_causal, own_positions=True), "canonicalize", CanonicalizeConfig())
    cfg = MsaConfig(routed_layers="all")
    with pytest.raises(LccError, match="its q does not depend on position_ids"):
        run(run(program, "msa", cfg), "doc_rope", cfg)


def test_evict():
    """An eviction indexer (over q as attention reads it, with no rotary to look behind, and the layer's input) and
    its three outputs, and the latent memory's parameters (on by default), into evict_attention."""
    from longctx_compile.forms.evict.rewrite import EvictConfig

    got = run(canonical_program(), "evict", EvictConfig())
    names = [f"indexer.{n}.weight" for n in ("q_proj", "q_norm", "k_proj", "k_norm", "gate_proj")]
    names += ["memory.phi.weight", "memory.gate.weight", "memory.gate.bias", "memory.decay", "memory.strength"]
    shapes = {n: tuple(got.ep.state_dict[f"layers.0.{n}"].shape) for n in names}
    assert shapes["indexer.q_proj.weight"] == (2 * 8, HQ * D) and shapes["indexer.k_proj.weight"] == (8, WIDTH)  # 2 heads of 8

    def expected(q, k, v, x, block):
        weights = [getattr(block.added, n.replace(".", "_")) for n in names]
        idx_q, idx_k, idx_w = L.evict_indexer(q, x, *weights[:5])
        return L.evict_attention(q, k, v, None, None, None, SCALE, True, 0, idx_q, idx_k, idx_w, *weights[5:])

    assert structure(got) == structure(program_of(expected, shapes))
    assert got.signature["evict"]["layers"] == [0] and got.signature["exact"] is False
