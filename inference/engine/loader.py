"""Load a UniMedVL release folder (or a golden-format checkpoint) into the engine's modules.

Layout read (spec 2.1): ``llm_config.json``, ``vit_config.json``, ``ema.safetensors`` (or
``ema_bf16.safetensors``), ``ae.safetensors``, tokenizer files ``vocab.json``/``merges.txt``/
``tokenizer_config.json``; optional ``bagel_config.json`` and ``ae_config.json`` (the golden sets carry them,
the release hard-codes those values).

Modules are built on the meta device and the safetensors entries are assigned straight into them
(``assign=True``), one tensor at a time, so the weights exist once, on the target device and dtype.
Unlike the reference's non-strict load, any missing or unexpected key and any shape mismatch is an error
naming the file and the tensor.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import QWEN_SPECIAL_TOKENS, BagelConfig, LLMConfig, SpecialTokens
from .model import UniMedVL
from .tokenizer import TextTokenizer
from .vae import AutoEncoderParams, FluxAutoEncoder
from .vit import SiglipVisionConfig

log = logging.getLogger(__name__)

EMA_FILES = ("ema.safetensors", "ema_bf16.safetensors")
# checkpoint entries only the generation path uses (skipped with parts="understanding")
GEN_ONLY = re.compile(r"(_moe_gen\b|_moe_gen\.|^(time_embedder|vae2llm|llm2vae|latent_pos_embed)\.)")


class CheckpointError(ValueError):
    """The checkpoint folder is missing a file or holds a tensor the model does not expect."""


@dataclass
class LoadedParts:
    model: UniMedVL
    vae: FluxAutoEncoder | None
    tokenizer: TextTokenizer | None
    weight_files: list[Path]


def _require(folder: Path, name: str) -> Path:
    p = folder / name
    if not p.is_file():
        raise CheckpointError(f"checkpoint file missing: {p}")
    return p


def check_folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not folder.exists():
        raise CheckpointError(
            f"{path!r} looks like a Hugging Face hub id, but the engine never downloads weights. Download them "
            f"first on a machine with network access, e.g. `huggingface-cli download {path} --local-dir DIR`, "
            "then pass that folder as the model path."
        )
    raise CheckpointError(f"model path {folder} is not a folder (expected a UniMedVL checkpoint folder or 'tiny')")


def resolve_special_tokens(bagel: BagelConfig, tokenizer: TextTokenizer | None, folder: Path) -> SpecialTokens:
    """Ids of the four code-level tokens: from the tokenizer when present, else from ``bagel_config.json``."""
    from_cfg = bagel.special_tokens()
    if tokenizer is not None:
        ids = {}
        for role, tok in QWEN_SPECIAL_TOKENS.items():
            i = tokenizer.token_id(tok)
            if i is None:
                raise CheckpointError(f"tokenizer in {folder} has no {tok} token")
            ids[role] = i
        found = SpecialTokens(**ids)
        if from_cfg is not None and from_cfg != found:
            raise CheckpointError(f"bagel_config.json special token ids {from_cfg} disagree with the tokenizer {found}")
        return found
    if from_cfg is None:
        raise CheckpointError(
            f"{folder} has neither tokenizer files (vocab.json, merges.txt) nor special token ids in bagel_config.json"
        )
    return from_cfg


def load_state_into(
    module: nn.Module,
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    skip: re.Pattern | None = None,
    strip_prefix: str = "",
    key_prefix: str = "",
) -> None:
    """Assign every entry of ``path`` to ``module`` (built on meta), strictly, cast to ``dtype`` on ``device``.

    ``key_prefix`` selects the entries of this module in a shared file (and is stripped); entries matching
    ``skip`` are ignored; ``strip_prefix`` is dropped from keys that carry it (``module.`` in some AE files).
    """
    from safetensors import safe_open

    expected = {k: v for k, v in module.state_dict(keep_vars=True).items()}
    found: dict[str, torch.Tensor] = {}
    load_dev = str(device) if device.type == "cuda" else "cpu"
    try:
        handle = safe_open(str(path), framework="pt", device=load_dev)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    with handle as f:
        for raw in f.keys():
            if key_prefix and not raw.startswith(key_prefix):
                continue
            key = raw[len(key_prefix) :]
            if strip_prefix and key.startswith(strip_prefix):
                key = key[len(strip_prefix) :]
            if skip is not None and skip.search(raw):
                continue
            if key not in expected:
                raise CheckpointError(f"{path.name}: unexpected tensor {raw!r} (not part of the model)")
            want = tuple(expected[key].shape)
            got = tuple(f.get_slice(raw).get_shape())
            if got != want:
                raise CheckpointError(
                    f"{path.name}: tensor {raw!r} has shape {list(got)}, the model expects {list(want)}"
                )
            found[key] = f.get_tensor(raw).to(device=device, dtype=dtype)
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path.name}: tensor {key_prefix + missing[0]!r} is missing{more}")
    module.load_state_dict(found, strict=True, assign=True)
    for p in module.parameters():
        p.requires_grad_(False)


def load_checkpoint(path: str | Path, *, device: torch.device, dtype: torch.dtype, parts: str = "all") -> LoadedParts:
    if parts not in ("all", "understanding"):
        raise ValueError(f"parts must be 'all' or 'understanding', got {parts!r}")
    folder = check_folder(path)
    llm_cfg = LLMConfig.from_json(_require(folder, "llm_config.json"))
    vit_cfg = SiglipVisionConfig.from_json(_require(folder, "vit_config.json"))
    bagel_path = folder / "bagel_config.json"
    bagel = BagelConfig.from_json(bagel_path) if bagel_path.is_file() else BagelConfig()
    ae_path = folder / "ae_config.json"
    ae_params = AutoEncoderParams.from_json(ae_path) if ae_path.is_file() else AutoEncoderParams()
    # the interactive scripts prefer the bf16 copy when it exists; it is the same weights at half the bytes
    order = EMA_FILES[::-1] if dtype == torch.bfloat16 else EMA_FILES
    ema = next((folder / n for n in order if (folder / n).is_file()), None)
    if ema is None:
        raise CheckpointError(f"checkpoint file missing: {folder / EMA_FILES[0]} (or {EMA_FILES[1]})")
    with_gen = parts == "all"
    ae_file = _require(folder, "ae.safetensors") if with_gen else None
    tokenizer = TextTokenizer.from_folder(folder)
    tokens = resolve_special_tokens(bagel, tokenizer, folder)

    with torch.device("meta"):
        model = UniMedVL(llm_cfg, vit_cfg, bagel, tokens, latent_channels=ae_params.z_channels, with_gen=with_gen)
    load_state_into(model, ema, device=device, dtype=dtype, skip=None if with_gen else GEN_ONLY)
    model.eval()
    vae = None
    files = [ema]
    if ae_file is not None:
        with torch.device("meta"):
            vae = FluxAutoEncoder(ae_params)
        load_state_into(vae, ae_file, device=device, dtype=dtype, strip_prefix="module.")
        vae.eval()
        files.append(ae_file)
    log.info("loaded %s (parts=%s) on %s as %s", folder, parts, device, dtype)
    return LoadedParts(model, vae, tokenizer, files)


class BackgroundHash:
    """sha256 of the weight files computed in a thread started at load time (tens of GB take a while);
    calling the object waits for the result."""

    def __init__(self, files: list[Path]) -> None:
        import threading

        self._files = list(files)
        self._result: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = files_sha256(self._files)
        except BaseException as e:  # reported to the caller of info, not lost in the thread
            self._error = e

    def __call__(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"hashing the checkpoint files failed: {self._error}") from self._error
        return self._result


def files_sha256(files: list[Path], chunk: int = 8 << 20) -> str:
    """One sha256 over the weight files' bytes, in order (the checkpoint identity in provenance)."""
    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()
