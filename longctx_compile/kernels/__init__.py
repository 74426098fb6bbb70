"""Triton kernels and their launchers (no torch.library code here; ``ops/`` registers the ops).

Nothing imports this package until a Triton kernel is first launched (``ops.flash``, ``ops.hsa_flash``
and the MSA runtime import it then), so importing ``longctx_compile`` leaves the environment alone.
On a machine without CUDA a launch means CPU tensors, which only Triton's interpreter runs: the first
import then sets ``TRITON_INTERPRET=1``, before any kernel here is defined (Triton reads it when a
kernel is decorated). That is how the ``interpret`` target and the CPU test suite run the kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
