"""ONNX export and onnxruntime/TensorRT execution of the vision encoders (ViT+connector, VAE enc/dec).

    from inference.engine import load_engine
    from inference.onnx import accelerate_engine

    engine = load_engine(path, device="cuda")
    accelerate_engine(engine, "tensorrt", "var/cache")   # or "onnx"; "torch" restores PyTorch

Graphs are exported with the TorchScript-based ``torch.onnx.export`` (no onnxscript needed), fp32 for CPU
and fp16 for GPU sessions, and cached under ``<cache>/onnx/<weights fingerprint>-<shape signature>/``.
The MoT LLM stays in PyTorch.
"""

from inference.onnx.accelerate import OnnxEncoders, accelerate_engine, build_encoders
from inference.onnx.runtime import ENCODER_BACKENDS, available_providers, select_providers

__all__ = [
    "ENCODER_BACKENDS",
    "OnnxEncoders",
    "accelerate_engine",
    "available_providers",
    "build_encoders",
    "select_providers",
]
