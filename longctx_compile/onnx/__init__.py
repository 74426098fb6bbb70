"""ONNX export of artifacts: each longctx op translated to standard ONNX operators (or custom-domain nodes)."""
