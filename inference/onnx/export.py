"""Export the vision encoders to ONNX (legacy TorchScript exporter, dynamic axes; no onnxscript needed).

Graphs:
- ``vit``: one image per call. ``patches [N, 588]`` and ``position_ids [N]`` -> ``tokens [N, llm_hidden]``
  = connector(SigLIP(patches)) + vit_pos_embed[position_ids]. N is dynamic. Several images are run as
  several calls (the host loops over ``cu_seqlens``), which keeps the graph free of varlen masks.
- ``vae_encoder``: ``pixels [B,3,H,W]`` -> ``mean, logvar [B,z,H/8,W/8]``. Sampling and scale/shift stay on
  the host so the posterior noise can be injected, as in the PyTorch module.
- ``vae_decoder``: scaled latent ``z [B,z,h,w]`` -> ``pixels [B,3,8h,8w]`` (un-scale/shift inside).

Files live under ``cache_dir/<weights fingerprint>-<shape signature>/`` so a different checkpoint or a
different architecture never reuses a stale graph; nothing in a path comes from received data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from inference.engine.vae import FluxAutoEncoder
from inference.engine.vit import SiglipNaViT

log = logging.getLogger(__name__)

OPSET = 17
EXPORT_FORMAT = 1  # bump when the graphs' inputs/outputs change so old cache entries are ignored


class VitToLLM(nn.Module):
    """ViT + connector + fixed 2-D position table for one image: what enters the LLM."""

    def __init__(self, vit: SiglipNaViT, connector: nn.Module, pos_table: torch.Tensor) -> None:
        super().__init__()
        self.vit = vit
        self.connector = connector
        self.register_buffer("pos_table", pos_table.detach(), persistent=False)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        h = self.vit(patches, position_ids, None)
        return self.connector(h) + self.pos_table[position_ids].to(h.dtype)


class VaeEncoderMoments(nn.Module):
    def __init__(self, ae: FluxAutoEncoder) -> None:
        super().__init__()
        self.ae = ae

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ae.encode_moments(pixels)


class VaeDecoder(nn.Module):
    def __init__(self, ae: FluxAutoEncoder) -> None:
        super().__init__()
        self.ae = ae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.ae.decode(z)


def weights_fingerprint(*modules: nn.Module, extra: tuple[torch.Tensor, ...] = ()) -> str:
    """A cheap content hash of the weights: names, shapes, dtypes and a strided sample of every tensor.

    Hashing all bytes of a 400M-parameter ViT would take seconds on every start; a sample of up to 4096
    values per tensor plus its sum separates different checkpoints in practice.
    """
    h = hashlib.sha256()
    tensors: list[tuple[str, torch.Tensor]] = []
    for i, m in enumerate(modules):
        tensors += [(f"{i}.{k}", v) for k, v in m.state_dict().items()]
    tensors += [(f"extra{i}", t) for i, t in enumerate(extra)]
    with torch.no_grad():
        for name, t in tensors:
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step][:4096].to("cpu", torch.float64)
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{float(flat.double().sum()):.10e}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def shape_signature(kind: str, dims: dict, precision: str) -> str:
    payload = json.dumps(
        {"kind": kind, "dims": dims, "precision": precision, "opset": OPSET, "format": EXPORT_FORMAT}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def cache_folder(cache_dir: str | Path, fingerprint: str, signature: str) -> Path:
    return Path(cache_dir) / f"{fingerprint}-{signature}"


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> Path:
    """Trace and write atomically: a crash mid-export never leaves a truncated graph to be reused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning and tracer warnings
            torch.onnx.export(
                module.eval(),
                args,
                tmp,
                dynamo=False,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=OPSET,
                do_constant_folding=True,
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared with other workers
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("exported %s (%.1f MB)", path.name, path.stat().st_size / 1e6)
    return path


def _module_device_dtype(m: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(m.parameters())
    return p.device, p.dtype


def export_vit(model: VitToLLM, path: Path) -> Path:
    device, dtype = _module_device_dtype(model)
    cfg = model.vit.config
    # a 2x3 patch grid as the trace example; N is declared dynamic
    patches = torch.randn(6, cfg.patch_dim, device=device, dtype=dtype)
    pos = torch.tensor([0, 1, 2, 70, 71, 72], device=device) % (cfg.max_patches_per_side**2)
    return _export(
        model,
        (patches, pos.long()),
        path,
        ["patches", "position_ids"],
        ["tokens"],
        {"patches": {0: "n"}, "position_ids": {0: "n"}, "tokens": {0: "n"}},
    )


def export_vae_encoder(ae: FluxAutoEncoder, path: Path) -> Path:
    device, dtype = _module_device_dtype(ae)
    side = 2 * ae.params.downsample
    x = torch.randn(1, ae.params.in_channels, side, side, device=device, dtype=dtype)
    return _export(
        VaeEncoderMoments(ae),
        (x,),
        path,
        ["pixels"],
        ["mean", "logvar"],
        {"pixels": {0: "b", 2: "h", 3: "w"}, "mean": {0: "b", 2: "zh", 3: "zw"}, "logvar": {0: "b", 2: "zh", 3: "zw"}},
    )


def export_vae_decoder(ae: FluxAutoEncoder, path: Path) -> Path:
    device, dtype = _module_device_dtype(ae)
    z = torch.randn(1, ae.params.z_channels, 2, 2, device=device, dtype=dtype)
    return _export(
        VaeDecoder(ae),
        (z,),
        path,
        ["z"],
        ["pixels"],
        {"z": {0: "b", 2: "zh", 3: "zw"}, "pixels": {0: "b", 2: "h", 3: "w"}},
    )
