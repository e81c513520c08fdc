"""onnxruntime sessions for the exported encoders, with execution-provider choice and fallback.

``encoders="tensorrt"`` -> TensorRT EP (engine cache on disk, fp16 when the graph is fp32 and the GPU allows),
then CUDA, then CPU; ``"onnx"`` -> CUDA when available, else CPU. A provider that is missing, or that
onnxruntime silently dropped while creating the session, is reported with a warning naming the fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

ENCODER_BACKENDS = ("torch", "onnx", "tensorrt")

_NP_OF_ONNX = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
_TORCH_OF_NP = {np.float32: torch.float32, np.float16: torch.float16, np.int64: torch.int64, np.int32: torch.int32}


_dlls_preloaded = False


def _ort():
    global _dlls_preloaded
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - onnxruntime is a hard dependency of the project
        raise RuntimeError("encoders='onnx'/'tensorrt' need onnxruntime (or onnxruntime-gpu) installed") from e
    if not _dlls_preloaded and torch.cuda.is_available() and hasattr(onnxruntime, "preload_dlls"):
        # onnxruntime-gpu can use the CUDA/cuDNN libraries of the nvidia-* wheels that torch brought along
        try:
            onnxruntime.preload_dlls()
        except Exception as e:
            log.warning("onnxruntime.preload_dlls() failed (%s); CUDA libraries must be on the loader path", e)
    _dlls_preloaded = True
    return onnxruntime


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


def select_providers(
    backend: str,
    *,
    trt_cache_dir: str | Path | None = None,
    trt_profiles: dict[str, str] | None = None,
    trt_fp16: bool = True,
    device_id: int = 0,
    available: Sequence[str] | None = None,
) -> list[str | tuple[str, dict]]:
    """Ordered provider list for ``backend``; warns once for each requested provider that is unavailable."""
    if backend not in ("onnx", "tensorrt"):
        raise ValueError(f"encoders must be one of {ENCODER_BACKENDS}, got {backend!r}")
    avail = set(available_providers() if available is None else available)
    chain: list[str | tuple[str, dict]] = []
    if backend == "tensorrt":
        if "TensorrtExecutionProvider" in avail:
            opts: dict = {"device_id": device_id, "trt_fp16_enable": trt_fp16}
            if trt_cache_dir is not None:
                Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
                opts |= {
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(trt_cache_dir),
                    "trt_timing_cache_enable": True,
                    "trt_timing_cache_path": str(trt_cache_dir),
                }
            if trt_profiles:
                opts |= trt_profiles
            chain.append(("TensorrtExecutionProvider", opts))
        else:
            nxt = "CUDAExecutionProvider" if "CUDAExecutionProvider" in avail else "CPUExecutionProvider"
            log.warning("encoders=tensorrt: TensorrtExecutionProvider is not available; falling back to %s", nxt)
    if "CUDAExecutionProvider" in avail:
        chain.append(("CUDAExecutionProvider", {"device_id": device_id}))
    elif backend == "onnx" and torch.cuda.is_available():
        log.warning("encoders=onnx: CUDAExecutionProvider is not available (install onnxruntime-gpu); using CPU")
    chain.append("CPUExecutionProvider")
    return chain


def _provider_name(p: str | tuple[str, dict]) -> str:
    return p if isinstance(p, str) else p[0]


def make_session(path: str | Path, providers: list[str | tuple[str, dict]], *, threads: int | None = None):
    """An inference session; ``threads`` caps the CPU intra-op pool (default: onnxruntime's, one per core)."""
    ort = _ort()
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if _provider_name(providers[0]) == "CPUExecutionProvider":
        # idle ORT threads otherwise spin after each run and take the cores from PyTorch (the LLM) running next
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    wanted = _provider_name(providers[0])
    got = sess.get_providers()
    if wanted not in got:
        # e.g. CUDA libraries missing at run time: onnxruntime quietly drops the provider
        log.warning("%s: %s could not be initialised; running on %s", Path(path).name, wanted, got[0])
    return sess


class OrtGraph:
    """A session plus torch-in/torch-out calls. On CUDA tensors with a GPU provider, inputs and outputs stay
    on the GPU through I/O binding; otherwise they go through numpy on the host."""

    def __init__(self, sess) -> None:
        self.sess = sess
        self.inputs = sess.get_inputs()
        self.outputs = sess.get_outputs()
        self.input_np = {i.name: _NP_OF_ONNX[i.type] for i in self.inputs}
        self.output_np = {o.name: _NP_OF_ONNX[o.type] for o in self.outputs}
        self.on_gpu = sess.get_providers()[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")

    @property
    def provider(self) -> str:
        return self.sess.get_providers()[0]

    def __call__(self, feeds: dict[str, torch.Tensor], out_shapes: dict[str, tuple[int, ...]]) -> list[torch.Tensor]:
        first = next(iter(feeds.values()))
        if self.on_gpu and first.is_cuda:
            return self._run_bound(feeds, out_shapes, first.device)
        np_feeds = {
            k: v.detach().to("cpu", _TORCH_OF_NP[self.input_np[k]]).contiguous().numpy() for k, v in feeds.items()
        }
        outs = self.sess.run([o.name for o in self.outputs], np_feeds)
        return [torch.from_numpy(o).to(first.device) for o in outs]

    def _run_bound(self, feeds, out_shapes, device: torch.device) -> list[torch.Tensor]:
        binding = self.sess.io_binding()
        keep = []
        for name, t in feeds.items():
            t = t.detach().to(_TORCH_OF_NP[self.input_np[name]]).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", device.index or 0, self.input_np[name], tuple(t.shape), t.data_ptr())
        outs = []
        for o in self.outputs:
            buf = torch.empty(out_shapes[o.name], device=device, dtype=_TORCH_OF_NP[self.output_np[o.name]])
            binding.bind_output(
                o.name, "cuda", device.index or 0, self.output_np[o.name], tuple(buf.shape), buf.data_ptr()
            )
            outs.append(buf)
        torch.cuda.current_stream(device).synchronize()  # torch produced the inputs on its stream
        self.sess.run_with_iobinding(binding)
        binding.synchronize_outputs()  # the buffers are read on torch's stream next
        del keep
        return outs


class OnnxVit:
    """``vit(patches [N,588], position_ids [N], cu_seqlens [n+1]) -> [N, llm_hidden]``, one session call per image."""

    def __init__(self, graph: OrtGraph, llm_hidden: int, out_dtype: torch.dtype) -> None:
        self.graph = graph
        self.llm_hidden = llm_hidden
        self.out_dtype = out_dtype

    def __call__(self, patches: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        bounds = [int(b) for b in cu_seqlens.tolist()]
        parts = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            feeds = {"patches": patches[a:b], "position_ids": position_ids[a:b].long()}
            parts.append(self.graph(feeds, {"tokens": (b - a, self.llm_hidden)})[0])
        return torch.cat(parts).to(self.out_dtype)


class OnnxVaeEncode:
    """``vae_encode(x [B,3,H,W], *, noise=None, sample=True, generator=None) -> scaled latent``.

    Same semantics as ``FluxAutoEncoder.encode``: the graph gives mean/logvar, the posterior sample and the
    scale/shift run here so injected noise works identically.
    """

    def __init__(self, graph: OrtGraph, ae) -> None:
        self.graph = graph
        self.ae = ae  # only for sample_posterior (scale/shift); its encoder weights are not used

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        f, z = self.ae.params.downsample, self.ae.params.z_channels
        shape = (b, z, h // f, w // f)
        mean, logvar = self.graph({"pixels": x}, {"mean": shape, "logvar": shape})
        return mean.float(), logvar.float()

    def __call__(self, x: torch.Tensor, *, noise=None, sample: bool = True, generator=None) -> torch.Tensor:
        mean, logvar = self.moments(x)
        z = self.ae.sample_posterior(mean, logvar, noise=noise, sample=sample, generator=generator)
        return z.to(x.dtype)


class OnnxVaeDecode:
    """``vae_decode(z [B,z,h,w]) -> pixels [B,3,8h,8w]`` (un-scale/shift inside the graph)."""

    def __init__(self, graph: OrtGraph, downsample: int, out_channels: int) -> None:
        self.graph = graph
        self.f = downsample
        self.c = out_channels

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        b, _, h, w = z.shape
        return self.graph({"z": z}, {"pixels": (b, self.c, h * self.f, w * self.f)})[0].to(z.dtype)
