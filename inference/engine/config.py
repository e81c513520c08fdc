"""Configuration of the language model and of the Bagel glue (heads, position tables, special tokens).

Field names follow the release files: ``llm_config.json`` (a Qwen2 config) and, where present,
``bagel_config.json``. The release loader forces qk-norm, an untied head and the MoT layer, so those are
not read from the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# Qwen2.5 ids of the four tokens the code uses (spec 1.3); a tokenizer, if present, is asked first.
QWEN_SPECIAL_TOKENS = {
    "bos_token_id": "<|im_start|>",
    "eos_token_id": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
}


@dataclass
class LLMConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> LLMConfig:
        cfg = cls(**{k: type(getattr(cls, k, 0))(d[k]) for k in cls.__dataclass_fields__ if d.get(k) is not None})
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"llm_config.json: hidden_act {d['hidden_act']!r} is not supported (only silu)")
        if d.get("rope_scaling"):
            raise ValueError("llm_config.json: rope_scaling is not supported (the release has none)")
        if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError("llm_config.json: hidden_size/heads/kv heads are not divisible")
        if cfg.head_dim % 2:
            raise ValueError("llm_config.json: head_dim must be even for RoPE")
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> LLMConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class SpecialTokens:
    bos_token_id: int  # <|im_start|>: opens every text block, first decode input
    eos_token_id: int  # <|im_end|>: closes text blocks, stop token
    start_of_image: int  # <|vision_start|>
    end_of_image: int  # <|vision_end|>


@dataclass
class BagelConfig:
    latent_patch_size: int = 2
    max_latent_size: int = 64  # the release scripts' value (class default 32); the checkpoint table has 64*64 rows
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    new_token_ids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> BagelConfig:
        cfg = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        if cfg.connector_act != "gelu_pytorch_tanh":
            raise ValueError(f"bagel_config.json: connector_act {cfg.connector_act!r} is not supported")
        if cfg.interpolate_pos:
            raise ValueError("bagel_config.json: interpolate_pos=True is not supported (the release uses False)")
        cfg.new_token_ids = {k: int(v) for k, v in cfg.new_token_ids.items()}
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> BagelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def special_tokens(self) -> SpecialTokens | None:
        ids = self.new_token_ids
        if all(k in ids for k in QWEN_SPECIAL_TOKENS):
            return SpecialTokens(**{k: ids[k] for k in QWEN_SPECIAL_TOKENS})
        return None
