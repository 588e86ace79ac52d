"""Architecture presets, as data. Sizes follow the released Gemma checkpoints' configs."""

from __future__ import annotations

from gemmalens.audio.gemma3n import Gemma3nAudioConfig, Gemma3nAudioTowerConfig
from gemmalens.audio.gemma4 import Gemma4AudioConfig, Gemma4AudioEncoderConfig
from gemmalens.audio.merge import (
    Gemma3nAudioEmbedderConfig,
    Gemma3nImageEncoderConfig,
    Gemma3nVisionEmbedderConfig,
)
from gemmalens.families.gemma3 import Gemma3Config, RopeConfig
from gemmalens.families.gemma3n import Gemma3nConfig
from gemmalens.families.gemma4 import Gemma4Config
from gemmalens.families.t5gemma2 import T5Gemma2Config
from gemmalens.vision.gemma4 import Gemma4ImageEncoderConfig, Gemma4VisionConfig
from gemmalens.vision.mobilenetv5 import MobileNetV5Config
from gemmalens.vision.siglip import Gemma3ProjectorConfig, Gemma3VisionConfig, SiglipVisionConfig


def _gemma3(**fields) -> Gemma3Config:
    layers = fields["num_hidden_layers"]
    fields.setdefault("layer_types", Gemma3Config.default_layer_types(layers))
    return Gemma3Config(**fields)


def _gemma3n(num_hidden_layers: int, intermediate_size: int, num_kv_shared_layers: int):
    """Gemma 3n text decoders differ only in depth, MLP width and KV sharing."""
    return Gemma3nConfig(
        vocab_size=262_400, vocab_size_per_layer_input=262_144, hidden_size=2048,
        intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=256, sliding_window=512,
        layer_types=Gemma3nConfig.default_layer_types(num_hidden_layers),
        activation_sparsity_pattern=Gemma3nConfig.default_sparsity(num_hidden_layers),
        num_kv_shared_layers=num_kv_shared_layers, hidden_size_per_layer_input=256,
        altup_num_inputs=4, laurel_rank=64, final_logit_softcapping=30.0,
    )  # fmt: skip


def _gemma4(num_hidden_layers: int, pattern: int, **fields) -> Gemma4Config:
    """Gemma 4 text decoders: ``pattern - 1`` sliding layers to one full, head dims 256/512."""
    return Gemma4Config(
        vocab_size=262_144, num_hidden_layers=num_hidden_layers, head_dim=256,
        global_head_dim=512, layer_types=Gemma4Config.default_layer_types(num_hidden_layers, pattern),
        final_logit_softcapping=30.0, **fields,
    )  # fmt: skip


_GEMMA4_SMALL = dict(
    num_attention_heads=8, sliding_window=512, hidden_size_per_layer_input=256,
    vocab_size_per_layer_input=262_144,
)  # fmt: skip
_GEMMA4_LARGE = dict(sliding_window=1024, attention_k_eq_v=True, max_position_embeddings=262_144)

_LINEAR_8 = RopeConfig(theta=1_000_000.0, rope_type="linear", factor=8.0)
_LARGE = dict(
    vocab_size=262_144, sliding_window=1024, rope_global=_LINEAR_8, max_position_embeddings=131_072
)

PRESETS = {
    "gemma3_270m": _gemma3(
        vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=512,
    ),
    "gemma3_1b": _gemma3(
        vocab_size=262_144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=512,
    ),
    "gemma3_4b_text": _gemma3(
        hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, **_LARGE,
    ),
    "gemma3_12b_text": _gemma3(
        hidden_size=3840, intermediate_size=15_360, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, **_LARGE,
    ),
    "gemma3_27b_text": _gemma3(
        hidden_size=5376, intermediate_size=21_504, num_hidden_layers=62, num_attention_heads=32,
        num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168, **_LARGE,
    ),
    "gemma3n_e2b": _gemma3n(num_hidden_layers=30, intermediate_size=8192, num_kv_shared_layers=10),
    "gemma3n_e4b": _gemma3n(num_hidden_layers=35, intermediate_size=16_384, num_kv_shared_layers=15),
    "gemma4_e2b": _gemma4(
        35, 5, hidden_size=1536, intermediate_size=6144, num_key_value_heads=1,
        num_kv_shared_layers=20, use_double_wide_mlp=True, **_GEMMA4_SMALL,
    ),
    "gemma4_e4b": _gemma4(
        42, 6, hidden_size=2560, intermediate_size=10_240, num_key_value_heads=2,
        num_kv_shared_layers=18, **_GEMMA4_SMALL,
    ),
    "gemma4_26b_a4b": _gemma4(
        30, 6, hidden_size=2816, intermediate_size=2112, num_attention_heads=16,
        num_key_value_heads=8, num_global_key_value_heads=2, enable_moe_block=True,
        num_experts=128, top_k_experts=8, moe_intermediate_size=704, **_GEMMA4_LARGE,
    ),
    "gemma4_31b": _gemma4(
        60, 6, hidden_size=5376, intermediate_size=21_504, num_attention_heads=32,
        num_key_value_heads=16, num_global_key_value_heads=4, **_GEMMA4_LARGE,
    ),
}  # fmt: skip


def _t5gemma2(gemma3: str) -> T5Gemma2Config:
    """T5Gemma 2 stacks are the Gemma 3 text architecture of the same size (encoder and
    decoder alike), with linear-8 RoPE on global layers as in the released 270M-270M."""
    stack = PRESETS[gemma3].replace(rope_global=_LINEAR_8)
    return T5Gemma2Config(encoder=stack, decoder=stack)


PRESETS.update(
    t5gemma2_270m_270m=_t5gemma2("gemma3_270m"),
    t5gemma2_1b_1b=_t5gemma2("gemma3_1b"),
    t5gemma2_4b_4b=_t5gemma2("gemma3_4b_text"),
)


def _gemma3_with_vision(text: str) -> Gemma3Config:
    """``Gemma3ForConditionalGeneration``: the text preset with SigLIP-So400m/14 at 896 px
    and the projector to 256 soft tokens per image; the text vocabulary of the multimodal
    checkpoints has 64 more rows (262 208)."""
    config = PRESETS[text]
    siglip = SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=896, patch_size=14,
    )  # fmt: skip
    vision = Gemma3VisionConfig(siglip, Gemma3ProjectorConfig(256, config.hidden_size))
    return config.replace(vocab_size=262_208, vision=vision, image_token_id=262_144)


PRESETS.update(
    gemma3_4b=_gemma3_with_vision("gemma3_4b_text"),
    gemma3_12b=_gemma3_with_vision("gemma3_12b_text"),
    gemma3_27b=_gemma3_with_vision("gemma3_27b_text"),
)


# Gemma 4's vision towers (transformers' Gemma4VisionModel: 167 364 608 and 569 548 080
# parameters), by the text preset they sit beside. The presets above are the text decoders.
_GEMMA4_VISION_SMALL = Gemma4VisionConfig(use_clipped_linears=True)
_GEMMA4_VISION_LARGE = Gemma4VisionConfig(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    num_key_value_heads=16, head_dim=72, standardize=True,
)  # fmt: skip
GEMMA4_VISION_TOWERS = {
    "gemma4_e2b": _GEMMA4_VISION_SMALL,
    "gemma4_e4b": _GEMMA4_VISION_SMALL,
    "gemma4_26b_a4b": _GEMMA4_VISION_LARGE,
    "gemma4_31b": _GEMMA4_VISION_LARGE,
}


def gemma4_with_vision(name: str) -> Gemma4Config:
    """A Gemma 4 text preset with its released vision tower and ``embed_vision``
    (``Gemma4ForConditionalGeneration`` without the audio tower): e.g.
    ``gemma4_with_vision("gemma4_e2b").num_params()``, ``gl.build(...)``."""
    if name not in GEMMA4_VISION_TOWERS:
        raise KeyError(f"{name!r} is not a Gemma 4 preset; one of {sorted(GEMMA4_VISION_TOWERS)}.")
    config = PRESETS[name]
    return config.replace(
        vision=Gemma4ImageEncoderConfig(GEMMA4_VISION_TOWERS[name], config.hidden_size)
    )


def gemma4_with_audio(name: str) -> Gemma4Config:
    """A Gemma 4 text preset with its released audio tower (transformers'
    ``Gemma4AudioModel``: 304 824 608 parameters) and ``embed_audio``, without the vision
    tower; E2B and E4B only (the larger models have no audio)."""
    if name not in ("gemma4_e2b", "gemma4_e4b"):
        raise KeyError(
            f"{name!r} has no audio tower: Gemma 4 E2B and E4B do (gemma4_e2b, gemma4_e4b)."
        )
    config = PRESETS[name]
    return config.replace(audio=Gemma4AudioEncoderConfig(Gemma4AudioConfig(), config.hidden_size))


def gemma4_multimodal(name: str) -> Gemma4Config:
    """The whole released ``Gemma4ForConditionalGeneration``: the text preset with its
    vision tower, and for E2B and E4B its audio tower too (with their embedders)."""
    config = gemma4_with_vision(name)
    if name in ("gemma4_e2b", "gemma4_e4b"):
        config = config.replace(audio=gemma4_with_audio(name).audio)
    return config


def gemma3n_with_audio(name: str) -> Gemma3nConfig:
    """A Gemma 3n text preset with the released audio tower (transformers'
    ``Gemma3nAudioEncoder``: 681 348 640 parameters), ``embed_audio`` and ``embed_vision``
    (hard tokens): ``Gemma3nForConditionalGeneration`` without its vision tower, e.g.
    ``gemma3n_with_audio("gemma3n_e2b").num_params()``, ``gl.build(...)``."""
    if name not in ("gemma3n_e2b", "gemma3n_e4b"):
        raise KeyError(f"{name!r} is not a Gemma 3n preset; one of gemma3n_e2b, gemma3n_e4b.")
    config = PRESETS[name]
    return config.replace(
        audio=Gemma3nAudioTowerConfig(Gemma3nAudioConfig(), config.hidden_size),
        vision_embedder=Gemma3nVisionEmbedderConfig(text_hidden_size=config.hidden_size),
    )


def gemma3n_with_vision(name: str) -> Gemma3nConfig:
    """A Gemma 3n text preset with the released vision tower (timm's
    ``mobilenetv5_300m_enc``: 294 126 912 parameters), ``embed_vision`` and
    ``embed_audio``'s hard path (which embeds the audio ids in transformers' model), without
    the audio tower."""
    config = PRESETS[_gemma3n_name(name)]
    width = config.hidden_size
    return config.replace(
        vision=Gemma3nImageEncoderConfig(
            MobileNetV5Config(), Gemma3nVisionEmbedderConfig(text_hidden_size=width)
        ),
        audio_embedder=Gemma3nAudioEmbedderConfig(text_hidden_size=width),
    )


def gemma3n_multimodal(name: str) -> Gemma3nConfig:
    """The whole released ``Gemma3nForConditionalGeneration``: the text preset with its
    vision and audio towers and both embedders (E2B 5 418 464 192 parameters, E4B
    7 818 517 072, as transformers counts them), e.g.
    ``gemma3n_multimodal("gemma3n_e2b").num_params()``."""
    config = gemma3n_with_audio(name)
    return config.replace(vision=gemma3n_with_vision(name).vision)


def _gemma3n_name(name: str) -> str:
    if name not in ("gemma3n_e2b", "gemma3n_e4b"):
        raise KeyError(f"{name!r} is not a Gemma 3n preset; one of gemma3n_e2b, gemma3n_e4b.")
    return name


def presets() -> list[str]:
    """Names of the architecture presets."""
    return sorted(PRESETS)


def preset(name: str) -> Gemma3Config | Gemma3nConfig | Gemma4Config | T5Gemma2Config:
    """The config of a named preset (``gl.preset("gemma3_1b").num_params()``)."""
    try:
        return PRESETS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(
            f"No preset named {name!r}.{hint} Available: {', '.join(presets())}."
        ) from None
