"""Launch a Triton kernel compiled for the GPU, or under Triton's interpreter when its tensors are on the CPU.

Triton picks the interpreter once per process, when ``TRITON_INTERPRET=1`` is set before kernels (its
own standard library included) are decorated. lcc never sets it: the choice is made per launch. A
launch on CPU tensors runs the kernel's Python function through Triton's ``InterpretedFunction``,
and while it runs, a call of another ``@triton.jit`` function (ours, or ``tl.max`` from Triton's
standard library) is interpreted too, as it would be under the variable. Outside such a launch a
jit function keeps Triton's own behaviour. With the variable set by the user, kernels are already
interpreted and launch as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_depth = 0  # interpreted launches running now (nested calls of jit functions are interpreted while > 0)
_jit_call = JITFunction.__call__


def _interpreted(kernel: JITFunction) -> InterpretedFunction:
    """The kernel's interpreted twin, kept on the kernel (hashing a JITFunction would parse its source again)."""
    twin = kernel.__dict__.get("_lcc_interpreted")
    if twin is None:
        twin = kernel.__dict__["_lcc_interpreted"] = InterpretedFunction(kernel.fn)
    return twin


def _call(self: JITFunction, *args: Any, **kwargs: Any) -> Any:
    """A jit function called from Python: interpreted inside an interpreted launch, else Triton's own answer."""
    if _depth:
        return _interpreted(self)(*args, **kwargs)
    return _jit_call(self, *args, **kwargs)


JITFunction.__call__ = _call


def on_cpu(*tensors: Any) -> bool:
    """Whether a launch over these arguments runs under the interpreter (any tensor on the CPU)."""
    return any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors)


def launch(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, under Triton's interpreter when a tensor argument is on the CPU."""
    global _depth
    if isinstance(kernel, InterpretedFunction) or not on_cpu(*args, *kwargs.values()):
        kernel[grid](*args, **kwargs)
        return
    _depth += 1
    try:
        _interpreted(kernel)[grid](*args, **kwargs)
    finally:
        _depth -= 1
