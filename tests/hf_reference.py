"""Tiny transformers models built inside the tests: the numerical reference.

Every weight is perturbed away from its initial value (transformers initialises norm
weights to constants, which would hide a wrong ``1 + w``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np
import torch
import transformers

TINY_GEMMA3 = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=7,  # not a multiple of 6: layer 5 global, 6 local again
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,  # != head_dim
    sliding_window=4,
    max_position_embeddings=256,
    final_logit_softcapping=5.0,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    },
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
)


def on_demand(tmp_path_factory, builders: dict, wrap) -> Callable:
    """``get(name)``: ``wrap(name, directory)`` of the tiny checkpoint ``builders[name]``
    saves, made on first use and kept (module fixtures share one per family)."""
    made = {}

    def get(name):
        if name not in made:
            directory = tmp_path_factory.mktemp(name)
            builders[name](directory)
            made[name] = wrap(name, directory)
        return made[name]

    return get


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


def gemma3_text(
    directory: pathlib.Path,
    seed: int = 0,
    perturbation: float = 0.1,
    post_norm_gain: float = 0.0,
    **overrides,
) -> transformers.PreTrainedModel:
    """Saves a perturbed tiny ``Gemma3ForCausalLM`` to ``directory`` and returns it.

    Random models tend to predict the token they just read, so greedy generation repeats
    itself. ``post_norm_gain`` (added to the post-attention and post-feedforward norm
    weights) lets the blocks outweigh the embedding, which makes generation varied."""
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(**{**TINY_GEMMA3, **overrides})
    config._attn_implementation = "eager"
    model = transformers.Gemma3ForCausalLM(config).eval()
    perturb_(model, seed, perturbation)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".post_" in name:
                param.add_(post_norm_gain)
    model.save_pretrained(directory)
    return model


def gemma3_multimodal(directory: pathlib.Path, seed: int = 0) -> transformers.PreTrainedModel:
    """Saves a perturbed tiny ``Gemma3ForConditionalGeneration`` (SigLIP tower included)."""
    torch.manual_seed(seed)
    text = {**TINY_GEMMA3, "vocab_size": 300, "final_logit_softcapping": None}
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=255,
        eoi_token_index=256,
        image_token_index=257,
    )
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    perturb_(model, seed)
    model.save_pretrained(directory)
    return model


def logits(model: transformers.PreTrainedModel, tokens: np.ndarray, **kwargs) -> np.ndarray:
    """The reference logits in float32 numpy."""
    args = {k: torch.as_tensor(np.asarray(v)) for k, v in kwargs.items()}
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens, np.int64)), **args)
    return out.logits.float().numpy()


# ------------------------------------------------------------------------------ Gemma 3n

TINY_GEMMA3N = dict(
    vocab_size=512,
    vocab_size_per_layer_input=480,  # ids 480..511 read per-layer-embedding row 0
    hidden_size=64,
    intermediate_size=[96, 128, 64, 128, 80],  # per-layer MLP widths
    num_hidden_layers=5,
    layer_types=[
        "sliding_attention",
        "full_attention",
        *["sliding_attention"] * 2,
        "full_attention",
    ],
    num_kv_shared_layers=2,  # 3 reuses layer 2 (sliding), 4 reuses layer 1 (full)
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=4,
    max_position_embeddings=256,
    hidden_size_per_layer_input=8,
    laurel_rank=8,
    altup_num_inputs=4,
    altup_active_idx=1,
    activation_sparsity_pattern=[0.95, 0.0, 0.8, 0.6, 0.0],
    final_logit_softcapping=30.0,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
)

# Gemma 3n in small with an audio tower (the multimodal tests): two text layers, ids laid
# out as released (text below 256, hard vision tokens 256..383, hard audio 384..511).
TINY_GEMMA3N_TWO_LAYERS = dict(
    TINY_GEMMA3N,
    vocab_size=512,
    vocab_size_per_layer_input=256,
    num_hidden_layers=2,
    layer_types=["sliding_attention", "full_attention"],
    intermediate_size=[96, 64],
    num_kv_shared_layers=0,
)
# A one-block conformer over the feature extractor's 128 mel bins (128 -> 64 -> 32).
TINY_GEMMA3N_AUDIO = dict(
    vocab_size=128,
    vocab_offset=384,
    input_feat_size=128,
    hidden_size=32,
    conf_attention_chunk_size=3,
    conf_attention_context_left=4,
    conf_attention_context_right=1,
    conf_num_attention_heads=4,
    conf_num_hidden_layers=1,
    conf_conv_kernel_size=3,
    conf_reduction_factor=4,
    sscp_conv_channel_size=(6, 4),
)


def gemma3n_text(
    directory: pathlib.Path, seed: int = 0, **overrides
) -> transformers.PreTrainedModel:
    """Saves a perturbed tiny ``Gemma3nForCausalLM`` to ``directory`` and returns it.

    Every weight is perturbed, including the norms (initialised to 1), AltUp's
    ``correct_output_scale`` (initialised to 0) and its router and coefficients."""
    torch.manual_seed(seed)
    config = transformers.Gemma3nTextConfig(**{**TINY_GEMMA3N, **overrides})
    config._attn_implementation = "eager"
    model = transformers.Gemma3nForCausalLM(config).eval()
    perturb_(model, seed)
    model.save_pretrained(directory)
    return model


def gemma3n_multimodal_layout(
    text_directory: pathlib.Path, directory: pathlib.Path, seed: int = 0
) -> dict[str, np.ndarray]:
    """Rewrites a saved tiny ``Gemma3nForCausalLM`` in the ``Gemma3nForConditionalGeneration``
    layout of the released E2B/E4B files, and returns the tensors written.

    transformers needs ``timm`` to build that class (its vision tower is a timm model), and
    installing timm from PyPI replaces the CPU torch with a CUDA build, so the file is
    written here instead: the text tensors move under ``model.language_model.``, the
    KV-sharing layers get the unused ``k_proj`` / ``v_proj`` / ``k_norm`` tensors the
    released files carry, and small vision / audio tower and embedder tensors sit beside
    them. ``config.json`` is transformers' own ``Gemma3nConfig`` around the text config.
    """
    from safetensors.numpy import load_file, save_file

    directory.mkdir(parents=True, exist_ok=True)
    text = load_file(text_directory / "model.safetensors")
    text_config = transformers.Gemma3nTextConfig.from_pretrained(text_directory)
    rng = np.random.RandomState(seed)
    tensors = {"model.language_model." + k[len("model.") :]: v for k, v in text.items()}
    kv_width = text_config.num_key_value_heads * text_config.head_dim
    hidden = text_config.hidden_size
    for i, mode in enumerate(text_config.kv_sharing_modes):
        if mode == "reuse":
            layer = f"model.language_model.layers.{i}.self_attn."
            tensors[layer + "k_proj.weight"] = rng.randn(kv_width, hidden).astype(np.float32)
            tensors[layer + "v_proj.weight"] = rng.randn(kv_width, hidden).astype(np.float32)
            tensors[layer + "k_norm.weight"] = rng.randn(text_config.head_dim).astype(np.float32)
    tower_shapes = {
        "model.vision_tower.timm_model.conv_stem.conv.weight": (8, 3, 3, 3),
        "model.embed_vision.embedding.weight": (128, 16),
        "model.embed_vision.hard_embedding_norm.weight": (16,),
        "model.embed_vision.soft_embedding_norm.weight": (16,),
        "model.embed_vision.embedding_projection.weight": (hidden, 16),
        "model.audio_tower.subsample_conv_projection.input_proj_linear.weight": (16, 32),
        "model.embed_audio.embedding.weight": (128, 16),
        "model.embed_audio.embedding_projection.weight": (hidden, 16),
    }
    for name, shape in tower_shapes.items():
        tensors[name] = rng.randn(*shape).astype(np.float32)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = transformers.Gemma3nConfig(text_config=text_config.to_dict())
    config.architectures = ["Gemma3nForConditionalGeneration"]
    config.save_pretrained(directory)
    return tensors


# ------------------------------------------------------------------------------ Gemma 4

_S, _F = "sliding_attention", "full_attention"

# E2B-like: per-layer embeddings, KV sharing (4 and 5 reuse 2 and 3), double-wide MLP on
# the sharing layers, a separate global head dim with proportional partial RoPE.
TINY_GEMMA4_E2B = dict(
    vocab_size=512,
    vocab_size_per_layer_input=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    layer_types=[_S, _F, _S, _F, _S, _F],
    num_kv_shared_layers=2,
    use_double_wide_mlp=True,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    sliding_window=4,
    max_position_embeddings=256,
    hidden_size_per_layer_input=8,
    final_logit_softcapping=30.0,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {
            "rope_type": "proportional",
            "partial_rotary_factor": 0.5,
            "rope_theta": 1_000_000.0,
        },
    },
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
)

# 26B-like: experts beside the dense MLP, K=V on full layers with their own KV head count,
# no per-layer embeddings. Layers 2 and 5 are full.
TINY_GEMMA4_MOE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    layer_types=[_S, _S, _F, _S, _S, _F],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    hidden_size_per_layer_input=0,
    enable_moe_block=True,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=16,
    sliding_window=4,
    max_position_embeddings=256,
    final_logit_softcapping=30.0,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
)


def _perturb_gemma4_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter, plus the ``layer_scalar`` buffers (saved in checkpoints)."""
    perturb_(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.add_(0.3 * torch.randn(buffer.shape, generator=generator))


def gemma4_text(
    directory: pathlib.Path, seed: int = 0, moe: bool = False, **overrides
) -> transformers.PreTrainedModel:
    """Saves a perturbed tiny ``Gemma4ForCausalLM`` to ``directory`` and returns it.

    ``moe=False`` starts from `TINY_GEMMA4_E2B`, ``moe=True`` from `TINY_GEMMA4_MOE`;
    ``overrides`` change config fields. Attention and experts run eagerly (the reference
    loop, not grouped_mm)."""
    torch.manual_seed(seed)
    base = TINY_GEMMA4_MOE if moe else TINY_GEMMA4_E2B
    config = transformers.Gemma4TextConfig(**{**base, **overrides})
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    model = transformers.Gemma4ForCausalLM(config).eval()
    _perturb_gemma4_(model, seed)
    model.save_pretrained(directory)
    return model


def gemma4_multimodal(
    directory: pathlib.Path, seed: int = 0, **text_overrides
) -> transformers.PreTrainedModel:
    """Saves a perturbed tiny ``Gemma4ForConditionalGeneration`` (MoE text decoder and a
    one-layer vision tower; no audio) and returns it."""
    torch.manual_seed(seed)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=4,
        pooling_kernel_size=2,
        position_embedding_size=64,
    )
    config = transformers.Gemma4Config(
        text_config={**TINY_GEMMA4_MOE, **text_overrides},
        vision_config=vision,
        audio_config=None,
        image_token_id=500,
        video_token_id=501,
        audio_token_id=502,
        boi_token_id=503,
        eoi_token_id=504,
        boa_token_id=505,
        eoa_token_id=506,
    )
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "eager"
    config.text_config._experts_implementation = "eager"
    model = transformers.Gemma4ForConditionalGeneration(config).eval()
    _perturb_gemma4_(model, seed)
    model.save_pretrained(directory)
    return model


# ------------------------------------------------------------------------------ T5Gemma 2

_T5_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
}
# Shared by both stacks unless overridden; the stacks differ on purpose (depth, heads, MLP
# width, window) so that mixing them up shows. Layer 1 of each stack is global.
TINY_T5GEMMA2_TEXT = dict(
    vocab_size=512,
    hidden_size=64,
    num_attention_heads=4,
    head_dim=16,
    query_pre_attn_scalar=24,  # != head_dim
    max_position_embeddings=256,
    rope_parameters=_T5_ROPE,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
)
TINY_T5GEMMA2_ENCODER = dict(
    intermediate_size=128,
    num_hidden_layers=3,
    num_key_value_heads=2,
    sliding_window=4,  # even: the encoder window is lopsided (1 back, 2 ahead)
    layer_types=[_S, _F, _S],
)
TINY_T5GEMMA2_DECODER = dict(
    intermediate_size=96,
    num_hidden_layers=2,
    num_key_value_heads=1,
    sliding_window=3,
    layer_types=[_S, _F],
    final_logit_softcapping=30.0,
)
# Tiny SigLIP: transformers cannot build T5Gemma 2 without a vision tower (text path only).
TINY_T5GEMMA2_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)
T5GEMMA2_EOI = 500
# The tiny SigLIP of the image tests: 32 px images in 8 px patches (a 4x4 grid of 16),
# pooled 2x2 into 4 soft tokens; layer_norm_eps != 1e-6, so a dropped eps shows.
TINY_SIGLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-5,
)
TINY_SIGLIP_TOKENS_PER_IMAGE = 4


def t5gemma2(
    directory: pathlib.Path,
    seed: int = 0,
    perturbation: float = 0.1,
    post_norm_gain: float = 0.0,
    encoder: dict | None = None,
    decoder: dict | None = None,
    **overrides,
) -> transformers.PreTrainedModel:
    """Saves a perturbed tiny ``T5Gemma2ForConditionalGeneration`` and returns it.

    ``overrides`` change fields of both text stacks, ``encoder`` / ``decoder`` of one.
    Every parameter is perturbed, the ``eoi_embedding`` row included (transformers
    initialises it to 0). ``post_norm_gain`` is added to the post-attention and
    post-feedforward norm weights, as in `gemma3_text`, so that greedy output varies."""
    torch.manual_seed(seed)
    shared = {**TINY_T5GEMMA2_TEXT, **overrides}
    config = transformers.T5Gemma2Config(
        encoder=dict(
            text_config={**shared, **TINY_T5GEMMA2_ENCODER, **(encoder or {})},
            vision_config=TINY_T5GEMMA2_VISION,
            mm_tokens_per_image=1,
            boi_token_index=T5GEMMA2_EOI - 1,
            eoi_token_index=T5GEMMA2_EOI,
        ),
        decoder={**shared, **TINY_T5GEMMA2_DECODER, **(decoder or {})},
        image_token_index=T5GEMMA2_EOI + 1,
    )
    config._attn_implementation = "eager"
    for sub in (config.encoder, config.encoder.text_config, config.encoder.vision_config):
        sub._attn_implementation = "eager"
    config.decoder._attn_implementation = "eager"
    model = transformers.T5Gemma2ForConditionalGeneration(config).eval()
    perturb_(model, seed, perturbation)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".post_" in name:
                param.add_(post_norm_gain)
    model.save_pretrained(directory)
    return model


def seq2seq_logits(
    model: transformers.PreTrainedModel,
    tokens: np.ndarray,
    decoder_tokens: np.ndarray,
    **kwargs,
) -> np.ndarray:
    """Decoder logits of an encoder-decoder reference model, float32 numpy."""
    args = {k: torch.as_tensor(np.asarray(v)) for k, v in kwargs.items()}
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(tokens, np.int64)),
            decoder_input_ids=torch.as_tensor(np.asarray(decoder_tokens, np.int64)),
            **args,
        )
    return out.logits.float().numpy()
