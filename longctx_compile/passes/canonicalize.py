"""``canonicalize``: every attention site becomes one ``longctx::attention`` node (DESIGN §2).

Two matchers, both anchored on the node where attention is unambiguous:
* ``sdpa``  — ``aten.scaled_dot_product_attention`` in any argument form;
* ``eager`` — a last-dim softmax over ``matmul(q, kᵀ)`` scores, through scale, mask (add / masked_fill
  / where), casts and dropout, into ``matmul(probs, v)``.
For both, ``repeat_kv`` chains on k/v are folded (GQA stays un-repeated), the mask is classified by
``passes.masks`` and the dense mask computation becomes dead code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import RefusedError
from ..fx import ASSERTS, CASTS, CLONES, RESHAPES, aten, call_args, eliminate_dead_code, fake_call, is_call, strip, val
from ..pipeline import PassResult, Program, Stage, register
from ..snapshot import layer_of, module_path
from .masks import ADD, FILL, KEEP, MaskSpec, SubgraphEvaluator, classify

IDENTITY_SLICE_END = 2**62
# a scalar scale on the scores; the in-place forms act on a fresh matmul result (checked: single use)
SCALES = (aten.mul.Tensor, aten.div.Tensor, aten.mul_.Tensor, aten.div_.Tensor)


@dataclass
class CanonicalizeConfig:
    """``allow_arbitrary_masks``: keep unclassifiable masks as tensors (else refuse the model)."""

    allow_arbitrary_masks: bool = True


@dataclass
class Site:
    """An attention site found in the graph, before it is rewritten."""

    anchor: torch.fx.Node
    out: torch.fx.Node
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    scale: float
    is_causal: bool
    masks: list[tuple[torch.fx.Node, str]] = field(default_factory=list)
    matcher: str = ""


def _describe(node: torch.fx.Node) -> str:
    path = module_path(node)
    return f"'{path}' (node {node.name})" if path else f"node {node.name}"


def _refuse(node: torch.fx.Node, why: str) -> RefusedError:
    return RefusedError(f"cannot canonicalize attention at {_describe(node)}: {why}")


def _scalar(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _is_identity_slice(node: torch.fx.Node) -> bool:
    if not is_call(node, aten.slice.Tensor):
        return False
    args = call_args(node)
    return args.get("start") in (None, 0) and (args.get("end") is None or args.get("end") >= IDENTITY_SLICE_END) and args.get("step", 1) == 1


def unrepeat_kv(node: torch.fx.Node) -> tuple[torch.fx.Node, int]:
    """Fold ``repeat_kv`` (unsqueeze→expand→reshape, or repeat_interleave on heads): (kv, group size)."""
    if is_call(node, aten.repeat_interleave.self_int):
        args = call_args(node)
        if args.get("dim") == 1 and isinstance(args.get("repeats"), int):
            return node.args[0], args["repeats"]
    if not is_call(node, *RESHAPES):
        return node, 1
    expand = strip(node.args[0], CLONES)
    if not is_call(expand, aten.expand.default):
        return node, 1
    src = expand.args[0]
    while _is_identity_slice(src):
        src = src.args[0]
    if not (is_call(src, aten.unsqueeze.default) and src.args[1] == 2):
        return node, 1
    base = src.args[0]
    while _is_identity_slice(base):
        base = base.args[0]
    b, out, e = val(base), val(node), val(expand)
    if b is None or out is None or e is None or b.dim() != 4 or e.dim() != 5 or out.dim() != 4:
        return node, 1
    heads, groups = b.shape[1], e.shape[2]
    if not (isinstance(heads, int) and isinstance(groups, int)) or out.shape[1] != heads * groups:
        return node, 1
    return base, groups


def match_sdpa(node: torch.fx.Node) -> Site:
    args = call_args(node)
    if _scalar(args.get("dropout_p")) not in (0.0, None):
        raise _refuse(node, f"dropout_p={args['dropout_p']} (capture in eval mode)")
    q, k, v = args["query"], args["key"], args["value"]
    if val(q) is None or val(q).dim() != 4:
        raise _refuse(node, "query is not [batch, heads, seq, dim]")
    scale = args.get("scale")
    scale = 1.0 / math.sqrt(val(q).shape[-1]) if scale is None else float(scale)
    mask = args.get("attn_mask")
    masks = []
    if mask is not None:
        masks.append((mask, KEEP if val(mask).dtype == torch.bool else ADD))
    return Site(node, node, q, k, v, scale, bool(args.get("is_causal")), masks, "sdpa")


def _scores_matmul(node, depth: int = 0) -> torch.fx.Node | None:
    """The ``matmul(q, kᵀ)`` a softmax input comes from, if any (through scale, mask and casts)."""
    if not isinstance(node, torch.fx.Node) or depth > 16:
        return None
    if is_call(node, aten.matmul.default):
        return node
    if is_call(node, *CASTS, *SCALES, aten.masked_fill.Scalar):
        return _scores_matmul(node.args[0], depth + 1)
    if is_call(node, aten.add.Tensor):
        return _scores_matmul(node.args[0], depth + 1) or _scores_matmul(node.args[1], depth + 1)
    if is_call(node, aten.where.ScalarOther):
        return _scores_matmul(node.args[1], depth + 1)
    return None


def _looks_like_attention(softmax: torch.fx.Node) -> bool:
    """A 4-D softmax with a matmul a few ops above it and one below: attention, matched or refused."""
    above, frontier = False, [softmax.args[0]]
    for _ in range(8):
        if any(is_call(n, aten.matmul.default) for n in frontier):
            above = True
            break
        frontier = [a for n in frontier for a in n.all_input_nodes if val(a) is not None and getattr(val(a), "dim", lambda: 0)() == 4]
    below, frontier = False, [softmax]
    for _ in range(4):
        if any(is_call(n, aten.matmul.default) for n in frontier if n is not softmax):
            below = True
            break
        frontier = [u for n in frontier for u in n.users]
    return above and below


def _live_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [u for u in node.users if not is_call(u, *ASSERTS)]


def match_eager(softmax: torch.fx.Node) -> Site | None:
    """Match ``matmul(q,kᵀ) → scale → mask → softmax → dropout → matmul(·, v)``; None if not attention."""
    x = softmax.args[0]
    if val(x) is None or val(x).dim() != 4 or softmax.args[1] not in (-1, 3):
        return None
    if not _looks_like_attention(softmax):
        return None
    scale, masks = 1.0, []
    while not is_call(x, aten.matmul.default):
        if is_call(x, *CASTS):
            x = x.args[0]
        elif is_call(x, *SCALES) and _scalar(x.args[1]) is not None:
            if len(_live_users(x.args[0])) != 1:
                raise _refuse(softmax, "the attention scores are used elsewhere")
            c = _scalar(x.args[1])
            scale = scale * c if is_call(x, aten.mul.Tensor, aten.mul_.Tensor) else scale / c
            x = x.args[0]
        elif is_call(x, aten.add.Tensor):
            a, b = x.args[0], x.args[1]
            if _scores_matmul(a) is not None and isinstance(b, torch.fx.Node):
                masks.append((b, ADD))
                x = a
            elif _scores_matmul(b) is not None and isinstance(a, torch.fx.Node):
                masks.append((a, ADD))
                x = b
            else:
                raise _refuse(softmax, "scores are added to something that is not a mask")
        elif is_call(x, aten.masked_fill.Scalar) and (_scalar(x.args[2]) or 0.0) < -1e4:
            masks.append((x.args[1], FILL))
            x = x.args[0]
        elif is_call(x, aten.where.ScalarOther) and (_scalar(x.args[2]) or 0.0) < -1e4:
            masks.append((x.args[0], KEEP))
            x = x.args[1]
        else:
            what = x.target if isinstance(x, torch.fx.Node) else x
            raise _refuse(softmax, f"unsupported operation on the attention scores: {what}")
    q, kt = x.args[0], x.args[1]
    q = strip(q, CASTS)
    if is_call(kt, aten.transpose.int) and sorted(a % 4 for a in kt.args[1:3]) == [2, 3]:
        k = strip(kt.args[0], CASTS)
    elif is_call(kt, aten.permute.default) and list(kt.args[1]) == [0, 1, 3, 2]:
        k = strip(kt.args[0], CASTS)
    else:
        raise _refuse(softmax, "keys are not transposed [batch, heads, dim, seq]")
    probs = softmax
    while len(_live_users(probs)) == 1:
        user = _live_users(probs)[0]
        if is_call(user, *CASTS):
            probs = user
        elif is_call(user, aten.dropout.default) and (call_args(user)["p"] == 0 or not call_args(user)["train"]):
            probs = user
        else:
            break
    live = _live_users(probs)
    if len(live) != 1 or not is_call(live[0], aten.matmul.default) or live[0].args[0] is not probs:
        raise _refuse(softmax, "attention probabilities are used other than by one matmul with the values")
    out = live[0]
    v = strip(out.args[1], CASTS)
    return Site(softmax, out, q, k, v, scale, False, masks, "eager")


def find_sites(gm: torch.fx.GraphModule) -> list[Site]:
    sites = []
    for node in gm.graph.nodes:
        if is_call(node, aten.scaled_dot_product_attention.default):
            sites.append(match_sdpa(node))
        elif is_call(node, aten.softmax.int, aten._softmax.default):
            site = match_eager(node)
            if site is not None:
                sites.append(site)
    return sites


def _heads(site: Site, k: torch.fx.Node, v: torch.fx.Node) -> tuple[int, int, int]:
    qv, kv, vv = val(site.q), val(k), val(v)
    if any(t is None or t.dim() != 4 for t in (qv, kv, vv)):
        raise _refuse(site.anchor, "q, k and v must be [batch, heads, seq, dim]")
    hq, hkv, d = qv.shape[1], kv.shape[1], qv.shape[3]
    if not all(isinstance(x, int) for x in (hq, hkv, d)):
        raise _refuse(site.anchor, "head counts and head dim must be static")
    if hq % hkv:
        raise _refuse(site.anchor, f"{hq} query heads are not a multiple of {hkv} key/value heads")
    return hq, hkv, d


def _input(program: Program, name: str) -> torch.fx.Node | None:
    return next((n for n in program.gm.graph.nodes if n.op == "placeholder" and n.name == name), None)


@register("canonicalize", Stage.CANONICALIZE, CanonicalizeConfig)
def canonicalize(program: Program, cfg: CanonicalizeConfig) -> PassResult:
    """Rewrite every SDPA / eager softmax attention into one longctx::attention with a classified mask."""
    graph = program.gm.graph
    sites = find_sites(program.gm)
    if not sites:
        raise RefusedError("found no attention in the model (neither scaled_dot_product_attention nor a softmax over q·kᵀ)")
    names = tuple(program.signature["inputs"])
    evaluator = SubgraphEvaluator(program.ep)
    doc_node = None
    notes = []
    for index, site in enumerate(sites):
        k, gk = unrepeat_kv(site.k)
        v, gv = unrepeat_kv(site.v)
        if gk != gv:
            k, v = site.k, site.v
        hq, hkv, d = _heads(site, k, v)
        spec: MaskSpec = classify(program.ep, site.masks, site.is_causal, names, program.signature["max_len"], program.model_config, evaluator)
        if spec.arbitrary and not cfg.allow_arbitrary_masks:
            raise _refuse(site.anchor, f"its mask is not a structured kind ({'; '.join(spec.notes)})")
        mask_arg = None
        if spec.arbitrary:
            mask_arg = site.masks[0][0] if len(site.masks) == 1 and site.masks[0][1] in (KEEP, ADD) else None
            if mask_arg is None:
                raise _refuse(site.anchor, "a mask of several parts that is not a structured kind")
            spec.causal = site.is_causal
        key_padding = _input(program, "attention_mask") if spec.padding else None
        if spec.documents and doc_node is None:
            pos = _input(program, "position_ids")
            first = next(n for n in graph.nodes if n.op != "placeholder")
            with graph.inserting_before(first):
                doc_node = graph.call_function(torch.ops.longctx.doc_ids.default, (pos,))
            doc_node.meta["val"] = fake_call(torch.ops.longctx.doc_ids.default, pos)
        docs = doc_node if spec.documents else None
        args = (site.q, k, v, key_padding, docs, mask_arg, float(site.scale), bool(spec.causal), int(spec.window))
        with graph.inserting_before(site.out):
            node = graph.call_function(torch.ops.longctx.attention.default, args)
        node.meta["val"] = fake_call(torch.ops.longctx.attention.default, *args)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn"):
            if key in site.anchor.meta:
                node.meta[key] = site.anchor.meta[key]
        node.meta["lcc_from"] = [site.anchor.name, site.out.name]
        path = module_path(site.anchor)
        node.meta["lcc"] = {
            "site": index,
            "layer": layer_of(path) if layer_of(path) is not None else index,
            "module": path,
            "matched": site.matcher,
            "hq": hq,
            "hkv": hkv,
            "head_dim": d,
            "scale": float(site.scale),
            "mask": spec.kind,
            "window": spec.window,
            "mask_notes": spec.notes,
            "form": "dense",
            "q": site.q.name,
            "k": k.name,
            "v": v.name,
        }
        if spec.arbitrary:
            notes.append(f"site {index} ({path}): arbitrary mask kept as a tensor: {'; '.join(spec.notes)}")
        site.out.replace_all_uses_with(node)
    eliminate_dead_code(program.gm)
    return PassResult(matches=len(sites), notes=notes)
