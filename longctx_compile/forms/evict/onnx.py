"""The evict model program for ONNX: re-exported to also return each evicting layer's indexer importance."""

from __future__ import annotations

from typing import Any

import torch

from ...errors import LccError
from ...ops.schema import Call
from ...runtime.interpret import attention_sites, flat_inputs, logits_index, step_state, with_site_hooks


def with_importance(ep: torch.export.ExportedProgram, manifest: dict[str, Any]) -> tuple[torch.export.ExportedProgram, list[int]]:
    """The evict model program re-exported so that it also returns the indexer importance [B, groups, S] of each evicting site."""
    signature = manifest["signature"]
    evict = torch.ops.longctx.evict_attention.default
    sites = attention_sites(ep)
    layers = [int(n.meta.get("lcc", {}).get("layer", i)) for i, n in enumerate(sites) if n.target is evict]
    per_head = signature["evict"].get("granularity") != "layer"
    groups = {i: int(Call.of(n).k.meta["val"].shape[1]) if per_head else 1 for i, n in enumerate(sites)}

    scores: list[torch.Tensor] = []  # filled by the sites during one forward (not a module attribute: export would warn)

    class WithImportance(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.names = list(signature["inputs"])
            self.keys = list(step_state(ep))
            for i, value in enumerate(step_state(ep).values()):
                self.register_buffer(f"w{i}", value)
            self.graph, self.index = with_site_hooks(ep.graph_module, self.site), logits_index(ep)

        def site(self, i, call):
            if call.op is evict:
                scores.append(torch.ops.longctx.evict_importance(call.idx_q, call.idx_k, call.idx_w, call.key_padding, groups[i]))
            return call()

        def forward(self, input_ids, attention_mask, position_ids):
            state = {k: getattr(self, f"w{i}") for i, k in enumerate(self.keys)}
            scores.clear()
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
            logits = self.graph(*flat_inputs(ep, self.names, state, inputs))[self.index]
            return (logits, *scores)

    if signature["inputs"] != ["input_ids", "attention_mask", "position_ids"]:
        raise LccError(f"cannot export this evict program: it takes {signature['inputs']}, not (input_ids, attention_mask, position_ids)")
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("sequence", min=1, max=int(signature.get("max_len", 4096)))
    example = torch.zeros(2, 8, dtype=torch.long)
    dims = {name: {0: batch, 1: seq} for name in signature["inputs"]}
    with torch.no_grad():
        wrapped = torch.export.export(
            WithImportance(), (example, torch.ones_like(example), torch.arange(8).expand(2, 8).clone()), dynamic_shapes=dims, strict=False
        )
    return wrapped, layers
