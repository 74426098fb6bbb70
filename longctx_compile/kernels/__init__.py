"""Triton kernels and their launchers (no torch.library code here; ``ops/`` registers the ops).

Nothing imports this package until a Triton kernel is first launched (``ops.flash``, ``ops.hsa_flash``
and the MSA runtime import it then). Each launch picks compiled or interpreted by its tensors' device
(``launch.py``), so no environment variable is needed or set.
"""
