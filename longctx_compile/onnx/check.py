"""Does an exported model compute what the artifact computes? onnxruntime against the PyTorch program, same inputs.

The reference is the artifact's own ``model.pt2`` run by PyTorch with its longctx ops' reference
implementations (a lowered kernel runs as the op it implements: the kernels are checked against those
elsewhere, and a Triton kernel on a CPU would run in the interpreter), and for an ``evict`` model the
streaming ``ops.evict.indexer_importance`` of each evicting site: independent of the portable forms the
ONNX graph was built from.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from .. import artifact
from ..errors import LccError


def default_lengths(manifest: dict[str, Any]) -> tuple[int, int]:
    """Two sequence lengths that exercise the form: for hsa, past the local window so chunks are retrieved."""
    cap = int(manifest["signature"].get("max_len", 512))
    config = manifest.get("form_config", {}) or {}
    if manifest["form"] == "hsa":
        chunk, window = int(config.get("chunk", 64)), int(config.get("window", 4))
        long = chunk * (window + 3) + chunk // 2 + 1
        return min(cap, max(3, long // 3)), min(cap, long)
    return min(cap, 7), min(cap, 19)


def inputs(manifest: dict[str, Any], batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Random ids, an attention mask with the last row left-padded, and positions counted over real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(manifest["signature"].get("vocab_size", 2)), (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[-1, : length // 3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    values = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    return {name: values[name] for name in manifest["signature"]["inputs"]}


def model_program(path: Path, manifest: dict[str, Any]) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecations, raised while unpickling the program
        return artifact.read_program(path, manifest, "model")


def reference(ep: torch.export.ExportedProgram, manifest: dict[str, Any], feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The artifact's outputs in PyTorch (``ep``: its :func:`model_program`): logits, then (evict) each evicting site's indexer importance."""
    from ..ops.evict import indexer_importance
    from ..runtime.interpret import flat_inputs, logits_index, step_state, with_site_hooks
    from .translate import KERNELS

    scores: list[torch.Tensor] = []
    evict = torch.ops.longctx.evict_attention.default
    per_head = manifest["signature"].get("evict", {}).get("granularity") != "layer"

    def site(i, call):
        if call.op is evict:
            groups = int(call.k.shape[1]) if per_head else 1
            scores.append(indexer_importance(call.idx_q, call.idx_k, call.idx_w, groups, query_real=call.key_padding, need_arg=False)[0])
        if call.op in KERNELS:  # the op the kernel implements; its saved state (read by no inference graph) is NaN
            op, _, state = KERNELS[call.op]
            out = call.to(op)()
            B, H, T, _ = call.q.shape
            return out, *(torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype) for shape, dtype in state(B, H, T))
        return call()

    with torch.no_grad():
        outs = with_site_hooks(ep.graph_module, site)(*flat_inputs(ep, list(feed), step_state(ep), feed))
    return [outs[logits_index(ep)], *scores]


def compare(path: Path, onnx_file: Path, lengths: tuple[int, ...] | None = None, batch: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """For each length: onnxruntime's outputs of ``onnx_file`` against :func:`reference`, ``torch.testing.assert_close``'s fp32 tolerance."""
    import onnxruntime

    path, onnx_file = Path(path), Path(onnx_file)
    manifest = artifact.read_manifest(path)
    try:
        session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise LccError(f"onnxruntime cannot load '{onnx_file}': {str(e).splitlines()[0][:300]}") from None
    names = [i.name for i in session.get_inputs()]
    if names != list(manifest["signature"]["inputs"]):
        raise LccError(f"'{onnx_file}' takes {names}, not the model program's inputs {manifest['signature']['inputs']}: compare checks model programs")
    rows, ep = [], model_program(path, manifest)
    for length in lengths or default_lengths(manifest):
        feed = inputs(manifest, batch, length, seed)
        got = session.run(None, {k: v.numpy() for k, v in feed.items()})
        want = reference(ep, manifest, feed)
        if len(got) != len(want):
            raise LccError(f"'{onnx_file}' returns {len(got)} outputs; the artifact's model program {len(want)}: was it exported from this artifact?")
        for out, a, b in zip(session.get_outputs(), got, want, strict=True):
            a = torch.from_numpy(a)
            finite = torch.isfinite(b)
            diff = (a - b).abs()[finite].max().item() if finite.any() else 0.0
            try:
                torch.testing.assert_close(a, b)
                ok = True
            except AssertionError:
                ok = False
            rows.append({"length": length, "output": out.name, "shape": list(a.shape), "max_abs_diff": diff, "ok": ok})
    return rows
