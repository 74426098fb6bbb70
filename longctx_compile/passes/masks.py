"""Classify an attention mask by what it computes, not by how it is written.

The mask's subgraph (its ancestors, down to the program inputs) is evaluated on probe inputs built to
tell the kinds apart: several lengths (1 and odd ones), left and right padding, position resets
(packed documents) and lengths just past each candidate window. A structured kind is accepted only
if it reproduces the mask on every probe, at every query that is a real token (a padded query's
output is never read); otherwise the mask is ``arbitrary`` and stays a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..fx import ancestors
from ..ops.reference import allowed_mask, doc_ids_from_positions

# how a mask tensor acts on the scores
KEEP = "keep"  # bool, True = attend (sdpa attn_mask, where(cond, scores, -inf))
FILL = "fill"  # bool, True = masked (masked_fill(scores, cond, -inf))
ADD = "add"  # float, 0 = attend, very negative = masked

BASE_LENGTHS = (1, 2, 5, 13, 24)
MAX_PROBE = 4096
NEG_LIMIT = -1e4


@dataclass
class MaskSpec:
    """A classified mask: the structure the canonical op applies, or ``arbitrary``."""

    causal: bool = True
    window: int = 0
    documents: bool = False
    padding: bool = False
    arbitrary: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        if self.arbitrary:
            return "arbitrary"
        parts = ["causal" if self.causal else "full"]
        if self.window:
            parts.append(f"window({self.window})")
        if self.documents:
            parts.append("documents")
        if self.padding:
            parts.append("padding")
        return "+".join(parts)


class SubgraphEvaluator:
    """Evaluates chosen nodes of an exported program on concrete inputs, running only their ancestors."""

    def __init__(self, ep: torch.export.ExportedProgram):
        self.ep = ep
        sig = ep.graph_signature
        self.state = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
        self.values = {**ep.state_dict, **ep.constants}

    def run(self, roots: list[torch.fx.Node], inputs: dict[str, torch.Tensor]) -> list[Any]:
        needed = ancestors(roots)
        env: dict[torch.fx.Node, Any] = {}
        for node in self.ep.graph_module.graph.nodes:
            if node not in needed:
                continue
            if node.op == "placeholder":
                env[node] = inputs[node.name] if node.name in inputs else self.values[self.state[node.name]]
            elif node.op == "get_attr":
                env[node] = getattr(self.ep.graph_module, node.target)
            else:
                # probes run on the CPU whatever device the model was traced on (meta included)
                args = torch.fx.node.map_aggregate(torch.fx.node.map_arg(node.args, env.__getitem__), _on_cpu)
                kwargs = torch.fx.node.map_aggregate(torch.fx.node.map_arg(node.kwargs, env.__getitem__), _on_cpu)
                env[node] = node.target(*args, **kwargs)
        return [env[r] for r in roots]


def _on_cpu(value: Any) -> Any:
    return torch.device("cpu") if isinstance(value, torch.device) else value


def _allowed(value: torch.Tensor, how: str) -> torch.Tensor | None:
    """The boolean attend-matrix of a mask value, or None if it is not a pure mask (e.g. a bias)."""
    if how == KEEP:
        return value.bool() if value.dtype == torch.bool else None
    if how == FILL:
        return ~value.bool() if value.dtype == torch.bool else None
    if value.dtype == torch.bool:
        return None
    ok = value == 0
    if not bool((ok | (value < NEG_LIMIT)).all()):
        return None
    return ok


@dataclass
class Probe:
    """One batch of probe inputs and the facts the expected mask is built from."""

    length: int
    inputs: dict[str, torch.Tensor]
    key_padding: torch.Tensor  # [B, S] 1 = real token
    positions: torch.Tensor  # [B, S]


def _probe(length: int, names: tuple[str, ...], pad: bool, resets: bool) -> Probe:
    B, T = 3, length
    ids = torch.arange(B * T).reshape(B, T) % 7 + 3
    key_padding = torch.ones(B, T, dtype=torch.long)
    positions = torch.arange(T).expand(B, T).clone()
    if pad and T > 2:
        key_padding[1, : T // 3] = 0  # left padding
        key_padding[2, T - T // 4 :] = 0  # right padding
    if resets and T > 3:
        cut = T // 2
        positions[0, cut:] = torch.arange(T - cut)
        positions[2, T // 3 :] = torch.arange(T - T // 3)
    inputs = {"input_ids": ids}
    if "attention_mask" in names:
        inputs["attention_mask"] = key_padding
    if "position_ids" in names:
        inputs["position_ids"] = positions
    return Probe(T, inputs, key_padding if "attention_mask" in names else torch.ones(B, T, dtype=torch.long), positions)


def _expected(spec: MaskSpec, probe: Probe) -> torch.Tensor:
    T = probe.length
    docs = doc_ids_from_positions(probe.positions) if spec.documents else None
    pad = probe.key_padding if spec.padding else None
    return allowed_mask(T, T, causal=spec.causal, window=spec.window, key_padding=pad, doc_ids=docs)


def _agrees(actual: torch.Tensor, expected: torch.Tensor, probe: Probe) -> bool:
    """Equal at every real query row (padded queries are never read)."""
    rows = probe.key_padding.bool()[:, None, :, None]
    return bool(((actual == expected) | ~rows).all())


def _window_candidates(nodes: set[torch.fx.Node], model_config: Any) -> list[int]:
    """Integers the mask subgraph or the model config could use as a sliding window."""
    found: set[int] = set()
    flat: list[Any] = []
    for node in nodes:
        torch.fx.node.map_aggregate((node.args, node.kwargs), flat.append)
    found.update(int(a) for a in flat if isinstance(a, int) and not isinstance(a, bool) and 2 <= a <= MAX_PROBE)
    for name in ("sliding_window", "attention_window", "window_size"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            found.add(value)
    return sorted(found)


def classify(
    ep: torch.export.ExportedProgram,
    masks: list[tuple[torch.fx.Node, str]],
    is_causal: bool,
    input_names: tuple[str, ...],
    max_len: int,
    model_config: Any = None,
    evaluator: SubgraphEvaluator | None = None,
) -> MaskSpec:
    """Classify the combined effect of ``masks`` (each a node and how it acts) plus an ``is_causal`` flag."""
    if not masks:
        return MaskSpec(causal=is_causal)
    evaluator = evaluator or SubgraphEvaluator(ep)
    roots = [node for node, _ in masks]
    deps = ancestors(roots)
    dep_names = {n.name for n in deps if n.op == "placeholder"}

    def allowed(probe: Probe) -> torch.Tensor | None:
        out = None
        for value, (_, how) in zip(evaluator.run(roots, probe.inputs), masks, strict=True):
            if not isinstance(value, torch.Tensor):
                return None
            ok = _allowed(value, how)
            if ok is None:
                return None
            while ok.dim() < 4:
                ok = ok[None]
            ok = ok[..., -probe.length :, : probe.length]
            if ok.shape[-2:] != (probe.length, probe.length) or ok.shape[1] != 1 and bool((ok != ok[:, :1]).any()):
                return None
            ok = ok[:, :1]
            out = ok if out is None else out & ok
        if is_causal:
            out = out & allowed_mask(probe.length, probe.length, causal=True, window=0)
        return out

    spec = MaskSpec(
        padding="attention_mask" in input_names and "attention_mask" in dep_names,
        documents="position_ids" in input_names and "position_ids" in dep_names,
    )
    lengths = [n for n in BASE_LENGTHS if n <= max_len]
    try:
        base_len = lengths[-1]
        plain = _probe(base_len, input_names, pad=False, resets=False)
        base = allowed(plain)
        if base is None:
            return MaskSpec(arbitrary=True, notes=["mask is not a pure 0/-inf or boolean mask"])
        for causal, window in [(True, 0), (False, 0)] + [(True, w) for w in range(1, base_len)]:
            if _agrees(base, allowed_mask(base_len, base_len, causal=causal, window=window), plain):
                spec.causal, spec.window = causal, window
                break
        else:
            return MaskSpec(arbitrary=True, notes=["mask is neither causal, full nor a sliding window"])
        if spec.causal and not spec.window:
            for w in _window_candidates(deps, model_config):
                if w + 2 > max_len or w + 2 <= base_len:
                    continue
                probe = _probe(w + 2, input_names, pad=False, resets=False)
                if not _agrees(allowed(probe), allowed_mask(w + 2, w + 2, causal=True, window=0), probe):
                    spec.window = w
                    lengths.append(w + 2)
                    break
        if spec.padding:
            probe = _probe(base_len, input_names, pad=True, resets=False)
            spec.padding = _agrees(allowed(probe), _expected(spec, probe), probe)
        if spec.documents:
            probe = _probe(base_len, input_names, pad=False, resets=True)
            spec.documents = _agrees(allowed(probe), _expected(spec, probe), probe)
        for length in lengths + ([spec.window + 1, spec.window + 3] if spec.window and spec.window + 3 <= max_len else []):
            for pad, resets in ((False, False), (True, False), (False, True), (True, True)):
                probe = _probe(length, input_names, pad, resets)
                actual = allowed(probe)
                if actual is None or not _agrees(actual, _expected(spec, probe), probe):
                    what = f"length {length}" + (", padded" if pad else "") + (", position resets" if resets else "")
                    return MaskSpec(arbitrary=True, notes=[f"mask differs from {spec.kind} at {what}"])
    except (RuntimeError, KeyError, IndexError, TypeError) as e:
        return MaskSpec(arbitrary=True, notes=[f"mask could not be evaluated on probes: {str(e).splitlines()[0][:200]}"])
    spec.notes.append(f"verified on probes of lengths {sorted(set(lengths))}")
    return spec
