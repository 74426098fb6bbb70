"""longctx_compile (``lcc``): capture a decoder with torch.export, rewrite its attention into long-context forms."""

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401  (registers torch.ops.longctx before any .pt2 is loaded)
from .api import compile, diff, load, targets, train, verify  # noqa: E402
from .onnx.export import export_onnx  # noqa: E402  (onnx itself is imported only when it runs)

__all__ = ["compile", "diff", "export_onnx", "load", "targets", "train", "verify", "__version__"]
