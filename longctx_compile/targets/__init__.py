"""Targets: what a program is lowered for. A target is data; kernel configs are derived from it.

``cpu`` keeps the plain-torch reference ops; ``interpret`` runs the Triton kernels under Triton's
interpreter (CPU tensors, for tests); the GPUs run them compiled. Figures are the vendors' published
dense (non-sparse) rates and capacities; ``source`` names where they come from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LccError


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    kernels: str  # "reference" | "triton"
    capability: tuple[int, int] | None = None
    sms: int = 0
    smem_per_block: int = 0  # bytes, the opt-in maximum one program may use
    smem_per_sm: int = 0  # bytes
    l2_mb: float = 0.0
    memory_gb: float = 0.0
    bandwidth_gbs: float = 0.0
    tflops: dict[str, float] = field(default_factory=dict)  # dense peak by dtype: bf16, fp16, fp8
    features: tuple[str, ...] = ()
    source: str = ""

    @property
    def arch(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}" if self.capability else ""

    def peak_tflops(self, dtype: str) -> float | None:
        return self.tflops.get(dtype)


def _register() -> dict[str, Target]:
    from .gpus import GPUS

    # the interpreter has no hardware limit; it gets an SM86-sized budget so that configs chosen for
    # it are as constrained as the smallest GPU's
    interpret = Target(
        "interpret",
        "Triton kernels under Triton's interpreter on CPU tensors (slow; for tests)",
        "triton",
        smem_per_block=101376,
        smem_per_sm=102400,
        sms=1,
    )
    cpu = Target("cpu", "plain-torch reference ops on any device (the semantics every kernel is tested against)", "reference")
    return {"cpu": cpu, "interpret": interpret, **{g.name: g for g in GPUS}}


TARGETS: dict[str, Target] = _register()
ALIASES = {"a100": "a100-80gb", "h100-sxm": "h100", "4090": "rtx4090", "rtx-4090": "rtx4090"}


def get_target(name: str) -> Target:
    """The target called ``name`` (or an alias), or a one-line error listing the known ones."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TARGETS:
        raise LccError(f"unknown target '{name}'; known targets: {', '.join(TARGETS)}")
    return TARGETS[key]


# substrings of torch.cuda.get_device_name() that identify a target, most specific first
_DEVICE_NAMES = (("H200", "h200"), ("H100", "h100"), ("A800", "a800"), ("L40S", "l40s"), ("4090", "rtx4090"), ("B200", "b200"))


def detect(device: int | None = None) -> Target | None:
    """The target describing the CUDA GPU at hand (by name, A100 by memory size), or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for needle, target in _DEVICE_NAMES:
        if needle in name:
            return TARGETS[target]
    if "A100" in name:
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        return TARGETS["a100-80gb" if memory > 48 else "a100-40gb"]
    return None
