"""Swap an engine's PyTorch vision encoders for onnxruntime (CPU/CUDA) or TensorRT ones.

``build_encoders`` exports what is missing from the cache and returns the three callables;
``accelerate_engine`` does that for a loaded engine and installs them with ``engine.set_encoders``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from inference.engine.vae import FluxAutoEncoder
from inference.engine.vit import SiglipNaViT
from inference.onnx.export import (
    VitToLLM,
    cache_folder,
    export_vae_decoder,
    export_vae_encoder,
    export_vit,
    shape_signature,
    weights_fingerprint,
)
from inference.onnx.runtime import (
    ENCODER_BACKENDS,
    OnnxVaeDecode,
    OnnxVaeEncode,
    OnnxVit,
    OrtGraph,
    make_session,
    select_providers,
)

log = logging.getLogger(__name__)


@dataclass
class OnnxEncoders:
    vit: OnnxVit | None
    vae_encode: OnnxVaeEncode | None
    vae_decode: OnnxVaeDecode | None
    folders: dict[str, Path]
    exported: list[str]  # graphs written by this call (empty when everything came from the cache)

    @property
    def providers(self) -> dict[str, str]:
        out = {}
        if self.vit is not None:
            out["vit"] = self.vit.graph.provider
        if self.vae_encode is not None:
            out["vae_encode"] = self.vae_encode.graph.provider
        if self.vae_decode is not None:
            out["vae_decode"] = self.vae_decode.graph.provider
        return out


def _precision_for(module: nn.Module, precision: str) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32 or fp16, got {precision!r}")
    # ORT's CPU kernels want fp32; on a GPU fp16 halves memory traffic (ORT has few bf16 kernels)
    return torch.float16 if next(module.parameters()).is_cuda else torch.float32


def _as_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    if next(module.parameters()).dtype == dtype:
        return module
    return copy.deepcopy(module).to(dtype)


def _trt_profiles(spec: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]) -> dict[str, str]:
    """TensorRT EP optimisation profile (min/opt/max per input) so one engine covers every size."""

    def fmt(i: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, dims[i]))}" for name, dims in spec.items())

    return {"trt_profile_min_shapes": fmt(0), "trt_profile_opt_shapes": fmt(1), "trt_profile_max_shapes": fmt(2)}


def build_encoders(
    *,
    backend: str,
    cache_dir: str | Path,
    vit: SiglipNaViT | None = None,
    connector: nn.Module | None = None,
    vit_pos_table: torch.Tensor | None = None,
    ae: FluxAutoEncoder | None = None,
    precision: str = "auto",
    max_image_side: int = 1024,
    threads: int | None = None,
    available: Sequence[str] | None = None,
) -> OnnxEncoders:
    """Export (if not cached) and open sessions for whichever of the ViT path and the VAE are given.

    `available`: the execution providers to choose from (default: what onnxruntime offers here);
    a requested one that is missing falls back with a warning (`select_providers`)."""
    if backend not in ("onnx", "tensorrt"):
        raise ValueError(f"build_encoders needs backend onnx or tensorrt, got {backend!r}")
    folders: dict[str, Path] = {}
    exported: list[str] = []
    vit_call = enc_call = dec_call = None

    if vit is not None:
        if connector is None or vit_pos_table is None:
            raise ValueError("the ViT graph needs the connector and the vit_pos_embed table")
        dtype = _precision_for(vit, precision)
        cfg = vit.config
        llm_hidden = vit_pos_table.shape[1]
        dims = {"vit": vars(cfg), "llm_hidden": llm_hidden, "pos_rows": vit_pos_table.shape[0]}
        folder = cache_folder(
            cache_dir,
            weights_fingerprint(vit, connector, extra=(vit_pos_table,)),
            shape_signature("vit", dims, str(dtype)),
        )
        path = folder / "vit.onnx"
        if not path.is_file():
            # a copy in the export precision, only when there is something to export
            model = VitToLLM(_as_dtype(vit, dtype), _as_dtype(connector, dtype), vit_pos_table.to(dtype)).eval()
            export_vit(model, path)
            exported.append("vit")
            del model
        n_max, pd = cfg.max_patches_per_side**2, cfg.patch_dim
        profiles = _trt_profiles(
            {"patches": ((1, pd), (37 * 37, pd), (n_max, pd)), "position_ids": ((1,), (37 * 37,), (n_max,))}
        )
        providers = select_providers(
            backend, trt_cache_dir=folder / "trt", trt_profiles=profiles, available=available, **_dev(vit)
        )
        vit_call = OnnxVit(
            OrtGraph(make_session(path, providers, threads=threads)), llm_hidden, next(vit.parameters()).dtype
        )
        folders["vit"] = folder

    if ae is not None:
        dtype = _precision_for(ae, precision)
        p = ae.params
        folder = cache_folder(cache_dir, weights_fingerprint(ae), shape_signature("vae", vars(p), str(dtype)))
        enc_path, dec_path = folder / "vae_encoder.onnx", folder / "vae_decoder.onnx"
        if not (enc_path.is_file() and dec_path.is_file()):
            ae_x = _as_dtype(ae, dtype).eval()
            if not enc_path.is_file():
                export_vae_encoder(ae_x, enc_path)
                exported.append("vae_encoder")
            if not dec_path.is_file():
                export_vae_decoder(ae_x, dec_path)
                exported.append("vae_decoder")
            del ae_x
        f, zc, s = p.downsample, p.z_channels, max_image_side
        enc_prof = _trt_profiles({"pixels": ((1, 3, 2 * f, 2 * f), (1, 3, 512, 512), (1, 3, s, s))})
        dec_prof = _trt_profiles({"z": ((1, zc, 2, 2), (1, zc, 64, 64), (1, zc, s // f, s // f))})
        enc_sess = make_session(
            enc_path,
            select_providers(
                backend, trt_cache_dir=folder / "trt_enc", trt_profiles=enc_prof, available=available, **_dev(ae)
            ),
            threads=threads,
        )
        dec_sess = make_session(
            dec_path,
            select_providers(
                backend, trt_cache_dir=folder / "trt_dec", trt_profiles=dec_prof, available=available, **_dev(ae)
            ),
            threads=threads,
        )
        enc_call = OnnxVaeEncode(OrtGraph(enc_sess), ae)
        dec_call = OnnxVaeDecode(OrtGraph(dec_sess), f, p.out_ch)
        folders["vae"] = folder
    return OnnxEncoders(vit_call, enc_call, dec_call, folders, exported)


def _dev(module: nn.Module) -> dict:
    d = next(module.parameters()).device
    return {"device_id": d.index or 0} if d.type == "cuda" else {}


def accelerate_engine(engine, encoders: str, cache_dir: str | Path, *, precision: str = "auto") -> OnnxEncoders | None:
    """Install ONNX/TensorRT encoders on ``engine`` (``encoders="torch"`` restores the PyTorch ones).

    Graphs and TensorRT engines go under ``cache_dir/onnx/<weights fingerprint>-<shape signature>/`` and are
    reused by later calls (and other workers) with the same weights.

    Uses the engine's modules as the export source: ``engine.vit_model``, ``engine.connector``,
    ``engine.vit_pos_embed`` (table tensor or module with ``pos_embed``) and ``engine.vae``; parts the
    engine did not load (e.g. no VAE for understanding-only) are skipped.
    """
    if encoders not in ENCODER_BACKENDS:
        raise ValueError(f"encoders must be one of {ENCODER_BACKENDS}, got {encoders!r}")
    if encoders == "torch":
        engine.set_encoders(vit=None, vae_encode=None, vae_decode=None)
        return None
    vit = getattr(engine, "vit_model", None)
    pos = getattr(engine, "vit_pos_embed", None)
    if pos is not None and not isinstance(pos, torch.Tensor):
        pos = pos.pos_embed
    built = build_encoders(
        backend=encoders,
        cache_dir=Path(cache_dir) / "onnx",  # the model cache folder is shared with other caches
        vit=vit,
        connector=getattr(engine, "connector", None) if vit is not None else None,
        vit_pos_table=pos if vit is not None else None,
        ae=getattr(engine, "vae", None),
        precision=precision,
    )
    engine.set_encoders(vit=built.vit, vae_encode=built.vae_encode, vae_decode=built.vae_decode)
    log.info("encoders=%s installed: %s", encoders, built.providers)
    return built
