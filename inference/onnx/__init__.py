"""inference/onnx."""
