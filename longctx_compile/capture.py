"""Model sources (HF folder, preset, ``file.py:factory``, ``nn.Module``) and their capture with torch.export."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import inspect
import io
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import presets
from .errors import LccError, RefusedError


@dataclass
class CaptureConfig:
    """How a model is loaded and exported.

    ``attention_mask`` / ``position_ids``: include that input in the program (None: when the model's
    forward takes it). ``max_len``: upper bound of the dynamic sequence dimension (None: the model's
    ``max_position_embeddings``, capped at 8192). ``attn``: HF attention implementation to load with.
    ``dtype``: the weights' and activations' dtype, ``auto`` keeping the checkpoint's (fp32 for a GGUF file,
    whose quantised tensors are dequantised).
    """

    attn: str = "sdpa"
    max_len: int | None = None
    attention_mask: bool | None = None
    position_ids: bool | None = None
    trust_remote_code: bool = False
    dtype: str = "auto"

    def check(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise LccError(f"dtype must be one of auto, {', '.join(DTYPES)}; got '{self.dtype}'")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32`` | ``bf16`` | ``fp16`` for a torch dtype lcc runs in."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def dtype_of(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype most of the model's parameters hold (fp32 when it has none)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


@dataclass
class ModelSource:
    """Where a model came from, recorded in the manifest so ``lcc verify ARTIFACT`` can rebuild it."""

    kind: str  # "preset" | "hf_folder" | "factory" | "module"
    spec: str
    family: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_model(spec: Any, cfg: CaptureConfig | None = None) -> tuple[torch.nn.Module, ModelSource]:
    """Resolve a model spec into an eval-mode module, in the dtype ``cfg.dtype`` asks, and a description of its source."""
    cfg = cfg or CaptureConfig()
    cfg.check()
    model, source = _load(spec, cfg)
    dtype = dtype_of(model)
    if cfg.dtype != "auto" and dtype != DTYPES[cfg.dtype]:
        # a module the caller holds is copied, never cast in place
        model = (copy.deepcopy(model) if source.kind == "module" else model).to(DTYPES[cfg.dtype])
    elif dtype not in DTYPES.values():
        raise LccError(f"the model's weights are {str(dtype).removeprefix('torch.')}; lcc runs fp32, bf16 or fp16: pass --dtype")
    return model, source


def _load(spec: Any, cfg: CaptureConfig) -> tuple[torch.nn.Module, ModelSource]:
    if cfg.attn not in ("sdpa", "eager"):
        raise LccError(f"attn must be 'sdpa' or 'eager', got '{cfg.attn}'")
    if isinstance(spec, torch.nn.Module):
        return spec.eval(), ModelSource("module", type(spec).__name__, _family(spec))
    if not isinstance(spec, (str, os.PathLike)):
        raise LccError(f"a model is a path, a preset name, 'file.py:factory' or an nn.Module, not {type(spec).__name__}")
    text = str(spec)
    if text in presets.PRESETS:
        model = presets.build_preset(text, cfg.attn)
        return model, ModelSource("preset", text, presets.PRESETS[text], _config_dict(model))
    path, _, factory = text.rpartition(":")
    if factory and path.endswith(".py"):
        model = _from_factory(Path(path), factory)
        return model, ModelSource("factory", str(Path(path).resolve()) + ":" + factory, _family(model))
    if Path(text).is_dir():
        model = _from_hf_folder(Path(text), cfg)
        return model, ModelSource("hf_folder", str(Path(text).resolve()), _family(model), _config_dict(model))
    if Path(text).is_file() and text.lower().endswith(".gguf"):
        model = _from_gguf(Path(text), cfg)
        return model, ModelSource("gguf", str(Path(text).resolve()), _family(model), _config_dict(model))
    if Path(text).exists():
        raise LccError(f"'{text}' is a file; a model is a Hugging Face folder, a .gguf file, a preset or 'file.py:factory'")
    if text.startswith("tiny-"):
        raise LccError(f"unknown preset '{text}'; known presets: {', '.join(sorted(presets.PRESETS))}")
    raise LccError(f"no such model: '{text}' is not a folder, a preset ({', '.join(sorted(presets.PRESETS))}) or 'file.py:factory'")


def _family(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _config_dict(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return config.to_diff_dict() if config is not None and hasattr(config, "to_diff_dict") else {}


def _from_factory(path: Path, factory: str) -> torch.nn.Module:
    if not path.is_file():
        raise LccError(f"no such file: '{path}'")
    name = f"_lcc_factory_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: report its failure in one line
        raise LccError(f"could not import '{path}': {type(e).__name__}: {e}") from e
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise LccError(f"'{path}' has no callable '{factory}'")
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise LccError(f"'{path}:{factory}' returned {type(model).__name__}, not an nn.Module")
    return model.eval()


def _from_hf_folder(path: Path, cfg: CaptureConfig) -> torch.nn.Module:
    if not (path / "config.json").is_file():
        from .artifact import GRAPHS, PROGRAM

        if (path / PROGRAM).is_file() or (path / GRAPHS).is_file():
            raise LccError(f"'{path}' is an lcc artifact without its manifest (lcc.json): re-convert the model, or restore the file")
        raise LccError(f"'{path}' has no config.json: not a Hugging Face model folder")
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise LccError(f"'{path}' runs its own model code; to allow it, pass --opt trust_remote_code=true") from None
        raise LccError(f"cannot read '{path / 'config.json'}': {str(e).splitlines()[0]}") from e
    if getattr(config, "is_encoder_decoder", False):
        raise LccError(f"'{path}' is an encoder-decoder model ({config.model_type}); lcc converts decoder language models")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            local_files_only=True,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn,
            dtype="auto" if cfg.dtype == "auto" else DTYPES[cfg.dtype],
            output_loading_info=True,
        )
    except ValueError as e:
        if cfg.attn == "sdpa" and "scaled_dot_product_attention" in str(e):
            raise LccError(f"'{path}': the model's code does not support sdpa attention; convert with --opt attn=eager") from None
        raise LccError(f"'{path}' is not a decoder language model: {str(e).splitlines()[0]}") from e
    except Exception as e:
        raise LccError(f"cannot load '{path}': {type(e).__name__}: {str(e).splitlines()[0]}") from e
    missing = sorted(info.get("missing_keys", ()))
    if missing:  # e.g. an encoder's or a base model's checkpoint: the LM head would be random
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise LccError(f"'{path}' lacks weights its {type(model).__name__} needs ({shown}): they would be initialised at random")
    return model.eval()


def _from_gguf(path: Path, cfg: CaptureConfig) -> torch.nn.Module:
    """A GGUF file through transformers (``gguf_file=``): its tensors dequantised to fp32, its config from its metadata."""
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loading needs both)
        import gguf  # noqa: F401
    except ImportError as e:
        raise LccError(f"reading a .gguf file needs the {e.name} package: pip install 'longctx-compile[gguf]'") from None
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, local_files_only=True, attn_implementation=cfg.attn, dtype=DTYPES.get(cfg.dtype, torch.float32)
        )
    except Exception as e:
        raise LccError(f"cannot load '{path}' as a GGUF model: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return model.eval()


class CausalLM(torch.nn.Module):
    """Wraps any decoder so the program maps (input_ids[, attention_mask][, position_ids]) to logits."""

    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.is_hf = hasattr(model, "config") and hasattr(model.config, "model_type")

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        kwargs = {"use_cache": False} if self.is_hf else {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = self.model(input_ids, **kwargs)
        if hasattr(out, "logits"):
            return out.logits
        if isinstance(out, (tuple, list)):
            return out[0]
        return out


def program_inputs(model: torch.nn.Module, cfg: CaptureConfig) -> tuple[str, ...]:
    """The inputs the program takes: input_ids plus the optional ones the model accepts."""
    params = inspect.signature(model.forward).parameters
    names = ["input_ids"]
    for name in ("attention_mask", "position_ids"):
        wanted = getattr(cfg, name)
        accepts = name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        if wanted and not accepts:
            raise LccError(f"{type(model).__name__}.forward takes no '{name}' input")
        if wanted or (wanted is None and name in params):
            names.append(name)
    return tuple(names)


def max_len_of(model: torch.nn.Module, cfg: CaptureConfig) -> int:
    """The bound of the dynamic sequence dimension."""
    if cfg.max_len is not None:
        if cfg.max_len < 2:
            raise LccError(f"max_len must be at least 2, got {cfg.max_len}")
        return cfg.max_len
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None) or getattr(model, "block_size", None)
    return int(min(n or 8192, 8192))


def example_inputs(names: tuple[str, ...], vocab: int, batch: int, length: int, device="cpu") -> dict[str, torch.Tensor]:
    """Seeded inputs in the program's input order (no padding, positions 0..T-1)."""
    g = torch.Generator().manual_seed(1234)
    out = {"input_ids": torch.randint(0, vocab, (batch, length), generator=g)}
    if "attention_mask" in names:
        out["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
    if "position_ids" in names:
        out["position_ids"] = torch.arange(length).expand(batch, length).contiguous()
    return {k: v.to(device) for k, v in out.items()}


def vocab_size_of(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or getattr(model, "vocab_size", None)
    if vocab is None:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = emb.num_embeddings if emb is not None else None
    if vocab is None:
        embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        vocab = embeddings[0].num_embeddings if embeddings else None
    if vocab is None:
        raise LccError(f"{type(model).__name__} has no token embedding: not a decoder language model")
    return int(vocab)


def export(model: torch.nn.Module, cfg: CaptureConfig | None = None) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """Export ``model`` with dynamic batch and sequence; returns the program and its signature."""
    cfg = cfg or CaptureConfig()
    names = program_inputs(model, cfg)
    max_len = max_len_of(model, cfg)
    vocab = vocab_size_of(model)
    example_len = min(16, max_len)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = example_inputs(names, vocab, 2, example_len, device)
    wrapper = CausalLM(model, names)
    notes: list[str] = []
    try:
        ep = _export(model, wrapper, example, names, max_len)
    except _ConstraintViolation:
        # a buffer of exactly max_len positions sliced to [:T] specialises T == max_len away
        ep = _export(model, wrapper, example, names, max_len - 1)
        notes.append(f"max_len lowered from {max_len} to {max_len - 1}: the model does not trace at length {max_len}")
        max_len -= 1
    out = ep.graph_module.graph.output_node().args[0][0].meta.get("val")
    if out is None or out.dim() != 3:
        shape = None if out is None else list(out.shape)
        raise LccError(f"{type(model).__name__} is not a decoder language model: output shape {shape}, expected [batch, seq, vocab]")
    signature = {
        "inputs": list(names),
        "outputs": ["logits"],
        "max_len": max_len,
        "vocab_size": vocab,
        "dtype": dtype_name(dtype_of(model)),
        "notes": notes,
        "new_parameters": [],
    }
    return ep, signature


class _ConstraintViolation(Exception):
    """torch.export could not keep the whole requested sequence range dynamic."""


def _export(model, wrapper, example, names, max_len) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=max_len)
    dynamic = {name: {0: batch, 1: seq} for name in names}
    with torch.no_grad(), _module_stack(model) as stack, _quiet_torch_logs():
        try:
            return torch.export.export(wrapper, (), kwargs=example, dynamic_shapes=dynamic, strict=False)
        except Exception as e:
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            if "Constraints violated (seq)" in first and "seq <= " in str(e) and f"!= {max_len}" in str(e):
                raise _ConstraintViolation(first) from e
            where = f" in module '{stack[-1]}'" if stack else ""
            raise RefusedError(f"cannot capture {type(model).__name__} with torch.export{where}: {first[:300]}") from e


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs guards and graph dumps on failure; lcc reports one line of its own instead."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


class _module_stack:
    """Records which submodule is running, so a capture failure can name the module it happened in."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.stack: list[str] = []
        self.handles = []

    def __enter__(self) -> list[str]:
        for name, module in self.model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._push(name)))
            self.handles.append(module.register_forward_hook(self._pop))
        return self.stack

    def _push(self, name: str):
        def hook(module, args):
            self.stack.append(f"{name} ({type(module).__name__})" if name else f"{type(module).__name__} (the model itself)")

        return hook

    def _pop(self, module, args, output):
        if self.stack:
            self.stack.pop()

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
