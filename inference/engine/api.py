"""Public engine API: ``load_engine`` and :class:`Engine` (understanding, report, text-to-image, editing).

Flows follow the reference inferencer (spec section 3):

- ``answer``/``report`` (``Bagel.chat``): each image -> ViT block (transform 980/378/14), then the question
  as one text block, then decoding from ``<|im_start|>`` (greedy, or temperature/top-p sampling), stopping on
  ``<|im_end|>``.
- ``generate_image``: gen = text(prompt), cfg_text = empty context, cfg_img = gen (so u_img = c); Euler
  sampler with shift, CFG interval and renorm; VAE decode; uint8 by truncation.
- ``edit_image``: the image is resized by the VAE rule (1024/32/16) and enters as a clean VAE block (t=0)
  and then a ViT block (980/387/14); gen = [VAE, ViT, text], cfg_text = [VAE, ViT], cfg_img = [text].
- ``think=True`` (any flow): the reference's think mode (``interleave_inference``): a system block first
  in gen and cfg_img; for images the greedily decoded plan joins gen only. ``edit_image(describe_first=True)``
  is the image generator script's understanding pass before the edit.
- Answers are cut at the first ``<|im_end|>``/``<|im_start|>`` text, as the reference (bagel.py:1390).

Randomness: initial noise and the VAE posterior eps come from a CPU ``torch.Generator`` seeded with
``seed`` (eps first, then noise), so a seed gives the same image on any device up to numerics; text
sampling uses a generator on the model's device seeded with ``seed``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .attention import resolve_backend
from .config import BagelConfig, LLMConfig
from .errors import InputError
from .graphs import GraphDecoder
from .loader import BackgroundHash, load_checkpoint
from .model import Context, UniMedVL, VitFn, tokens_to_latent
from .random_init import TINY_CONFIG, TINY_SEED, materialise
from .sampler import RENORM_TYPES, SamplerSettings, SampleTrace, sample_latent, to_uint8
from .tokenizer import AnswerStream, StreamDecoder, TextTokenizer, cut_answer
from .transforms import VAE_EDIT, VIT_CHAT, VIT_INTERLEAVE, ResizeRule, resize, to_model_tensor, to_pil_rgb
from .vae import AutoEncoderParams, FluxAutoEncoder
from .vit import SiglipVisionConfig, patchify

log = logging.getLogger(__name__)

ENGINE_VERSION = "1.0"
MODEL_NAME = "UniMedVL"
DEFAULT_REPORT_INSTRUCTION = (
    "You are a radiologist. Write a radiology report for the given medical image(s) with two sections:\n"
    "Findings: the observations, organ by organ.\nImpression: the concise conclusion."
)
LATENT_TOKEN_PX = 16  # VAE downsample 8 x latent patch 2

# Think-mode system prompts, verbatim from the reference (inferencer.py:23-28): they are model input.
VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer.\n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here "
    "</think> answer here"
)
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in your mind, and then generate the image.\n"
    "The planning process is enclosed within <think> </think> tags; that is, <think> planning process here "
    "</think> image here.\n"
)
# interactive_image_generator.py:331 and :342, the think variant of its pre-edit understanding step
THINK_ANALYSIS_PROMPT = "Analyze this medical image and develop an editing strategy for: '{instruction}'."
THINK_ANALYSIS_PREFIX = "Based on analysis: "
MAX_THINK_TOKENS = 1000  # inferencer.py:558 max_think_token_n
MAX_DESCRIBE_TOKENS = 800  # interactive_image_generator.py:350


class NoTokenizerError(RuntimeError):
    """The checkpoint folder has no tokenizer files, so text-in/text-out APIs are unavailable."""


@dataclass
class Answer:
    text: str  # cut at the first <|im_end|> / <|im_start|> text, as the reference (bagel.py:1390)
    token_ids: list[int]
    n_prompt_tokens: int  # tokens in the context before decoding (image tokens included)
    stopped_on_eos: bool
    n_images: int
    seconds: float
    tokens_per_second: float


@dataclass
class DecodeResult:
    token_ids: list[int]  # generated tokens (no <|im_start|>, no <|im_end|>)
    fed_tokens: list[int]  # what entered the model: <|im_start|> then generated tokens
    step_logits: list[torch.Tensor] = field(default_factory=list)  # only when record=True
    stopped_on_eos: bool = False


def _default_dtype(device: torch.device, dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
        if dtype not in table:
            raise ValueError(f"dtype must be one of {sorted(table)} or None, got {dtype!r}")
        return table[dtype]
    return dtype


def _as_list(images) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, list | tuple) else [images]


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest most-probable set whose mass reaches ``top_p`` ([..., V])."""
    p, idx = probs.sort(dim=-1, descending=True)
    drop = p.cumsum(-1) - p >= top_p  # the mass before a token already reaches top_p: the top one is always kept
    return probs.scatter(-1, idx, p.masked_fill(drop, 0.0))


def _check_finite_scalar(name: str, v: float) -> float:
    v = float(v)
    if not math.isfinite(v):
        raise InputError(f"{name} must be a finite number, got {v}")
    return v


class Engine:
    """A loaded model. Build with :func:`load_engine` (or :func:`build_random` for benchmarks)."""

    def __init__(
        self,
        model: UniMedVL,
        vae: FluxAutoEncoder | None,
        tokenizer: TextTokenizer | None,
        *,
        parts: str,
        attention: str,
        checkpoint_id: str | Callable[[], str],
        is_demo: bool,
        model_name: str = MODEL_NAME,
    ) -> None:
        self.model = model
        self.vae = vae
        self.tokenizer = tokenizer
        self.parts = parts
        self.model.attention_backend = resolve_backend(attention, model.device)
        self._checkpoint_id = checkpoint_id
        self._is_demo = is_demo
        self._model_name = model_name
        # replay the decode step as a CUDA graph (launch overhead dominates a 7B decode step otherwise)
        self.cuda_graphs = self.device.type == "cuda"
        self._vit_fn: VitFn | None = None
        self._vae_encode: Callable | None = None
        self._vae_decode: Callable | None = None

    # ---- modules the ONNX helpers export from ------------------------------------------------------
    @property
    def vit_model(self):
        return self.model.vit_model

    @property
    def connector(self):
        return self.model.connector

    @property
    def vit_pos_embed(self):
        return self.model.vit_pos_embed

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def info(self) -> dict[str, Any]:
        if callable(self._checkpoint_id):  # hashing a 30 GB checkpoint is done once, when first asked
            self._checkpoint_id = self._checkpoint_id()
        return {
            "model_name": self._model_name,
            "version": ENGINE_VERSION,
            "checkpoint_sha256": self._checkpoint_id,
            "is_demo": self._is_demo,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "parts": self.parts,
            "attention": self.model.attention_backend,
        }

    def set_encoders(self, vit: VitFn | None = None, vae_encode: Callable | None = None,
                     vae_decode: Callable | None = None) -> None:  # fmt: skip
        """Replace the PyTorch ViT+connector and VAE encoder/decoder with other callables (ONNX, TensorRT).

        ``None`` restores the built-in PyTorch module for that slot. Signatures:

        - ``vit(patches [N, 588] float, position_ids [N] long, cu_seqlens [n_img+1] int32) -> [N, llm_hidden]``
          must equal ``connector(SiglipNaViT(patches, position_ids, cu_seqlens)) + vit_pos_embed[position_ids]``;
          patches of several images are packed and ``cu_seqlens`` gives their boundaries.
        - ``vae_encode(x [1, 3, H, W] in [-1, 1], *, noise=None, sample=True, generator=None)
          -> scaled latent [1, z, H/8, W/8]`` = 0.3611 * (mean + exp(logvar/2) * noise - 0.1159); ``noise``
          (same shape as the latent) is always passed by the engine.
        - ``vae_decode(z [1, z, h, w] scaled latent) -> pixels [1, 3, 8h, 8w]`` in about [-1, 1].

        Outputs may be any float dtype on any device; the engine moves them to its own.
        """
        self._vit_fn, self._vae_encode, self._vae_decode = vit, vae_encode, vae_decode

    # ---- building blocks (id and tensor level; also used by the parity runner) -----------------------
    def vit_tokens(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """[3, H, W] images in [-1, 1] (H, W multiples of 14) -> LLM tokens per image, one packed ViT call."""
        m = self.model
        side = m.bagel_config.vit_max_num_patch_per_side
        ps = m.vit_config.patch_size
        patches, pos = zip(*(patchify(p, ps, side) for p in pixels), strict=True)
        lens = [len(q) for q in pos]
        cu = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32, device=m.device)
        flat_p = torch.cat(patches).to(m.device, m.dtype)
        flat_pos = torch.cat(pos).to(m.device)
        fn = self._vit_fn or m.vit_tokens
        out = fn(flat_p, flat_pos, cu).to(m.device, m.dtype)
        return list(out.split(lens))

    def vae_encode(self, pixels: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """[3, H, W] in [-1, 1] -> scaled latent [z, H/8, W/8] (posterior sample with ``noise``, or its mean)."""
        x = pixels.unsqueeze(0).to(self.device, self._vae_dtype())
        fn = self._vae_encode or self._require_vae().encode
        z = fn(x, noise=None if noise is None else noise.to(self.device, torch.float32), sample=noise is not None)
        return z[0].to(self.device, torch.float32)

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        fn = self._vae_decode or self._require_vae().decode
        return fn(z.to(self.device, self._vae_dtype())).to(self.device, torch.float32)

    def _vae_dtype(self) -> torch.dtype:
        return self.vae.decoder.conv_in.weight.dtype if self.vae is not None else self.dtype

    def _require_vae(self) -> FluxAutoEncoder:
        if self.vae is None:
            raise RuntimeError("this engine was loaded with parts='understanding'; the VAE is not loaded")
        return self.vae

    def new_context(self) -> Context:
        return self.model.new_context()

    def decode_text(
        self,
        ctx: Context,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        on_token_id: Callable[[int], None] | None = None,
        record: bool = False,
        stop_ids: tuple[int, ...] = (),
    ) -> DecodeResult:
        """The reference's ``generate_text``: feed ``<|im_start|>`` at r, then each sampled token.

        Produces at most ``max_new_tokens`` tokens; stops (without keeping it) on ``<|im_end|>``, and after
        keeping one of ``stop_ids``. ``temperature`` 0 is greedy (argmax); above 0 it samples from
        softmax(logits / temperature) (bagel.py:1297-1300), restricted to the smallest set of tokens whose
        probability reaches ``top_p`` (nucleus; 1.0 keeps all, the reference has no top-p).
        """
        m = self.model
        eos = m.tokens.eos_token_id
        token = torch.tensor([m.tokens.bos_token_id], device=m.device)
        res = DecodeResult([], [m.tokens.bos_token_id])
        ctx.cache.reserve(ctx.kv_len, ctx.kv_len + max_new_tokens + 1)
        graph = None
        if self.cuda_graphs and not record and self.device.type == "cuda":
            try:
                graph = GraphDecoder(m, ctx)
            except RuntimeError as e:  # a kernel that cannot be captured: decode eagerly, same results
                log.warning("CUDA graph capture of the decode step failed (%s); decoding without graphs", e)
                self.cuda_graphs = False
        for step in range(max_new_tokens):
            logits = graph.step(token) if graph is not None else m.decode_step(ctx, token)
            if record:
                res.step_logits.append(logits)
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                if top_p < 1.0:
                    probs = nucleus(probs, top_p)
                token = torch.multinomial(probs, 1, generator=generator)
            else:
                token = logits.argmax(-1, keepdim=True)
            tid = int(token)  # the one host sync per token: the stop test and streaming need it
            if tid == eos:
                res.stopped_on_eos = True
                break
            res.token_ids.append(tid)
            if on_token_id is not None:
                on_token_id(tid)
            if tid in stop_ids:
                break
            if step + 1 < max_new_tokens:
                res.fed_tokens.append(tid)
        return res

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        return height // LATENT_TOKEN_PX, width // LATENT_TOKEN_PX

    def sample_image_latent(
        self,
        gen: Context,
        cfg_text: Context | None,
        cfg_img: Context | None,
        noise: torch.Tensor,
        size: tuple[int, int],
        settings: SamplerSettings,
        *,
        img_same_as_gen: bool = False,
        trace: SampleTrace | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        return sample_latent(self.model, gen, cfg_text, cfg_img, noise, self.grid_for(*size), settings,
                             img_same_as_gen=img_same_as_gen, trace=trace, progress=progress)  # fmt: skip

    def latent_to_image(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Final tokens [N, 64] -> decoded image [1, 3, H, W] (float, not clamped)."""
        h, w = self.grid_for(*size)
        z = tokens_to_latent(x, h, w, self.model.latent_patch, self.model.latent_channels)
        return self.vae_decode(z)

    # ---- text flows ------------------------------------------------------------------------------
    def _require_tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise NoTokenizerError(
                "this checkpoint has no tokenizer files (vocab.json, merges.txt, tokenizer_config.json); "
                "text APIs need them - copy the Qwen2.5 tokenizer files into the checkpoint folder"
            )
        return self.tokenizer

    def _encode_text(self, text: str, what: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{what} must be a non-empty string")
        return self._require_tokenizer().encode(text)

    def _images(self, images, rule: ResizeRule) -> list[torch.Tensor]:
        return [to_model_tensor(resize(to_pil_rgb(img), rule)) for img in _as_list(images)]

    def _interleave_pixels(self, pil: Image.Image, vae_rule: ResizeRule = VAE_EDIT) -> torch.Tensor:
        """InterleaveInferencer's ViT input: the VAE resize first, then vit_transform (inferencer.py:605, 148-156)."""
        return to_model_tensor(resize(resize(pil, vae_rule), VIT_INTERLEAVE))

    def _sampling(self, temperature: float, top_p: float, seed: int | None) -> torch.Generator | None:
        temperature = _check_finite_scalar("temperature", temperature)
        if temperature < 0:
            raise InputError(f"temperature must be >= 0, got {temperature}")
        top_p = _check_finite_scalar("top_p", top_p)
        if not 0.0 < top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {top_p}")
        if temperature == 0:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed) if seed is not None else torch.seed())
        return gen

    def _reply(self, ctx: Context, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None,
               on_token: Callable[[str], None] | None = None) -> tuple[str, DecodeResult]:  # fmt: skip
        """Decode from ``ctx`` and cut the text like the reference; streams only the kept text."""
        tok = self._require_tokenizer()
        stream = StreamDecoder(tok) if on_token is not None else None
        kept = AnswerStream()

        def push(tid: int) -> None:
            if (delta := stream.push(tid)) and (piece := kept.push(delta)):
                on_token(piece)

        # nothing after a decoded <|im_start|> is kept (bagel.py:1390), so decoding stops there
        res = self.decode_text(ctx, max_new_tokens=int(max_new_tokens), temperature=temperature, top_p=top_p,
                               generator=generator, on_token_id=push if stream else None,
                               stop_ids=(self.model.tokens.bos_token_id,))  # fmt: skip
        if stream is not None and (rest := kept.push(stream.flush()) + kept.flush()):
            on_token(rest)
        return cut_answer(tok.decode(res.token_ids)), res

    def _think(self, ctx: Context, max_tokens: int) -> str:
        """The reference ``gen_text`` on a copy of ``ctx`` (inferencer.py:258-279): greedy, cut text.

        ``max_tokens`` is the reference's ``max_length``: its loop counts the fed ``<|im_start|>``, so at
        most ``max_tokens - 1`` tokens are generated (bagel.py:1262-1311).
        """
        if int(max_tokens) < 2:
            raise InputError(f"max_think_tokens must be >= 2, got {max_tokens}")
        text, _ = self._reply(ctx.fork(), int(max_tokens) - 1)
        return text

    @torch.inference_mode()
    def answer(
        self,
        images: list,
        question: str,
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        think: bool = False,
        on_token: Callable[[str], None] | None = None,
    ) -> Answer:
        """Answer ``question`` about ``images`` (visual question answering, ``Bagel.chat`` order).

        Greedy by default (reproducible text). ``temperature`` > 0 samples (``top_p`` < 1 restricts it to the
        nucleus) from a generator seeded with ``seed`` (None: a random seed). ``think=True`` is the
        reference's think flow (``interleave_inference(think=True, understanding_output=True)``,
        inferencer.py:590-613): a system block with :data:`VLM_THINK_SYSTEM_PROMPT` first, each image VAE-resized
        then ViT-resized (980/387/14), then the question; the answer keeps the model's ``<think>`` part.
        The text is cut at the first ``<|im_end|>``/``<|im_start|>`` (bagel.py:1390); ``on_token`` gets
        the kept text in pieces. Raises InputError (a ValueError) for bad images or parameters.
        """
        t0 = time.perf_counter()
        ids = self._encode_text(question, "question")
        generator = self._sampling(temperature, top_p, seed)
        if int(max_new_tokens) < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ctx = self.new_context()
        if think:
            self.model.append_text(ctx, self.tokenizer.encode(VLM_THINK_SYSTEM_PROMPT))
            pixels = [self._interleave_pixels(to_pil_rgb(img)) for img in _as_list(images)]
        else:
            pixels = self._images(images, VIT_CHAT)
        for tokens in self.vit_tokens(pixels) if pixels else []:
            self.model.append_vit_tokens(ctx, tokens)
        self.model.append_text(ctx, ids)
        n_prompt = ctx.kv_len
        text, res = self._reply(ctx, int(max_new_tokens), float(temperature), float(top_p), generator, on_token)
        dt = time.perf_counter() - t0
        return Answer(text, res.token_ids, n_prompt, res.stopped_on_eos, len(pixels), dt,
                      len(res.token_ids) / dt if dt > 0 else 0.0)  # fmt: skip

    def report(self, images: list, instruction: str | None = None, **kwargs: Any) -> Answer:
        """A draft report for ``images``; ``instruction`` defaults to :data:`DEFAULT_REPORT_INSTRUCTION`."""
        if instruction is None:
            instruction = DEFAULT_REPORT_INSTRUCTION
        return self.answer(images, instruction, **kwargs)

    # ---- image flows ------------------------------------------------------------------------------
    def _max_side(self) -> int:
        return self.model.bagel_config.max_latent_size * LATENT_TOKEN_PX

    def _generation_size(self, size) -> tuple[int, int]:
        try:
            h, w = (int(size[0]), int(size[1]))
        except (TypeError, ValueError, IndexError) as e:
            raise InputError(f"size must be (height, width), got {size!r}") from e
        if h < LATENT_TOKEN_PX or w < LATENT_TOKEN_PX:
            raise InputError(f"size {h}x{w} is below the minimum of {LATENT_TOKEN_PX}x{LATENT_TOKEN_PX} pixels")
        limit = self._max_side()
        rh, rw = h, w
        if max(rh, rw) > limit:  # keep the aspect ratio inside the latent position table
            f = limit / max(rh, rw)
            rh, rw = rh * f, rw * f
        # floored like the reference: its latent grid is H // 16 x W // 16 (bagel.py:833) and the decoded
        # image has 16 px per token (inferencer.py:237), so (24, 24) gives 16 x 16
        rh = max(LATENT_TOKEN_PX, int(rh) // LATENT_TOKEN_PX * LATENT_TOKEN_PX)
        rw = max(LATENT_TOKEN_PX, int(rw) // LATENT_TOKEN_PX * LATENT_TOKEN_PX)
        if (rh, rw) != (h, w):
            log.warning("generation size %dx%d adjusted to %dx%d (floored to multiples of %d px, at most %d px "
                        "per side)", h, w, rh, rw, LATENT_TOKEN_PX, limit)  # fmt: skip
        return rh, rw

    def _settings(self, steps, timestep_shift, cfg_text_scale, cfg_img_scale, cfg_interval, renorm_type, renorm_min):
        try:
            interval = (float(cfg_interval[0]), float(cfg_interval[1]))
        except (TypeError, ValueError, IndexError) as e:
            raise InputError(f"cfg_interval must be (low, high), got {cfg_interval!r}") from e
        if renorm_type not in RENORM_TYPES:
            raise InputError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {renorm_type!r}")
        s = SamplerSettings(
            steps=int(steps),
            timestep_shift=_check_finite_scalar("timestep_shift", timestep_shift),
            cfg_text_scale=_check_finite_scalar("cfg_text_scale", cfg_text_scale),
            cfg_img_scale=_check_finite_scalar("cfg_img_scale", cfg_img_scale),
            cfg_interval=(
                _check_finite_scalar("cfg_interval", interval[0]),
                _check_finite_scalar("cfg_interval", interval[1]),
            ),  # fmt: skip
            cfg_renorm_type=renorm_type,
            cfg_renorm_min=_check_finite_scalar("cfg_renorm_min", renorm_min),
        )
        s.validate()
        return s

    def _noise(self, gen: torch.Generator, n_tokens: int) -> torch.Tensor:
        dim = self.model.latent_patch**2 * self.model.latent_channels
        return torch.randn(n_tokens, dim, generator=gen, dtype=torch.float32)

    def _to_numpy_image(self, x: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        return to_uint8(self.latent_to_image(x, size)).cpu().numpy()

    @torch.inference_mode()
    def generate_image(
        self,
        prompt: str,
        *,
        size: tuple[int, int] = (1024, 1024),
        steps: int = 50,
        seed: int = 0,
        cfg_text_scale: float = 3.0,
        cfg_img_scale: float = 1.5,
        cfg_interval: tuple[float, float] = (0.4, 1.0),
        timestep_shift: float = 3.0,
        cfg_renorm_type: str = "global",
        cfg_renorm_min: float = 0.0,
        think: bool = False,
        max_think_tokens: int = MAX_THINK_TOKENS,
        on_text: Callable[[str], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Text-to-image; ``size`` is (height, width), floored to multiples of 16. Returns H x W x 3 uint8.

        Defaults are those of the reference entry point ``interleave_inference`` (inferencer.py:552-568):
        text guidance 3.0, image guidance 1.5, interval (0.4, 1.0), shift 3.0, 50 steps, global renorm.
        Contexts (inferencer.py:586-602): gen = [prompt], cfg_text = [], cfg_img = gen, so u_img = c and
        ``cfg_img_scale`` only rescales the guidance and costs no pass. ``think=True`` (inferencer.py:590-620):
        gen = [system, prompt, plan], cfg_text = [system], cfg_img = [system, prompt], where the plan is
        decoded greedily (at most ``max_think_tokens - 1`` tokens) and passed to ``on_text``.
        Raises ValueError for bad parameters.
        """
        self.model._need_gen()
        ids = self._encode_text(prompt, "prompt")
        settings = self._settings(steps, timestep_shift, cfg_text_scale, cfg_img_scale, cfg_interval,
                                  cfg_renorm_type, cfg_renorm_min)  # fmt: skip
        size = self._generation_size(size)
        rng = torch.Generator().manual_seed(int(seed))
        gen = self.new_context()
        if think:
            self.model.append_text(gen, self.tokenizer.encode(GEN_THINK_SYSTEM_PROMPT))
        cfg_text = gen.fork() if think else self.new_context()  # inferencer.py:600: before the prompt
        self.model.append_text(gen, ids)
        cfg_img = gen.fork() if think else gen
        if think:
            plan = self._think(gen, max_think_tokens)
            self.model.append_text(gen, self.tokenizer.encode(plan))  # inferencer.py:619, gen only
            if on_text is not None:
                on_text(plan)
        h, w = self.grid_for(*size)
        noise = self._noise(rng, h * w)
        x = self.sample_image_latent(gen, cfg_text, cfg_img, noise, size, settings, img_same_as_gen=not think,
                                     progress=progress)  # fmt: skip
        return self._to_numpy_image(x, size)

    @torch.inference_mode()
    def edit_image(
        self,
        image,
        instruction: str,
        *,
        steps: int = 50,
        seed: int = 42,
        cfg_text_scale: float = 4.0,
        cfg_img_scale: float = 2.0,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        timestep_shift: float = 3.0,
        cfg_renorm_type: str = "text_channel",
        cfg_renorm_min: float = 0.0,
        think: bool = False,
        describe_first: bool = False,
        max_think_tokens: int = MAX_THINK_TOKENS,
        max_describe_tokens: int = MAX_DESCRIBE_TOKENS,
        on_text: Callable[[str], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Edit ``image`` following ``instruction`` (editing, translation, staining ...; spec 3.3).

        Defaults are those of ``interactive_image_generator.py`` (:302-307, :367-369). The output has the size
        of the input after the VAE resize rule (multiples of 16, long side at most 1024 px or what the
        latent table holds). Returns H x W x 3 uint8.

        - ``think=True``: the reference think flow (inferencer.py:590-620): gen = [system, VAE, ViT,
          instruction, plan], cfg_text = [system, VAE, ViT], cfg_img = [system, instruction].
        - ``describe_first=True``: the image generator script's step 1 (interactive_image_generator.py:328-355):
          an understanding pass on [image, instruction] (greedy, ``max_describe_tokens``), then the edit with
          ``instruction + "\n\n" + description``. With ``think`` too, that pass is the script's think
          analysis ("Analyze this medical image ...", appended as "Based on analysis: ...") and the edit
          itself runs without think, as the script does. The description goes to ``on_text``.
        """
        self.model._need_gen()
        self._encode_text(instruction, "instruction")
        settings = self._settings(steps, timestep_shift, cfg_text_scale, cfg_img_scale, cfg_interval,
                                  cfg_renorm_type, cfg_renorm_min)  # fmt: skip
        pil = to_pil_rgb(image)
        rule = VAE_EDIT
        if self._max_side() < rule.max_size:
            rule = ResizeRule(self._max_side(), rule.min_size, rule.stride, rule.max_pixels)
        vae_img = resize(pil, rule)
        size = (vae_img.size[1], vae_img.size[0])
        vae_pixels = to_model_tensor(vae_img)
        vit_pixels = to_model_tensor(resize(vae_img, VIT_INTERLEAVE))
        vit_tokens = self.vit_tokens([vit_pixels])[0]
        if describe_first:
            instruction = self._describe(vit_tokens, instruction, think, max_describe_tokens, on_text)
            think = False  # interactive_image_generator.py:366: the edit runs with think=False
        ids = self._encode_text(instruction, "instruction")

        rng = torch.Generator().manual_seed(int(seed))
        p = self.vae.params if self.vae is not None else AutoEncoderParams()
        f = p.downsample
        eps = torch.randn(1, p.z_channels, size[0] // f, size[1] // f, generator=rng)
        gen = self.new_context()
        system = self.tokenizer.encode(GEN_THINK_SYSTEM_PROMPT) if think else []
        if think:
            self.model.append_text(gen, system)
        self.model.append_vae_latent(gen, self.vae_encode(vae_pixels, eps))
        self.model.append_vit_tokens(gen, vit_tokens)
        cfg_text = gen.fork()
        self.model.append_text(gen, ids)
        cfg_img = self.new_context()
        if think:
            self.model.append_text(cfg_img, system)
        self.model.append_text(cfg_img, ids)
        if think:
            plan = self._think(gen, max_think_tokens)
            self.model.append_text(gen, self.tokenizer.encode(plan))  # inferencer.py:619, gen only
            if on_text is not None:
                on_text(plan)
        h, w = self.grid_for(*size)
        noise = self._noise(rng, h * w)
        x = self.sample_image_latent(gen, cfg_text, cfg_img, noise, size, settings, progress=progress)
        return self._to_numpy_image(x, size)

    def _describe(self, vit_tokens: torch.Tensor, instruction: str, think: bool, max_tokens: int,
                  on_text: Callable[[str], None] | None) -> str:  # fmt: skip
        """interactive_image_generator.py:328-355: understanding pass, then the instruction it edits with."""
        ctx = self.new_context()
        if think:
            self.model.append_text(ctx, self.tokenizer.encode(VLM_THINK_SYSTEM_PROMPT))
        self.model.append_vit_tokens(ctx, vit_tokens)
        question = THINK_ANALYSIS_PROMPT.format(instruction=instruction) if think else instruction
        self.model.append_text(ctx, self.tokenizer.encode(question))
        text = self._think(ctx, max_tokens)
        if on_text is not None:
            on_text(text)
        if not text:  # the script keeps the bare instruction when the pass says nothing (:340, :353)
            return instruction
        return f"{instruction}\n\n{THINK_ANALYSIS_PREFIX if think else ''}{text}"


# ---- construction ---------------------------------------------------------------------------------------
def _device(device: str | torch.device) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but CUDA is not available (use device='cpu')")
    return d


def build_random(
    cfg: dict,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
    parts: str = "all",
    attention: str = "auto",
    tokenizer: TextTokenizer | None = None,
    init_device: str | torch.device | None = None,
    is_demo: bool = True,
    model_name: str = MODEL_NAME,
) -> Engine:
    """An engine with deterministic random weights of the shapes in ``cfg`` (``llm``, ``vit``, ``ae``, ``bagel``
    dicts in the release/golden file format). Weights are drawn on ``init_device`` (default: ``device``)."""
    if parts not in ("all", "understanding"):
        raise ValueError(f"parts must be 'all' or 'understanding', got {parts!r}")
    dev = _device(device)
    dt = _default_dtype(dev, dtype)
    idev = _device(init_device) if init_device is not None else dev
    llm_cfg = LLMConfig.from_dict(cfg["llm"])
    vit_cfg = SiglipVisionConfig.from_dict(cfg["vit"])
    bagel = BagelConfig.from_dict(cfg.get("bagel", {}))
    ae_params = AutoEncoderParams.from_dict(cfg.get("ae", {}))
    tokens = bagel.special_tokens()
    if tokenizer is not None:
        from .loader import resolve_special_tokens

        tokens = resolve_special_tokens(bagel, tokenizer, Path("<random>"))
    if tokens is None:
        raise ValueError("build_random needs bagel.new_token_ids or a tokenizer for the special token ids")
    with_gen = parts == "all"
    with torch.device("meta"):
        model = UniMedVL(llm_cfg, vit_cfg, bagel, tokens, latent_channels=ae_params.z_channels, with_gen=with_gen)
        vae = FluxAutoEncoder(ae_params) if with_gen else None
    materialise(model, device=idev, dtype=dt, seed=seed)
    if vae is not None:
        materialise(vae, device=idev, dtype=dt, seed=seed + 1)
    if idev != dev:
        model.to(dev)
        vae = vae.to(dev) if vae is not None else None
    return Engine(model, vae, tokenizer, parts=parts, attention=attention, checkpoint_id=f"random-{seed}",
                  is_demo=is_demo, model_name=model_name)  # fmt: skip


def build_tiny(device="cpu", dtype=None, parts="all", attention="auto", seed: int = TINY_SEED) -> Engine:
    """The demo model: golden tiny-v1 shapes, weights from a fixed seed (drawn on the CPU, so identical on
    every machine), with the built-in byte-level tokenizer. Not a medical model: outputs are noise."""
    tok = TextTokenizer.tiny()
    eng = build_random(TINY_CONFIG, device=device, dtype=dtype, seed=seed, parts=parts, attention=attention,
                       tokenizer=tok, init_device="cpu", is_demo=True, model_name="UniMedVL-tiny-demo")  # fmt: skip
    eng._checkpoint_id = f"tiny-{seed}"
    return eng


def load_engine(
    path: str = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    parts: str = "all",
    attention: str = "auto",
) -> Engine:
    """Load a checkpoint folder (release layout or a golden-format folder) or ``"tiny"`` (random demo).

    ``dtype=None``: float32 on CPU, bfloat16 on CUDA. ``parts="understanding"`` skips the generation expert,
    the generation heads and the VAE. ``attention``: ``auto`` (flash-attn on CUDA when installed, else SDPA),
    ``sdpa`` or ``flash``.
    """
    if str(path) == "tiny":
        return build_tiny(device=device, dtype=dtype, parts=parts, attention=attention)
    dev = _device(device)
    dt = _default_dtype(dev, dtype)
    loaded = load_checkpoint(path, device=dev, dtype=dt, parts=parts)
    files = loaded.weight_files
    return Engine(loaded.model, loaded.vae, loaded.tokenizer, parts=parts, attention=attention,
                  checkpoint_id=BackgroundHash(files), is_demo=False)  # fmt: skip
