"""Model shapes the engine benchmark builds with random weights.

Each size is the four config documents of a checkpoint folder (``llm_config.json``, ``vit_config.json``,
the FLUX AE params and the Bagel values), so the same loader path as a real checkpoint reads them.
"""

from __future__ import annotations

import copy

_RELEASE_TOKENS = {"bos_token_id": 151644, "eos_token_id": 151645, "start_of_image": 151652, "end_of_image": 151653}
_TINY_TOKENS = {"bos_token_id": 1001, "eos_token_id": 1002, "start_of_image": 1003, "end_of_image": 1004}


def _llm(hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "qk_norm": True,
        "layer_module": "Qwen2MoTDecoderLayer",
        "model_type": "qwen2",
    }


def _vit(hidden: int, json_layers: int, heads: int, inter: int) -> dict:
    # json_layers follows the release file: the loader builds json_layers - 1
    return {
        "architectures": ["SiglipVisionModel"],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_hidden_layers": json_layers,
        "patch_size": 14,
        "image_size": 980,
        "num_channels": 3,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh",
        "model_type": "siglip_vision_model",
    }


def _ae(ch: int, ch_mult: list[int], res_blocks: int) -> dict:
    return {
        "resolution": 256,
        "in_channels": 3,
        "downsample": 2 ** (len(ch_mult) - 1),
        "ch": ch,
        "out_ch": 3,
        "ch_mult": ch_mult,
        "num_res_blocks": res_blocks,
        "z_channels": 16,
        "scale_factor": 0.3611,
        "shift_factor": 0.1159,
    }


def _bagel(max_latent: int, tokens: dict) -> dict:
    return {
        "visual_gen": True,
        "visual_und": True,
        "latent_patch_size": 2,
        "max_latent_size": max_latent,
        "vit_max_num_patch_per_side": 70,
        "connector_act": "gelu_pytorch_tanh",
        "interpolate_pos": False,
        "timestep_shift": 1.0,
        "new_token_ids": dict(tokens),
    }


SIZES: dict[str, dict] = {
    # the golden set's shapes
    "tiny": {
        "llm": _llm(64, 2, 4, 2, 128, 1024),
        "vit": _vit(32, 3, 2, 64),
        "ae": _ae(32, [1, 2, 2, 2], 1),
        "bagel": _bagel(32, _TINY_TOKENS),
    },
    # CI-sized: every part a few MB, still multi-layer and multi-head
    "small": {
        "llm": _llm(256, 4, 8, 2, 512, 2048),
        "vit": _vit(128, 5, 4, 256),
        "ae": _ae(32, [1, 2, 4, 4], 1),
        "bagel": _bagel(16, _TINY_TOKENS),
    },
    # the release architecture (model-spec §1): Qwen2.5-7B MoT, SigLIP-so400m 26 layers, FLUX VAE
    "full": {
        "llm": _llm(3584, 28, 28, 4, 18944, 152064),
        "vit": _vit(1152, 27, 16, 4304),
        "ae": _ae(128, [1, 2, 4, 4], 2),
        "bagel": _bagel(64, _RELEASE_TOKENS),
    },
}


def size_configs(size: str) -> dict:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    return copy.deepcopy(SIZES[size])
