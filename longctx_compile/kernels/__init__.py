"""Triton kernels and their launchers (no torch.library code here; ``ops/`` registers the ops).

Without CUDA the kernels run under Triton's interpreter: importing this package then sets
``TRITON_INTERPRET=1`` before any kernel is defined, which is how the ``interpret`` target and the
CPU test suite run them.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
