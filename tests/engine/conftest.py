"""Fixtures for the engine tests: the tiny model, golden sets, and checkpoint folders written on the fly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from inference.engine import load_engine
from inference.engine.random_init import TINY_CONFIG
from inference.engine.tokenizer import SPECIAL_TOKENS
from tests.conftest import REPO

GOLDEN_ROOT = REPO.parent / "shared" / "golden"


def golden_sets() -> list[Path]:
    if not GOLDEN_ROOT.is_dir():
        return []
    return sorted(p for p in GOLDEN_ROOT.iterdir() if (p / "manifest.json").is_file())


@pytest.fixture(scope="session")
def tiny():
    return load_engine("tiny")


def write_checkpoint(engine, folder: Path, *, tokenizer: bool = True) -> Path:
    """Write ``engine`` in the release layout (configs, ema.safetensors, ae.safetensors, tokenizer files)."""
    folder.mkdir(parents=True, exist_ok=True)
    m = engine.model
    (folder / "llm_config.json").write_text(json.dumps(TINY_CONFIG["llm"]))
    (folder / "vit_config.json").write_text(json.dumps(TINY_CONFIG["vit"]))
    tokens = {k: getattr(m.tokens, k) for k in ("bos_token_id", "eos_token_id", "start_of_image", "end_of_image")}
    (folder / "bagel_config.json").write_text(json.dumps({**TINY_CONFIG["bagel"], "new_token_ids": tokens}))
    (folder / "ae_config.json").write_text(json.dumps(TINY_CONFIG["ae"]))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(folder / "ema.safetensors"))
    if engine.vae is not None:
        save_file({k: v.contiguous() for k, v in engine.vae.state_dict().items()}, str(folder / "ae.safetensors"))
    if tokenizer:
        engine.tokenizer._tok.model.save(str(folder))  # vocab.json + merges.txt (byte-level BPE)
        base = 256
        added = {
            str(base + i): {"content": s, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                            "single_word": False}
            for i, s in enumerate(SPECIAL_TOKENS)
        }  # fmt: skip
        cfg = {"added_tokens_decoder": added, "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None}  # fmt: skip
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny, tmp_path_factory) -> Path:
    return write_checkpoint(tiny, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture
def gray_image():
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(40, 52), dtype=np.uint8)


def tensor_sum(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
